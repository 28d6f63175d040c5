"""The packed tc messages decode, through pyroute2's own tcmsg parser, to what the plan says."""

from __future__ import annotations

import struct

import pytest
from pyroute2.netlink import NLM_F_ACK, NLM_F_DUMP, NLM_F_ECHO
from pyroute2.netlink.rtnl import RTM_DELTCLASS, RTM_GETQDISC, RTM_NEWQDISC, RTM_NEWTCLASS
from pyroute2.netlink.rtnl.tcmsg import tcmsg

from desanet.shaper import netlink
from desanet.shaper.diff import Operation
from desanet.shaper.plan import Link, SubscriberPlan, build_plan, classids_for_slot
from desanet.shaper.readback import ClassStats, leaf_stats_of_reply, parse_classes, parse_qdiscs
from desanet.shaper.tree import TC_H_ROOT

pytestmark = pytest.mark.unit

PLAN = build_plan(
    Link(20_000_000, 10_000_000),
    [SubscriberPlan("s7", 7, 256_000, 2_000_000, 128_000, 1_000_000)],
    rtt_ms=600.0,
)
DOWN7 = classids_for_slot(7)[0]


def decode(data: bytes) -> tcmsg:
    msg = tcmsg(data)
    msg.decode()
    return msg


def test_class_add_decodes_to_the_planned_rates() -> None:
    cls = PLAN.down.classes[DOWN7]
    msg = decode(netlink.encode_class_add(4, cls))
    assert msg["header"]["type"] == RTM_NEWTCLASS
    assert (msg["index"], msg["handle"], msg["parent"]) == (4, DOWN7, 0x10001)
    assert msg.get_attr("TCA_KIND") == "htb"
    parms = msg.get_attr("TCA_OPTIONS").get_attr("TCA_HTB_PARMS")
    assert parms["rate"] == 256_000 // 8 and parms["ceil"] == 2_000_000 // 8
    assert parms["buffer"] == cls.buffer_ticks and parms["cbuffer"] == cls.cbuffer_ticks
    assert parms["quantum"] == cls.quantum and parms["prio"] == 0
    assert len(netlink.encode_class_add(4, cls)) == msg["header"]["length"]


def test_class_delete_and_root_add() -> None:
    cls = PLAN.down.classes[DOWN7]
    msg = decode(netlink.encode_class_delete(4, cls))
    assert msg["header"]["type"] == RTM_DELTCLASS and msg["handle"] == DOWN7
    assert PLAN.down.root is not None
    root = decode(netlink.encode_root_add(4, PLAN.down.root))
    assert (root["handle"], root["parent"]) == (0x10000, TC_H_ROOT)
    init = root.get_attr("TCA_OPTIONS").get_attr("TCA_HTB_INIT")
    assert init["defcls"] == 0xF and init["rate2quantum"] == 10 and init["version"] == 3


@pytest.mark.parametrize("kind", ["fq_codel", "cake", "pfifo"])
def test_leaf_messages_round_trip_through_pyroute2_and_our_reader(kind: str) -> None:
    leaf = PLAN.with_leaf(kind).down.leaves[DOWN7]
    data = Operation("put-leaf", leaf, creating=True).encode(9)
    msg = decode(data)
    assert msg["header"]["type"] == RTM_NEWQDISC
    assert (msg["handle"], msg["parent"]) == (leaf.handle, DOWN7)
    assert msg.get_attr("TCA_KIND") == kind
    if kind == "pfifo":
        assert msg.get_attr("TCA_OPTIONS")["limit"] == dict(leaf.options)["limit"]
    else:
        options = msg.get_attr("TCA_OPTIONS")
        for name, value in leaf.options:
            assert options.get_attr(f"TCA_{kind.upper()}_{name.upper()}") == value
    # Our reader understands the same bytes as a dump entry (kernel dumps use this layout).
    _, _, leaves = parse_qdiscs([data], 9)
    assert leaves[DOWN7].options == leaf.options and leaves[DOWN7].kind == kind


