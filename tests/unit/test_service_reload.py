"""Reloads apply only complete, settled files; removed subscribers keep their state a while.

And the wall-clock case: a gateway booting with a wrong date neither starts a
new quota month nor lifts a throttle. On tests/unit/service_lab.py.
"""

from __future__ import annotations

import pytest

from desanet.ebpf.abi import SLOT_BLOCKED
from desanet.gateway.compose import steady_clock
from desanet.gateway.service import GatewayService
from desanet.gateway.status import read_snapshot
from tests.unit.service_lab import HEADER, S1, S2, S3, Lab, control

pytestmark = pytest.mark.unit

DAY_S = 86_400
JAN_2000 = 946_684_800_000


def ids(lab: Lab) -> list[str]:
    return [s.id for s in read_snapshot(lab.folder / "state").subscribers]


def test_a_file_still_being_written_in_place_is_applied_only_once_complete(
    lab: Lab, running: GatewayService
) -> None:
    control(running, lab, {"op": "suspend", "sub": "s3", "mode": "block"})
    s4 = "s4,D,10.0.0.4,1mbit,4mbit,256kbit,1mbit,50GB"
    steered = {a: lab.datapath.slot_of(a) for a in ("10.0.0.1", "10.0.0.2", "10.0.0.3")}

    def half_a_settle_period() -> None:
        lab.tick(running, seconds=0.5)
        # Nobody ever lost their steering while the file was incomplete.
        assert {a: lab.datapath.slot_of(a) for a in steered} == steered
        assert lab.datapath.slot_of("10.0.0.4") == 0

    with (lab.folder / "subscribers.csv").open("w") as f:  # in place, as editors and scp do
        for piece in (HEADER + S1 + "\n", S2 + "\n" + S3 + "\n", s4[:-1]):  # "50GB" cut to "50G"
            f.write(piece)
            f.flush()
            half_a_settle_period()
        half_a_settle_period()
        f.write("B\n")
    half_a_settle_period()
    half_a_settle_period()  # unchanged for half the settle period only
    lab.tick(running, seconds=0.5)
    assert lab.datapath.slot_of("10.0.0.4") == 4
    lab.tick(running)
    snap = read_snapshot(lab.folder / "state")
    assert [s.id for s in snap.subscribers] == ["s1", "s2", "s3", "s4"]
    assert snap.subscribers[3].quota_bytes == 50_000_000_000 and snap.warnings == []
    assert lab.datapath.slots[steered["10.0.0.3"]].flags == SLOT_BLOCKED


def test_a_file_cut_inside_a_line_is_refused_and_reported(
    lab: Lab, running: GatewayService
) -> None:
    path = lab.folder / "subscribers.csv"
    path.write_text(HEADER + S2 + "\n" + S1[:-2])  # s1's "1MB" quota cut to "1": it parses
    lab.settle(running)
    lab.tick(running)
    snap = read_snapshot(lab.folder / "state")
    assert [s.id for s in snap.subscribers] == ["s1", "s2", "s3"]
    assert snap.subscribers[0].quota_bytes == 1_000_000
    assert any("does not end with a newline" in w for w in snap.warnings), snap.warnings
    assert lab.datapath.slot_of("10.0.0.3") == 3


def test_a_subscriber_missing_from_the_file_comes_back_with_its_state(
    lab: Lab, running: GatewayService
) -> None:
    control(running, lab, {"op": "suspend", "sub": "s3", "mode": "wall"})
    control(running, lab, {"op": "quota", "sub": "s3", "bytes": "2GB"})
    lab.datapath.send("10.0.0.3", up=300, down=700)
    lab.tick(running)
    lab.write(S1, S2)  # a mistaken file: s3 is missing
    lab.settle(running)
    assert ids(lab) == ["s1", "s2"] and lab.datapath.slot_of("10.0.0.3") == 0
    lab.write(S1, S2, S3)  # the right one
    lab.settle(running)
    row = read_snapshot(lab.folder / "state").subscribers[2]
    assert (row.id, row.slot, row.state, row.quota_bytes) == ("s3", 3, "suspended (wall)", 2e9)
    assert lab.shaper.ceilings_bps(3) == (64_000, 32_000)
    lab.datapath.send("10.0.0.3", up=1)
    lab.tick(running)
    assert lab.billed()["s3"] == (301, 700)  # its totals went on where they were


