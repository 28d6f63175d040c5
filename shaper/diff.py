"""The operations that turn the actual tree of a device into the desired one, and nothing more.

Order matters to the kernel and to subscribers: a missing or foreign root
rebuilds the tree; otherwise removed classes go first, then class changes
(root class first, so a new link rate applies before the classes under it),
then new classes, then leaf qdiscs. A class whose rates changed is changed
in place (its queue keeps its packets); a leaf whose options changed is
changed in place; only a leaf of another kind is deleted and recreated.
"""

from __future__ import annotations

from collections.abc import Collection
from dataclasses import dataclass, replace

from desanet.shaper import netlink
from desanet.shaper.tree import HtbClass, HtbRoot, LeafQdisc, Tree, minor_of, slot_of_minor


@dataclass(frozen=True)
class Operation:
    """One netlink request: a verb and the root, class or leaf it acts on."""

    verb: str
    subject: HtbRoot | HtbClass | LeafQdisc
    creating: bool = False

    def encode(self, ifindex: int) -> bytes:
        s = self.subject
        if isinstance(s, HtbRoot):
            if self.verb == "add-root":
                return netlink.encode_root_add(ifindex, s)
            return netlink.encode_root_delete(ifindex, s.handle)
        if isinstance(s, HtbClass):
            if self.verb == "add-class":
                return netlink.encode_class_add(ifindex, s)
            if self.verb == "change-class":
                return netlink.encode_class_change(ifindex, s)
            return netlink.encode_class_delete(ifindex, s)
        if self.verb == "put-leaf":
            return netlink.encode_leaf_put(ifindex, s, self.creating)
        return netlink.encode_leaf_delete(ifindex, s)

    def describe(self) -> str:
        s = self.subject
        if isinstance(s, HtbRoot):
            return f"{self.verb} htb {s.handle >> 16:x}:"
        classid = s.classid if isinstance(s, HtbClass) else s.parent
        slot = slot_of_minor(minor_of(classid))
        where = f" (slot {slot})" if slot is not None else ""
        what = f"{s.kind} leaf under " if isinstance(s, LeafQdisc) else ""
        return f"{self.verb} {what}class {classid >> 16:x}:{minor_of(classid):x}{where}"


def _full_build(root: HtbRoot, desired: Tree, actual: Tree) -> list[Operation]:
    ops = []
    if actual.root is not None:
        ops.append(Operation("delete-root", actual.root))
    ops.append(Operation("add-root", root))
    ops.extend(Operation("add-class", desired.classes[cid]) for cid in sorted(desired.classes))
    ops.extend(
        Operation("put-leaf", desired.leaves[cid], creating=True) for cid in sorted(desired.leaves)
    )
    return ops


def _leaf_ops(want: LeafQdisc, have: LeafQdisc | None, class_is_new: bool) -> list[Operation]:
    if class_is_new or have is None or have.handle != want.handle:
        # No leaf of ours there yet: creating grafts it over HTB's default one.
        return [Operation("put-leaf", want, creating=True)]
    if have.kind != want.kind or _create_only_differs(want, have):
        return [Operation("delete-leaf", have), Operation("put-leaf", want, creating=True)]
    return [Operation("put-leaf", want, creating=False)]


def _create_only_differs(want: LeafQdisc, have: LeafQdisc) -> bool:
    fixed = netlink.CREATE_ONLY.get(want.kind, frozenset())
    have_options = dict(have.options)
    return any(have_options.get(name) != value for name, value in want.options if name in fixed)


def _restricted(tree: Tree, only: Collection[int]) -> Tree:
    return Tree(
        tree.root,
        {cid: tree.classes[cid] for cid in only if cid in tree.classes},
        {cid: tree.leaves[cid] for cid in only if cid in tree.leaves},
    )


def diff(desired: Tree, actual: Tree, only: Collection[int] | None = None) -> list[Operation]:
    """Operations, in order, that make `actual` equal to `desired` (none if they agree).

    `only` limits the comparison to these class ids (the ones a derived plan
    touched), which keeps a one-subscriber change independent of tree size.
    """
    if desired.root is None:
        return [Operation("delete-root", actual.root)] if actual.root is not None else []
    if actual.root != desired.root:
        return _full_build(desired.root, desired, actual)
    if only is not None:
        desired, actual = _restricted(desired, only), _restricted(actual, only)
    removed = [cls for cid, cls in actual.classes.items() if cid not in desired.classes]
    ops = [
        Operation("delete-class", cls)
        for cls in sorted(removed, key=lambda c: minor_of(c.classid), reverse=True)
    ]
    changed: list[HtbClass] = []
    added: list[HtbClass] = []
    # HTB sets a class's quantum only while it is a leaf: an inner class keeps the
    # quantum it was created with, whatever a later change asks. Comparing it would
    # make every re-apply after a link-rate change "change" the root classes again.
    inner = {cls.parent for cls in desired.classes.values()}
    for cid, want in desired.classes.items():
        have = actual.classes.get(cid)
        if want is have:
            continue
        if have is not None and cid in inner:
            have = replace(have, quantum=want.quantum)
        if have is None:
            added.append(want)
        elif want != have:
            if want.parent != have.parent:
                ops.append(Operation("delete-class", have))
                added.append(want)
            else:
                changed.append(want)
    ops.extend(Operation("change-class", c) for c in sorted(changed, key=lambda c: c.classid))
    ops.extend(Operation("add-class", c) for c in sorted(added, key=lambda c: c.classid))
    new_ids = {c.classid for c in added}
    leaf_ops: list[Operation] = []
    for cid, want_leaf in desired.leaves.items():
        have_leaf = actual.leaves.get(cid)
        if cid not in new_ids and want_leaf.satisfied_by(have_leaf):
            continue
        leaf_ops.extend(_leaf_ops(want_leaf, have_leaf, cid in new_ids))
    ops.extend(leaf_ops)
    return ops