def test_changing_an_fq_codel_leaf_leaves_its_flow_count_alone() -> None:
    leaf = PLAN.down.leaves[DOWN7]
    created = decode(Operation("put-leaf", leaf, creating=True).encode(1))
    changed = decode(Operation("put-leaf", leaf, creating=False).encode(1))
    assert created.get_attr("TCA_OPTIONS").get_attr("TCA_FQ_CODEL_FLOWS") == 64
    assert changed.get_attr("TCA_OPTIONS").get_attr("TCA_FQ_CODEL_FLOWS") is None


def test_iter_attrs_stops_on_malformed_lengths() -> None:
    assert list(netlink.iter_attrs(b"\x02\x00\x01\x00" + b"\0" * 8, 0, 12)) == []


def test_classes_above_32_bit_rates_read_back() -> None:
    # Another tool's 40 Gbit/s class: rates in TCA_HTB_RATE64/CEIL64, off the fixed layout.
    msg = tcmsg()
    msg["header"]["type"] = RTM_NEWTCLASS
    msg["index"], msg["handle"], msg["parent"] = 3, 0x10020, TC_H_ROOT
    parms = {"rate": 0xFFFFFFFF, "ceil": 0xFFFFFFFF, "buffer": 100, "cbuffer": 200, "prio": 3}
    msg["attrs"] = [
        ["TCA_KIND", "htb"],
        [
            "TCA_OPTIONS",
            {
                "attrs": [
                    ["TCA_HTB_PARMS", {**parms, "quantum": 200_000}],
                    ["TCA_HTB_RATE64", 5_000_000_000],
                    ["TCA_HTB_CEIL64", 6_000_000_000],
                ]
            },
        ],
    ]
    msg.encode()
    (cls,) = parse_classes([bytes(msg.data)]).values()
    assert (cls.parent, cls.rate_bytes_ps, cls.ceil_bytes_ps) == (0x10000, 5_000_000_000, 6 * 10**9)
    assert (cls.buffer_ticks, cls.cbuffer_ticks, cls.prio) == (100, 200, 3)
    ours = netlink.encode_class_add(3, PLAN.down.classes[DOWN7])
    assert parse_classes([ours])[DOWN7] == PLAN.down.classes[DOWN7]  # the fixed layout


def test_leaf_get_names_one_leaf_and_asks_for_its_answer() -> None:
    msg = decode(netlink.encode_leaf_get(4, DOWN7))
    assert msg["header"]["type"] == RTM_GETQDISC
    flags = msg["header"]["flags"]
    # Not a dump; the answer comes back to us (echo) and ends with an ack.
    assert flags & NLM_F_DUMP != NLM_F_DUMP and flags & NLM_F_ECHO and flags & NLM_F_ACK
    assert (msg["index"], msg["parent"], msg["handle"]) == (4, DOWN7, 0)


def test_a_leaf_reply_decodes_to_its_statistics() -> None:
    # A reply as the kernel sends it: a qdisc message with basic and queue statistics.
    basic = netlink._attr(netlink.TCA_STATS_BASIC, struct.pack("=QI", 50 * 1014, 50) + b"\0" * 4)
    queue = netlink._attr(netlink.TCA_STATS_QUEUE, struct.pack("=IIIII", 3, 3042, 7, 0, 9))
    body = netlink._kind_attr("pfifo") + netlink._attr(netlink.TCA_STATS2, basic + queue)
    reply = netlink._message(RTM_NEWQDISC, 0, 4, 0x160000, DOWN7, body)
    stats = leaf_stats_of_reply(reply, netlink.NLMSG_HDR.size, len(reply))
    assert stats == ClassStats(50 * 1014, 50, 7, 9, 3042, 3)
    assert decode(reply).get_attr("TCA_STATS2").get_attr("TCA_STATS_BASIC")["bytes"] == 50 * 1014
