"""The shaper against the kernel, with `tc` as the independent witness (no datapath needed).

Each test gets a fresh namespace with a veth pair: the LAN side "lan0"
carries the download tree, the shaper creates the upload IFB itself.
Packets for class statistics come from a local socket whose SO_PRIORITY is
a subscriber's class id (what the datapath sets on forwarded packets).
"""

from __future__ import annotations

import os
import re
import socket
import subprocess
import time
from collections.abc import Iterator

import pytest

from desanet.errors import ShaperError, ValidationError
from desanet.gateway.lab import in_netns
from desanet.shaper import apply as shaper_apply
from desanet.shaper.apply import Shaper, available_leaves, upload_ifb_name
from desanet.shaper.diff import Operation
from desanet.shaper.plan import Link, SubscriberPlan, build_plan, classids_for_slot
from desanet.shaper.tree import HtbClass

pytestmark = pytest.mark.kernel

LAN = "lan0"
LINK = Link(down_bps=20_000_000, up_bps=10_000_000)
_RATE = re.compile(r"^(\d+)([KMG]?)bit$")
_SCALE = {"": 1, "K": 1_000, "M": 1_000_000, "G": 1_000_000_000}


def subs(n: int) -> list[SubscriberPlan]:
    return [
        SubscriberPlan(f"s{i}", i, 1_000_000 + 8_000 * i, 8_000_000, 504_000, 4_000_000)
        for i in range(1, n + 1)
    ]


@pytest.fixture
def lan_ns() -> Iterator[str]:
    name = f"dnsh{os.getpid() % 100000}x{id(object()) % 10000}"
    subprocess.run(["ip", "netns", "add", name], check=True)
    try:
        for cmd in (
            ["link", "add", LAN, "type", "veth", "peer", "name", "lan1"],
            ["link", "set", LAN, "up"],
            ["link", "set", "lan1", "up"],
            ["addr", "add", "10.9.0.1/24", "dev", LAN],
            ["neigh", "add", "10.9.0.2", "lladdr", "02:00:00:00:00:02", "dev", LAN],
        ):
            subprocess.run(["ip", "-n", name, *cmd], check=True)
        yield name
    finally:
        subprocess.run(["ip", "netns", "delete", name], check=False)


def tc(ns: str, *args: str) -> str:
    return subprocess.run(
        ["ip", "netns", "exec", ns, "tc", *args], capture_output=True, text=True, check=True
    ).stdout


def tc_classes(ns: str, dev: str) -> dict[int, tuple[int, int, int, int]]:
    """Class id -> (parent, rate bit/s, ceil bit/s, prio) as `tc class show` prints them.

    Debian 12's tc prints HTB classes as text even with -j, so the text is parsed.
    """
    classes = {}
    for line in tc(ns, "class", "show", "dev", dev).splitlines():
        words = line.split()
        if words[:2] != ["class", "htb"]:
            continue
        major, minor = (int(x or "0", 16) for x in words[2].split(":"))
        fields = {key: words[i + 1] for i, key in enumerate(words[:-1])}
        parent = fields.get("parent", f"{major:x}:0")
        pmajor, pminor = (int(x or "0", 16) for x in parent.split(":"))
        rates = []
        for key in ("rate", "ceil"):
            number, unit = _RATE.match(fields[key]).groups()  # type: ignore[union-attr]
            rates.append(int(number) * _SCALE[unit])
        classes[major << 16 | minor] = (
            pmajor << 16 | pminor,
            rates[0],
            rates[1],
            int(fields.get("prio", "0")),
        )
    return classes


def expected(classes: dict[int, HtbClass]) -> dict[int, tuple[int, int, int, int]]:
    return {
        cid: (c.parent, c.rate_bytes_ps * 8, c.ceil_bytes_ps * 8, c.prio)
        for cid, c in classes.items()
    }


def test_tc_agrees_with_the_plan_and_reapply_is_a_no_op(lan_ns: str) -> None:
    plan = build_plan(LINK, subs(6), leaf="fq_codel", rtt_ms=600.0)
    with in_netns(lan_ns):
        shaper = Shaper(LAN)
        result = shaper.apply(plan)
        ifb = upload_ifb_name(LAN)
        assert result.operations == sum(
            1 + len(t.classes) + len(t.leaves) for t in (plan.down, plan.up)
        )
        kinds = available_leaves()
        assert result.leaf_in_use in kinds
        if "fq_codel" in kinds:
            assert result.warnings == []
        else:
            assert len(result.warnings) == 1 and "fq_codel" in result.warnings[0]
        assert tc_classes(lan_ns, LAN) == expected(plan.down.classes)
        assert tc_classes(lan_ns, ifb) == expected(plan.up.classes)
        qdiscs = tc(lan_ns, "qdisc", "show", "dev", LAN)
        assert qdiscs.count(f"qdisc {result.leaf_in_use} ") == len(plan.down.leaves)

        assert shaper.apply(result.plan).operations == 0
        assert Shaper(LAN).apply(plan).operations == 0  # fresh read-back, same answer

        changed = SubscriberPlan("s3", 3, 2_000_000, 6_000_000, 504_000, 4_000_000)
        after = shaper.apply(result.plan.with_subscriber(changed))
        assert after.per_direction == {"down": 2, "up": 0}  # its class and its leaf
        want = after.plan.down.classes[classids_for_slot(3)[0]]
        assert tc_classes(lan_ns, LAN)[want.classid][1:3] == (2_000_000, 6_000_000)

        removed = shaper.apply(after.plan.without_subscriber("s5"))
        assert removed.per_direction == {"down": 1, "up": 1}
        assert classids_for_slot(5)[0] not in tc_classes(lan_ns, LAN)
        assert Shaper(LAN).apply(removed.plan).operations == 0

        shaper.remove()
        assert "htb" not in tc(lan_ns, "qdisc", "show", "dev", LAN)
        with pytest.raises(OSError):
            socket.if_nametoindex(ifb)


