"""The shape of an HTB tree, shared by the plan (desired) and the read-back (actual).

Values are kept in the kernel's own units (bytes per second, psched ticks,
microseconds) so that a tree read back from the kernel compares equal, field
by field, with the tree that was written: the diff is plain equality.
"""

from __future__ import annotations

from collections.abc import MutableMapping
from dataclasses import dataclass, field
from typing import TypeVar

from desanet.shaper.cowmap import CowMap

T = TypeVar("T")

# The qdisc handles of the two trees (major numbers); a class id is major << 16 | minor.
DOWN_MAJOR = 0x1
UP_MAJOR = 0x2
ROOT_MINOR = 0x1
DEFAULT_MINOR = 0xF
# Slot s lives in class minor s + SLOT_MINOR_OFFSET; minors up to 0xfffe leave
# 0xffff (the clsact qdisc's major on the LAN device) out of the leaf handles.
SLOT_MINOR_OFFSET = 0xF
MAX_SLOT = 0xFFFE - SLOT_MINOR_OFFSET
TC_H_ROOT = 0xFFFFFFFF


def make_handle(major: int, minor: int) -> int:
    """tc's major:minor packed into a u32."""
    return (major << 16) | minor


def major_of(handle: int) -> int:
    """Major number of a handle or class id."""
    return handle >> 16


def minor_of(handle: int) -> int:
    """Minor number of a handle or class id."""
    return handle & 0xFFFF


def slot_of_minor(minor: int) -> int | None:
    """The subscriber slot a class minor belongs to, None for the root and default classes."""
    slot = minor - SLOT_MINOR_OFFSET
    return slot if 1 <= slot <= MAX_SLOT else None


def leaf_handle(classid: int) -> int:
    """Handle of the leaf qdisc under a class: its major is the class minor (unique per device)."""
    return make_handle(minor_of(classid), 0)


@dataclass(frozen=True)
class HtbRoot:
    """The root HTB qdisc of one direction."""

    handle: int
    default_minor: int
    r2q: int


@dataclass(frozen=True)
class HtbClass:
    """One HTB class: rates in bytes/s, bursts in psched ticks (64 ns), as the kernel keeps them."""

    classid: int
    parent: int
    rate_bytes_ps: int
    ceil_bytes_ps: int
    buffer_ticks: int
    cbuffer_ticks: int
    quantum: int
    prio: int = 0


@dataclass(frozen=True)
class LeafQdisc:
    """The qdisc under a leaf class; `options` holds the kind's settings by name.

    A desired leaf matches an actual one when kind and handle agree and every
    desired option has the same value (the kernel reports more options than
    we set).
    """

    handle: int
    parent: int
    kind: str
    options: tuple[tuple[str, int], ...] = ()

    def satisfied_by(self, actual: LeafQdisc | None) -> bool:
        if actual is None:
            return False
        if self is actual:
            return True
        if actual.kind != self.kind or actual.handle != self.handle:
            return False
        have = dict(actual.options)
        return all(have.get(name) == value for name, value in self.options)


@dataclass
class Tree:
    """An HTB tree on one device: root qdisc, classes by class id, leaf qdiscs by parent class id.

    `root` is None when the device has no HTB root of ours (no tree, or a
    foreign root qdisc, named by `foreign_root`).
    """

    root: HtbRoot | None
    classes: MutableMapping[int, HtbClass] = field(default_factory=dict)
    leaves: MutableMapping[int, LeafQdisc] = field(default_factory=dict)
    foreign_root: str | None = None

    def copy(self) -> Tree:
        return Tree(self.root, _copy(self.classes), _copy(self.leaves), self.foreign_root)


def _copy(mapping: MutableMapping[int, T]) -> MutableMapping[int, T]:
    return mapping.copy() if isinstance(mapping, CowMap) else dict(mapping)
