"""Read-back and diff against dumps saved from real kernels (tests/unit/data/shaper).

Each <name>.json describes a plan (3 subscribers) and the kernel it was
applied on; <name>_qdiscs.bin is the qdisc dump and <name>_classes_<dir>.bin
the class dumps taken right after. pfifo3 comes from the 6.18 development
kernel, fq_codel3 and cake3 from Debian's stock 6.1 kernel (the VM tier).
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest
from pyroute2.netlink.rtnl import RTM_NEWQDISC
from pyroute2.netlink.rtnl.tcmsg import tcmsg

from desanet.shaper.diff import diff
from desanet.shaper.plan import Link, ShapingPlan, SubscriberPlan, build_plan, classids_for_slot
from desanet.shaper.readback import leaf_stats, parse_qdiscs, tree_from_dumps
from desanet.shaper.tree import Tree

pytestmark = pytest.mark.unit

DATA = Path(__file__).parent / "data" / "shaper"
META = json.loads((DATA / "pfifo3.json").read_text())
SUBS = [SubscriberPlan(*row) for row in META["subscribers"]]


def saved_plan(subs: list[SubscriberPlan] = SUBS, leaf: str = "pfifo") -> ShapingPlan:
    return build_plan(Link(*META["link_bps"]), subs, leaf=leaf, rtt_ms=META["rtt_ms"])


def saved_trees(name: str = "pfifo3") -> dict[str, Tree]:
    meta = json.loads((DATA / f"{name}.json").read_text())
    qdiscs = [(DATA / f"{name}_qdiscs.bin").read_bytes()]
    return {
        d: tree_from_dumps([(DATA / f"{name}_classes_{d}.bin").read_bytes()], qdiscs, index)
        for d, index in meta["ifindex"].items()
    }


@pytest.mark.parametrize("name", ["pfifo3", "fq_codel3", "cake3"])
def test_saved_read_backs_equal_their_plans(name: str) -> None:
    meta = json.loads((DATA / f"{name}.json").read_text())
    subs = [SubscriberPlan(*row) for row in meta["subscribers"]]
    plan = build_plan(Link(*meta["link_bps"]), subs, leaf=meta["leaf"], rtt_ms=meta["rtt_ms"])
    actual = saved_trees(name)
    for direction in ("down", "up"):
        assert actual[direction].classes == plan.tree(direction).classes
        leaves = actual[direction].leaves
        assert {leaf.kind for leaf in leaves.values()} == {meta["leaf"]}
        assert diff(plan.tree(direction), actual[direction]) == []
    # fq_codel and cake report options desanet does not set (drop_batch_size, diffserv_mode).
    assert meta["leaf"] == "pfifo" or len(next(iter(actual["down"].leaves.values())).options) > len(
        next(iter(plan.down.leaves.values())).options
    )


def verbs(ops) -> list[tuple[str, int]]:
    return [
        (op.verb, getattr(op.subject, "classid", getattr(op.subject, "parent", 0))) for op in ops
    ]


def test_read_back_equals_the_plan_and_reapply_is_a_no_op() -> None:
    plan, actual = saved_plan(), saved_trees()
    for direction in ("down", "up"):
        assert actual[direction].root == plan.tree(direction).root
        assert actual[direction].classes == plan.tree(direction).classes
        assert diff(plan.tree(direction), actual[direction]) == []


def test_changing_one_subscriber_touches_only_its_class_and_leaf() -> None:
    changed = SubscriberPlan("s2", 2, 3_000_000, 8_000_000, 500_000, 5_000_000)
    plan, actual = saved_plan().with_subscriber(changed), saved_trees()
    down2, _ = classids_for_slot(2)
    assert verbs(diff(plan.down, actual["down"])) == [("change-class", down2), ("put-leaf", down2)]
    assert diff(plan.up, actual["up"]) == []


def test_a_new_link_rate_changes_the_root_class_once() -> None:
    # The kernel keeps an inner class's quantum from its creation: a read-back after
    # a link change still shows the old one, and that must not count as a difference.
    faster = build_plan(Link(40_000_000, 10_000_000), SUBS, leaf="pfifo", rtt_ms=META["rtt_ms"])
    actual = saved_trees()["down"]
    root_id = next(
        c.classid for c in faster.down.classes.values() if c.parent == faster.down.root.handle
    )
    assert ("change-class", root_id) in verbs(diff(faster.down, actual))
    kernel_after = dataclasses.replace(
        faster.down.classes[root_id], quantum=actual.classes[root_id].quantum
    )
    assert kernel_after.quantum != faster.down.classes[root_id].quantum
    actual.classes[root_id] = kernel_after
    leftovers = [(v, cid) for v, cid in verbs(diff(faster.down, actual)) if cid == root_id]
    assert leftovers == []


def test_adding_and_removing_subscribers() -> None:
    plan = saved_plan([*SUBS[:2], SubscriberPlan("s9", 9, 1_000_000, 2_000_000, 8, 8)])
    ops = verbs(diff(plan.down, saved_trees()["down"]))
    s3, s9 = classids_for_slot(3)[0], classids_for_slot(9)[0]
    assert ops == [("delete-class", s3), ("add-class", s9), ("put-leaf", s9)]


def test_another_leaf_kind_replaces_each_leaf() -> None:
    ops = diff(saved_plan(leaf="fq_codel").down, saved_trees()["down"])
    assert [op.verb for op in ops] == ["delete-leaf", "put-leaf"] * 4
    assert {op.subject.kind for op in ops if op.verb == "put-leaf"} == {"fq_codel"}


def test_missing_or_foreign_root_rebuilds_the_tree() -> None:
    plan = saved_plan()
    ops = diff(plan.down, Tree(root=None, foreign_root="pfifo_fast 0:"))
    assert ops[0].verb == "add-root"
    assert len(ops) == 1 + len(plan.down.classes) + len(plan.down.leaves)
    other = saved_trees()["up"]  # an HTB root with another handle: ours is deleted first
    ops = diff(plan.down, other)
    assert [op.verb for op in ops[:2]] == ["delete-root", "add-root"]


def test_stats_of_every_subscriber_leaf() -> None:
    chunks = [(DATA / "pfifo3_qdiscs.bin").read_bytes()]
    down, up = META["ifindex"]["down"], META["ifindex"]["up"]
    both = leaf_stats(chunks, {down: 1, up: 2})
    assert set(both[up]) == {classids_for_slot(s.slot)[1] for s in SUBS} | {0x2000F}
    stats = both[down]
    assert {classids_for_slot(s.slot)[0] for s in SUBS} <= set(stats)
    assert all(s.sent_bytes == 0 and s.backlog_packets == 0 for s in stats.values())


def kernel_like_dump(kind: str, parent: int, handle: int, options: list) -> bytes:
    msg = tcmsg()
    msg["header"]["type"] = RTM_NEWQDISC
    msg["index"], msg["handle"], msg["parent"] = 7, handle, parent
    msg["attrs"] = [["TCA_KIND", kind], ["TCA_OPTIONS", {"attrs": options}]]
    msg.encode()
    return bytes(msg.data)


@pytest.mark.parametrize("kind", ["fq_codel", "cake"])
def test_fq_codel_and_cake_leaves_read_back(kind: str) -> None:
    plan = saved_plan(leaf=kind)
    want = plan.down.leaves[classids_for_slot(1)[0]]
    prefix = f"TCA_{kind.upper()}_"
    extra = [[f"{prefix}DROP_BATCH_SIZE", 64]] if kind == "fq_codel" else [[f"{prefix}NAT", 0]]
    options = [[prefix + name.upper(), value] for name, value in want.options] + extra
    data = kernel_like_dump(kind, want.parent, want.handle, options)
    _, _, leaves = parse_qdiscs([data], 7)
    assert want.satisfied_by(leaves[want.parent])
    tampered = [[n, v + 128 if n.endswith("TARGET") else v] for n, v in options]
    _, _, leaves = parse_qdiscs([kernel_like_dump(kind, want.parent, want.handle, tampered)], 7)
    assert not want.satisfied_by(leaves[want.parent])
