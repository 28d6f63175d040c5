# Over 400 lines: applying, rolling back and reading the class statistics back all work on the
# trees the shaper last wrote and its interface indexes; apart, each would need the others'
# bookkeeping.
"""The shaper: keeps the kernel's two HTB trees equal to a plan, touching only what differs.

Download is shaped on the LAN interface's egress, upload on an IFB device the
datapath redirects LAN ingress to. `apply` reads the trees back from the
kernel the first time (or when asked), and afterwards diffs against the trees
it last wrote, so a one-subscriber change costs a few netlink requests however
large the village. If a request fails midway, the trees are put back as they
were before the apply (read back, diffed and rewritten) and the error says
which request failed and whether the rollback worked.

Everything happens in the network namespace of the calling thread; a fresh
netlink socket is opened per call so the namespace is always the caller's.
"""

from __future__ import annotations

import errno
import fcntl
import logging
import os
import socket
import struct
import zlib
from collections.abc import Callable, Collection, Mapping
from dataclasses import dataclass, field

from pyroute2 import IPRoute
from pyroute2.netlink.exceptions import NetlinkError
from pyroute2.netlink.rtnl import RTM_GETQDISC, RTM_GETTCLASS

from desanet.errors import ShaperError
from desanet.shaper.diff import Operation, diff
from desanet.shaper.leaf import choose_leaf
from desanet.shaper.netlink import (
    TcSocket,
    encode_leaf_get,
    encode_root_delete,
    encode_root_probe,
)
from desanet.shaper.plan import DIRECTIONS, ShapingPlan
from desanet.shaper.readback import (
    ClassStats,
    leaf_stats,
    leaf_stats_of_reply,
    parse_qdiscs_of,
    tree_from_parts,
)
from desanet.shaper.tree import (
    DOWN_MAJOR,
    MAX_SLOT,
    SLOT_MINOR_OFFSET,
    UP_MAJOR,
    LeafQdisc,
    Tree,
    make_handle,
    slot_of_minor,
)

log = logging.getLogger("desanet.shaper")

MAJORS = {"down": DOWN_MAJOR, "up": UP_MAJOR}
IFNAMSIZ = 15
SIOCGIFFLAGS = 0x8913
IFF_UP = 0x1
# Derived plans further than this from the last applied one get a full diff.
MAX_PLAN_HISTORY = 1000
_PROBED_KINDS = ("fq_codel", "cake")
_available: set[str] | None = None
# Warnings already logged by this process: a fallback is logged once, not at every apply.
_warned: set[str] = set()


def upload_ifb_name(lan: str) -> str:
    """The IFB device for `lan`'s upload tree: "ifb-<lan>", shortened with a hash if long."""
    name = f"ifb-{lan}"
    if len(name) <= IFNAMSIZ:
        return name
    return f"ifb-{lan[:7]}{zlib.crc32(lan.encode()) & 0xFFFF:04x}"


@dataclass
class ApplyResult:
    """What an apply did: requests sent (per direction), leaf kind in use, warnings for status."""

    operations: int
    leaf_in_use: str
    warnings: list[str]
    plan: ShapingPlan
    per_direction: dict[str, int] = field(default_factory=dict)


def _ifindex(name: str, role: str) -> int:
    try:
        return socket.if_nametoindex(name)
    except OSError:
        raise ShaperError(
            f"{role} interface {name!r} does not exist in this network namespace"
        ) from None


def _is_up(name: str) -> bool:
    """Whether device `name` exists and is up in this thread's namespace (one ioctl)."""
    request = struct.pack("16sH14x", name.encode()[:IFNAMSIZ], 0)
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        try:
            reply = fcntl.ioctl(sock, SIOCGIFFLAGS, request)
        except OSError:
            return False
    return bool(struct.unpack_from("H", reply, 16)[0] & IFF_UP)


def available_leaves() -> set[str]:
    """Leaf kinds this kernel has; probed once per process on a throwaway IFB device."""
    global _available
    if _available is None:
        found = {"pfifo"}
        probe = f"dnprobe{os.getpid() % 100000}"
        with IPRoute() as ipr:
            try:
                ipr.link("add", ifname=probe, kind="ifb")
            except NetlinkError as err:
                raise ShaperError(f"cannot create an IFB device ({err}): is ifb built?") from None
            index = ipr.link_lookup(ifname=probe)[0]
            sock = TcSocket()
            try:
                for kind in _PROBED_KINDS:
                    if sock.transact([encode_root_probe(index, kind)])[0][0] == 0:
                        found.add(kind)
                        sock.transact([encode_root_delete(index, 0x10000)])
            finally:
                sock.close()
                ipr.link("del", index=index)
        _available = found
    return set(_available)


def _removes(op: Operation, actual: Tree) -> bool:
    """True when `op` destroys a class or a leaf qdisc (and with it what it counted)."""
    if op.verb.startswith("delete"):
        return True
    # Creating a leaf where one is grafted already replaces it.
    leaf = op.subject
    return op.creating and isinstance(leaf, LeafQdisc) and leaf.parent in actual.leaves