def test_class_stats_count_what_the_class_sent(lan_ns: str) -> None:
    plan = build_plan(LINK, subs(3), leaf="pfifo")
    with in_netns(lan_ns):
        shaper = Shaper(LAN)
        shaper.apply(plan)
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_PRIORITY, classids_for_slot(2)[0])
            for _ in range(50):
                sock.sendto(b"x" * 972, ("10.9.0.2", 9))
        # The class drains its backlog at 1 Mbit/s (about 0.4 s for these 50 packets).
        deadline = time.monotonic() + 5
        stats = shaper.class_stats()
        while stats["down"][2].backlog_packets and time.monotonic() < deadline:
            time.sleep(0.1)
            stats = shaper.class_stats()
        # One leaf by handle reads what the dump reads; slot 40 has no class.
        by_handle = shaper.class_stats_of({"down": [2, 3, 40], "up": [1]})
        shaper.remove()
    assert by_handle == {
        "down": {2: stats["down"][2], 3: stats["down"][3]},
        "up": {1: stats["up"][1]},
    }
    # 972 payload + 8 UDP + 20 IPv4 + 14 Ethernet: HTB counts frames as they leave.
    assert stats["down"][2].sent_packets == 50 and stats["down"][2].sent_bytes == 50 * 1014
    assert stats["down"][1].sent_packets == 0 and stats["down"][3].sent_bytes == 0
    assert set(stats["up"]) == {1, 2, 3}


def test_failure_midway_rolls_back_to_the_previous_tree(
    lan_ns: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    plan = build_plan(LINK, subs(4), leaf="pfifo")
    bigger = build_plan(LINK, subs(6), leaf="pfifo")
    with in_netns(lan_ns):
        Shaper(LAN).apply(plan)
        before = (tc_classes(lan_ns, LAN), tc_classes(lan_ns, upload_ifb_name(LAN)))
        real_diff = shaper_apply.diff

        calls = []

        def failing_diff(*args: object) -> list[Operation]:
            ops = real_diff(*args)  # type: ignore[arg-type]
            calls.append(len(ops))
            if len(calls) != 2:
                return ops
            # The upload pass (the second diff, after download succeeded) ends with a
            # class under a qdisc that does not exist: the kernel refuses it.
            orphan = HtbClass(0x7FFF0, 0x77777, 1000, 1000, 100_000, 100_000, 1600)
            return [*ops, Operation("add-class", orphan)]

        monkeypatch.setattr(shaper_apply, "diff", failing_diff)
        with pytest.raises(ShaperError, match="rolled back") as err:
            # A new shaper reads the trees back: its failure is final, not retried.
            Shaper(LAN).apply(bigger.with_subscriber(subs(7)[-1]))
        assert "up tree: add-class class 7:fff0" in str(err.value)
        assert calls[0] > 0  # the download tree had changed before the failure, and was undone
        assert (tc_classes(lan_ns, LAN), tc_classes(lan_ns, upload_ifb_name(LAN))) == before
        monkeypatch.setattr(shaper_apply, "diff", real_diff)
        assert Shaper(LAN).apply(plan).operations == 0
        Shaper(LAN).remove()


def test_a_tree_changed_behind_the_shapers_back_is_repaired(
    lan_ns: str, caplog: pytest.LogCaptureFixture
) -> None:
    with in_netns(lan_ns):
        shaper = Shaper(LAN)
        applied = shaper.apply(build_plan(LINK, subs(4), leaf="pfifo")).plan
        down3 = classids_for_slot(3)[0]
        tc(lan_ns, "class", "del", "dev", LAN, "classid", f"1:{down3 & 0xFFFF:x}")
        changed = SubscriberPlan("s3", 3, 2_000_000, 6_000_000, 504_000, 4_000_000)
        result = shaper.apply(applied.with_subscriber(changed))
        assert tc_classes(lan_ns, LAN)[down3][1:3] == (2_000_000, 6_000_000)
        assert "trying again against a fresh read-back" in caplog.text
        assert Shaper(LAN).apply(result.plan).operations == 0
        shaper.remove()


def test_bad_plans_never_reach_the_kernel(lan_ns: str) -> None:
    with pytest.raises(ValidationError, match="s1"):
        build_plan(LINK, [SubscriberPlan("s1", 1, 9_000_000, 8_000_000, 8, 8)])
    with in_netns(lan_ns), pytest.raises(ShaperError, match="nosuchlan"):
        Shaper("nosuchlan").apply(build_plan(LINK, subs(1)))
    assert "htb" not in tc(lan_ns, "qdisc", "show", "dev", LAN)
    links = subprocess.run(["ip", "-n", lan_ns, "link"], capture_output=True, text=True).stdout
    assert "ifb" not in links