def test_after_the_grace_period_a_removed_subscribers_state_is_forgotten(
    lab: Lab, running: GatewayService
) -> None:
    control(running, lab, {"op": "suspend", "sub": "s3", "mode": "block"})
    lab.write(S1, S2)
    lab.settle(running)
    lab.tick(running, seconds=7 * DAY_S)
    stored = (lab.folder / "state" / "slots.json").read_text()
    assert '"retired": {}' in stored
    lab.write(S1, S2, S3)
    lab.settle(running)
    row = read_snapshot(lab.folder / "state").subscribers[2]
    assert (row.id, row.state, row.slot) == ("s3", "active", 4)  # a new subscriber now
    assert lab.datapath.slots[4].flags == 0


def test_the_grace_period_holds_across_a_restart(lab: Lab) -> None:
    lab.write(S1, S2, S3)
    first = lab.service()
    first.start()
    control(first, lab, {"op": "suspend", "sub": "s2", "mode": "block"})
    first.close()
    lab.write(S1, S3)  # s2 removed while the service is down
    again = lab.service()
    again.start()
    try:
        lab.tick(again)
        assert ids(lab) == ["s1", "s3"]
        lab.write(S1, S2, S3)
        lab.settle(again)
        assert read_snapshot(lab.folder / "state").subscribers[1].state == "suspended (block)"
        assert lab.datapath.slots[2].flags == SLOT_BLOCKED
    finally:
        again.close()


def test_a_wrong_boot_date_starts_no_new_quota_month(lab: Lab) -> None:
    lab.write(S1, S2, S3)
    first = lab.service()
    first.start()
    try:
        lab.tick(first)
        lab.datapath.send("10.0.0.1", down=1_100_000)  # past s1's 1 MB quota in May 2026
        lab.tick(first)
        assert lab.shaper.ceilings_bps(1) == (1_000_000, 256_000)
    finally:
        first.close()
    # The gateway reboots without a real-time clock: the system says January 2000, unsynced.
    mono_ms = [0]
    lab.make_clock = lambda meter: steady_clock(
        meter,
        wall_ms=lambda: JAN_2000 + mono_ms[0],
        mono_ms=lambda: mono_ms[0],
        synchronized=lambda: False,
    )
    again = lab.service()
    again.start()
    try:
        for _ in range(3):
            mono_ms[0] += 1000
            lab.tick(again)
        snap = read_snapshot(lab.folder / "state")
        assert snap.t_ms > 1_779_000_000_000  # stamped after the journal's last interval
        assert snap.subscribers[0].state == "fair-use"
        assert lab.shaper.ceilings_bps(1) == (1_000_000, 256_000)
        assert [e for e in lab.events() if e[1] == "period" and e[0] == "s1"] == []
    finally:
        again.close()


def test_a_reload_the_kernel_refuses_is_retried_until_it_holds(
    lab: Lab, running: GatewayService
) -> None:
    lab.shaper.refuse = "RTM_NEWTCLASS: No buffer space available"
    lab.write(S1, S2, "s4,D,10.0.0.4,1mbit,4mbit,256kbit,1mbit,")
    lab.settle(running)
    lab.tick(running)
    snap = read_snapshot(lab.folder / "state")
    assert snap.failures["reload"] == 1 and snap.failures["shaper"] >= 1
    lab.shaper.refuse = None
    lab.tick(running)
    assert lab.datapath.slot_of("10.0.0.4") == 4 and lab.datapath.slot_of("10.0.0.3") == 0
    assert set(lab.shaper.applied[-1].subscribers) == {"s1", "s2", "s4"}
    lab.datapath.send("10.0.0.4", up=5)
    lab.tick(running)
    assert lab.billed()["s4"] == (5, 0)
    assert read_snapshot(lab.folder / "state").warnings == []