class Shaper:
    """The download tree on `lan` and the upload tree on `upload_ifb`, kept equal to a plan."""

    def __init__(self, lan: str, upload_ifb: str | None = None) -> None:
        self.lan = lan
        self.upload_ifb = upload_ifb or upload_ifb_name(lan)
        self._known: dict[str, Tree] | None = None
        self._known_plan: ShapingPlan | None = None
        self.leaf_in_use: str | None = None
        self.warnings: list[str] = []

    def ensure_ifb(self) -> int:
        """Create the upload IFB if missing and set it up; its ifindex is the datapath's target."""
        if _is_up(self.upload_ifb):
            return socket.if_nametoindex(self.upload_ifb)
        with IPRoute() as ipr:
            found = ipr.link_lookup(ifname=self.upload_ifb)
            if not found:
                try:
                    ipr.link("add", ifname=self.upload_ifb, kind="ifb")
                except NetlinkError as err:
                    raise ShaperError(
                        f"cannot create upload IFB device {self.upload_ifb!r}: {err}"
                    ) from None
                found = ipr.link_lookup(ifname=self.upload_ifb)
            ipr.link("set", index=found[0], state="up")
            return int(found[0])

    def _indexes(self) -> dict[str, int]:
        return {
            "down": _ifindex(self.lan, "LAN"),
            "up": _ifindex(self.upload_ifb, "upload IFB"),
        }

    def read_back(self) -> dict[str, Tree]:
        """The actual trees, by direction, as the kernel reports them now."""
        indexes = self._indexes()
        sock = TcSocket()
        try:
            trees = self._read(sock, indexes)
        finally:
            sock.close()
        self._known = trees
        self._known_plan = None
        return {d: t.copy() for d, t in trees.items()}

    def _read(self, sock: TcSocket, indexes: dict[str, int]) -> dict[str, Tree]:
        views = parse_qdiscs_of(sock.dump(RTM_GETQDISC, 0), indexes.values())
        return {
            d: tree_from_parts(sock.dump(RTM_GETTCLASS, index), views[index])
            for d, index in indexes.items()
        }

    def apply(
        self,
        plan: ShapingPlan,
        *,
        full_read_back: bool = False,
        before_removing: Callable[[], None] | None = None,
    ) -> ApplyResult:
        """Make the kernel's trees equal to `plan` with only the requests that differ.

        The leaf kind falls back when the kernel lacks the planned one (one
        warning, also in the result). `full_read_back` diffs against a fresh
        read-back instead of the trees this shaper last wrote; when the kernel
        refuses a change computed from those, the shaper reads back and tries once
        more by itself. A plan derived from the last applied one costs requests
        for the classes it touched only. `before_removing` is called before any
        request that deletes a class, a leaf or a root (whose counters then
        vanish), so the caller can read what they delivered first.
        """
        kind, warning = choose_leaf(plan.leaf, available_leaves())
        if kind != plan.leaf_in_plan():
            plan = plan.with_leaf(kind)
        if warning and warning not in _warned:
            _warned.add(warning)
            log.warning("%s", warning)
        cached = self._known is not None and not full_read_back and _is_up(self.upload_ifb)
        try:
            counts = self._apply_trees(plan, not cached, before_removing)
        except ShaperError as err:
            if not cached:
                raise
            # The kernel refused a change computed against the trees this shaper last
            # wrote (and the trees were put back): someone changed them behind its back.
            # Read them back and try once more.
            log.warning("%s; trying again against a fresh read-back", err)
            counts = self._apply_trees(plan, True, before_removing)
        self._known = {d: plan.tree(d) for d in DIRECTIONS}
        self._known_plan = plan
        # The history is no longer needed: cutting it lets older plans be freed.
        plan.base = None
        plan.touched = set()
        self.leaf_in_use = kind
        self.warnings = [warning] if warning else []
        return ApplyResult(
            operations=sum(counts.values()),
            leaf_in_use=kind,
            warnings=list(self.warnings),
            plan=plan,
            per_direction=counts,
        )

    def _apply_trees(
        self, plan: ShapingPlan, fresh: bool, before_removing: Callable[[], None] | None
    ) -> dict[str, int]:
        if fresh:
            _ifindex(self.lan, "LAN")  # before creating an IFB for a LAN that is not there
            self.ensure_ifb()
        indexes = self._indexes()
        sock = TcSocket()
        try:
            before = self._read(sock, indexes) if fresh or self._known is None else self._known
            only = None if fresh else self._touched_since_known(plan)
            ops = {d: diff(plan.tree(d), before[d], only) for d in DIRECTIONS}
            if before_removing is not None and any(
                _removes(op, before[d]) for d in DIRECTIONS for op in ops[d]
            ):
                before_removing()
            done: list[str] = []
            for direction in DIRECTIONS:
                done.append(direction)
                self._run(sock, indexes, direction, ops[direction], before, done)
        finally:
            sock.close()
        return {d: len(ops[d]) for d in DIRECTIONS}

    def _touched_since_known(self, plan: ShapingPlan) -> set[int] | None:
        """Class ids changed between the plan last applied and `plan`, None if unrelated."""
        touched: set[int] = set()
        node: ShapingPlan | None = plan
        for _ in range(MAX_PLAN_HISTORY):
            if node is None:
                return None
            if node is self._known_plan:
                return touched
            touched |= node.touched
            node = node.base
        return None

    def _run(
        self,
        sock: TcSocket,
        indexes: dict[str, int],
        direction: str,
        ops: list[Operation],
        before: dict[str, Tree],
        done: list[str],
    ) -> None:
        if not ops:
            return
        results = sock.transact([op.encode(indexes[direction]) for op in ops])
        failed = next((i for i, (code, _) in enumerate(results) if code), None)
        if failed is None:
            return
        self._known = None
        what = (
            f"{direction} tree: {ops[failed].describe()} failed ({results[failed][1]}) "
            f"after {failed} of {len(ops)} requests"
        )
        try:
            undone = self._roll_back(sock, indexes, before, done)
        except ShaperError as err:
            raise ShaperError(
                f"{what}; rolling back failed too ({err}): the trees are partly applied, "
                f"apply again or remove the shaper"
            ) from None
        raise ShaperError(
            f"{what}; rolled back with {undone} requests, the previous trees are in place"
        )

    def _roll_back(
        self, sock: TcSocket, indexes: dict[str, int], before: dict[str, Tree], done: list[str]
    ) -> int:
        now = self._read(sock, indexes)
        undone = 0
        for direction in done:
            ops = diff(before[direction], now[direction])
            results = sock.transact([op.encode(indexes[direction]) for op in ops])
            for op, (code, message) in zip(ops, results, strict=True):
                if code:
                    raise ShaperError(f"{direction} tree: {op.describe()}: {message}")
            undone += len(ops)
        return undone

    def class_stats(self) -> dict[str, dict[int, ClassStats]]:
        """Counters of every subscriber's class by direction, then slot (one qdisc dump)."""
        indexes = self._indexes()
        sock = TcSocket()
        try:
            chunks = sock.dump(RTM_GETQDISC, 0)
        finally:
            sock.close()
        per_device = leaf_stats(chunks, {indexes[d]: MAJORS[d] for d in DIRECTIONS})
        result: dict[str, dict[int, ClassStats]] = {}
        for direction in DIRECTIONS:
            by_slot: dict[int, ClassStats] = {}
            for classid, stats in per_device[indexes[direction]].items():
                slot = slot_of_minor(classid & 0xFFFF)
                if slot is not None:
                    by_slot[slot] = stats
            result[direction] = by_slot
        return result

    def class_stats_of(
        self, slots: Mapping[str, Collection[int]]
    ) -> dict[str, dict[int, ClassStats]]:
        """Counters of the classes of `slots` (by direction), one request per leaf by handle.

        What `class_stats` gives for those slots, at a cost that follows how
        many are asked for, not how many classes the trees hold: at 10,000
        subscribers a dump of every leaf costs tens of milliseconds (see
        benchmarks/service_cost.py), one leaf by handle some microseconds.
        A slot without a class is left out, as the dump leaves it out.
        """
        indexes = self._indexes()
        asked = [
            (direction, slot)
            for direction in DIRECTIONS
            for slot in slots.get(direction, ())
            if 1 <= slot <= MAX_SLOT  # beyond: no class id, so never a class
        ]
        requests = [
            encode_leaf_get(indexes[d], make_handle(MAJORS[d], slot + SLOT_MINOR_OFFSET))
            for d, slot in asked
        ]
        sock = TcSocket()
        try:
            replies = sock.get_many(requests)
        finally:
            sock.close()
        result: dict[str, dict[int, ClassStats]] = {d: {} for d in DIRECTIONS}
        for (direction, slot), reply in zip(asked, replies, strict=True):
            if isinstance(reply, tuple):
                result[direction][slot] = leaf_stats_of_reply(*reply)
            elif reply not in (errno.ENOENT, errno.EINVAL):
                raise ShaperError(
                    f"cannot read the {direction} class of slot {slot}: {os.strerror(reply)}"
                )
        return result

    def remove(self) -> None:
        """Remove the download tree from the LAN interface and delete the upload IFB device."""
        self._known = None
        try:
            lan_index = socket.if_nametoindex(self.lan)
        except OSError:
            lan_index = 0
        if lan_index:
            sock = TcSocket()
            try:
                code, message = sock.transact(
                    [encode_root_delete(lan_index, make_handle(DOWN_MAJOR, 0))]
                )[0]
            finally:
                sock.close()
            if code not in (0, errno.ENOENT, errno.EINVAL):
                raise ShaperError(f"cannot remove the download tree from {self.lan}: {message}")
        with IPRoute() as ipr:
            for index in ipr.link_lookup(ifname=self.upload_ifb):
                ipr.link("del", index=index)
