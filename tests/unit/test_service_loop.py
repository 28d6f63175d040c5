"""The service loop without root: reload, quota periods, stale slots and control requests.

Only the kernel parts are fakes (tests/unit/service_lab.py); the usage stream
and the control endpoint are the real ones on loopback, so the tests read what
billing would receive.
"""

from __future__ import annotations

import os
from typing import Any

import pytest

from desanet.ebpf.abi import SLOT_BLOCKED
from desanet.ebpf.datapath import Provision
from desanet.errors import ControlError, DesanetError, StateError
from desanet.gateway.pidlock import running_pid
from desanet.gateway.service import GatewayService
from desanet.gateway.status import read_snapshot, render
from desanet.meter.client import UsageClient
from desanet.meter.keys import ClientSecurity, generate_keypair, load_keypair
from tests.unit.service_lab import (
    CONFIG,
    HEADER,
    JUNE_2026,
    S1,
    S2,
    S3,
    FakeDatapath,
    Lab,
    control,
)

pytestmark = pytest.mark.unit


def test_reload_applies_added_removed_and_readdressed(lab: Lab, running: GatewayService) -> None:
    slot_of_s3 = lab.datapath.slot_of("10.0.0.3")
    assert {lab.datapath.slot_of(f"10.0.0.{i}") for i in (1, 2, 3)} == {1, 2, 3}
    # s1 moves to 10.0.1.1, s3 leaves, s4 arrives.
    lab.write(S1.replace("10.0.0.1", "10.0.1.1"), S2, "s4,D,10.0.0.4,1mbit,4mbit,256kbit,1mbit,")
    lab.settle(running)
    assert lab.datapath.slot_of("10.0.0.1") == 0 and lab.datapath.slot_of("10.0.1.1") == 1
    assert lab.datapath.slot_of("10.0.0.3") == lab.datapath.slot_of("fd00::3") == 0
    s4 = lab.datapath.slot_of("10.0.0.4")
    assert s4 not in (0, 1, 2, slot_of_s3)  # a never-used slot before a freed one
    assert lab.shaper.ceilings_bps(s4) == (4_000_000, 1_000_000)
    assert set(lab.shaper.applied[-1].subscribers) == {"s1", "s2", "s4"}
    lab.datapath.send("10.0.1.1", up=1_000, down=5_000)
    lab.datapath.send("10.0.0.4", up=300, down=700)
    lab.datapath.send("10.0.0.3", down=9_999)  # s3's old address: nobody's now
    lab.tick(running)
    assert lab.billed() == {"s1": (1_000, 5_000), "s4": (300, 700)}
    snap = read_snapshot(lab.folder / "state")
    assert [s.id for s in snap.subscribers] == ["s1", "s2", "s4"]


def test_a_bad_file_changes_nothing_and_the_service_keeps_running(
    lab: Lab, running: GatewayService
) -> None:
    steering, applied = dict(lab.datapath.steering), len(lab.shaper.applied)
    slots_file = (lab.folder / "state" / "slots.json").read_bytes()
    for rows, error in (
        ((S1, S1.replace("10.0.0.1", "10.0.0.9")), "subscriber s1 already defined on line 2"),
        # s5's guarantee does not fit the link beside everyone else's: the slot table,
        # computed for s5, must not be kept.
        (
            (S1, S2, S3, "s5,E,10.0.0.5,17mbit,20mbit,256kbit,1mbit,"),
            "subscriber s5: its download min 17.0 Mbit/s brings the sum",
        ),
    ):
        lab.write(*rows)
        lab.settle(running)
        assert lab.datapath.steering == steering and len(lab.shaper.applied) == applied
        assert (lab.folder / "state" / "slots.json").read_bytes() == slots_file
        snap = read_snapshot(lab.folder / "state")
        assert [s.id for s in snap.subscribers] == ["s1", "s2", "s3"]
        assert [w for w in snap.warnings if error in w and "not applied" in w], snap.warnings
    lab.datapath.send("10.0.0.2", up=10, down=20)
    lab.tick(running)
    assert lab.billed()["s2"] == (10, 20)
    # The refused files left no trace: the next subscriber gets the next slot.
    lab.write(S1, S2, S3, "s6,F,10.0.0.6,1mbit,2mbit,256kbit,1mbit,")
    lab.settle(running)
    assert lab.datapath.slot_of("10.0.0.6") == 4 and lab.datapath.slot_of("10.0.0.3") == 3
    assert read_snapshot(lab.folder / "state").warnings == []


def test_quota_throttles_and_a_new_month_lifts_it(lab: Lab, running: GatewayService) -> None:
    s1 = lab.datapath.slot_of("10.0.0.1")
    lab.tick(running)  # the first pass opens May's period for everyone
    lab.datapath.send("10.0.0.1", up=400_000, down=500_000)
    lab.tick(running)
    assert lab.shaper.ceilings_bps(s1) == (10_000_000, 2_000_000)
    lab.datapath.send("10.0.0.1", down=200_000)  # 1.1 MB in May: past the 1 MB quota
    lab.tick(running)
    assert lab.shaper.ceilings_bps(s1) == (1_000_000, 256_000)  # [control] fair_use_*
    assert lab.datapath.slots[s1].flags == 0  # throttled, not blocked
    row = read_snapshot(lab.folder / "state").subscribers[0]
    assert (row.id, row.state, row.period_bytes) == ("s1", "fair-use", 1_100_000)
    lab.clock.wall_ms = JUNE_2026
    lab.tick(running)
    assert lab.shaper.ceilings_bps(s1) == (10_000_000, 2_000_000)
    row = read_snapshot(lab.folder / "state").subscribers[0]
    assert (row.state, row.period_bytes) == ("active", 0)
    events = lab.events()
    assert events.index(("s1", "throttled")) < events.index(("s1", "period"))
    assert [e for e in events if e[0] != "s1"] == [("s2", "period"), ("s3", "period")]


def test_a_slot_nobody_holds_is_unprovisioned_at_start(lab: Lab) -> None:
    # The kernel still steers slot 9 (a subscriber removed while the service was down).
    lab.datapath = FakeDatapath({9: ["10.0.0.99/32"]})
    lab.write(S1, S2)
    service = lab.service()
    service.start()
    try:
        assert lab.datapath.slot_of("10.0.0.99") == 0
        assert 9 not in lab.datapath.prefixes() and 9 not in lab.datapath.slots
        lab.datapath.send("10.0.0.99", up=5_000)
        lab.datapath.send("10.0.0.1", up=100)
        lab.tick(service)
        assert lab.billed() == {"s1": (100, 0)}
    finally:
        service.close()


def test_a_mac_only_slot_nobody_holds_is_unprovisioned_at_start(lab: Lab) -> None:
    # The kernel still follows a removed MAC-only subscriber's device into slot 9.
    lab.datapath.slots[9] = Provision(9, (), 0, 0, 0, ("02:00:00:00:00:09",))
    lab.write(S1, S2)
    service = lab.service()
    service.start()
    try:
        assert 9 not in lab.datapath.macs() and 9 not in lab.datapath.slots
    finally:
        service.close()


def test_control_requests_reach_the_shaper_and_the_datapath(
    lab: Lab, running: GatewayService
) -> None:
    s2 = lab.datapath.slot_of("10.0.0.2")
    plan = {"op": "plan", "sub": "s2", "down_min": "1mbit", "down_max": "4mbit"}
    reply = control(running, lab, {**plan, "up_min": "256kbit", "up_max": "1mbit"})
    assert reply["ok"] is True and reply["plan"]["down_max_bps"] == 4_000_000
    assert lab.shaper.ceilings_bps(s2) == (4_000_000, 1_000_000)
    reply = control(running, lab, {"op": "suspend", "sub": "s2"})
    assert reply["state"] == "suspended (block)"
    assert lab.datapath.slots[s2].flags == SLOT_BLOCKED
    assert lab.datapath.slots[s2].prefixes == ("10.0.0.2",)
    lab.tick(running)
    assert ("s2", "plan") in lab.events() and ("s2", "suspend") in lab.events()


def test_a_refused_request_changes_nothing(lab: Lab, running: GatewayService) -> None:
    applied, slots = len(lab.shaper.applied), dict(lab.datapath.slots)
    stored = (lab.folder / "state" / "control.sqlite").read_bytes()
    for body in (
        {"op": "plan", "sub": "s2", "down_min": "fast"},
        {"op": "plan", "sub": "s2", "down_min": "19mbit", "down_max": "20mbit"}
        | {"up_min": "256kbit", "up_max": "1mbit"},
        {"op": "suspend", "sub": "s9"},
        {"op": "suspend", "sub": "s2", "mode": "drop"},
    ):
        reply = control(running, lab, body)
        assert reply["ok"] is False and reply["error"]
    assert len(lab.shaper.applied) == applied and lab.datapath.slots == slots
    assert (lab.folder / "state" / "control.sqlite").read_bytes() == stored
    lab.datapath.send("10.0.0.2", up=64)
    lab.tick(running)
    assert lab.billed() == {"s2": (64, 0)} and lab.events() == []


def test_control_changes_survive_a_restart(lab: Lab) -> None:
    lab.write(S1, S2, S3)
    first = lab.service()
    first.start()
    try:
        control(first, lab, {"op": "suspend", "sub": "s3", "mode": "wall"})
    finally:
        first.close()
    lab.datapath = FakeDatapath()  # as after a reboot: nothing in the kernel
    again = lab.service()
    again.start()
    try:
        s3 = lab.datapath.slot_of("10.0.0.3")
        assert s3 == 3 and lab.shaper.ceilings_bps(s3) == (64_000, 32_000)  # [control] wall_*
        assert read_snapshot(lab.folder / "state").subscribers[2].state == "suspended (wall)"
    finally:
        again.close()


def test_the_state_directory_is_locked_for_the_life_of_the_service(lab: Lab) -> None:
    lab.write(S1)
    first = lab.service()
    first.start()
    try:
        assert running_pid(lab.folder / "state") == os.getpid()
        with pytest.raises(DesanetError, match=r"another `desanet run` \(pid \d+\) uses .*state"):
            lab.service().start()
    finally:
        first.close()
    assert running_pid(lab.folder / "state") is None
    again = lab.service()
    again.start()  # the lock file left behind does not block a restart
    again.close()


def test_damaged_control_state_stops_the_service_naming_the_file(lab: Lab) -> None:
    lab.write(S1)
    state = lab.folder / "state"
    state.mkdir()
    (state / "control.sqlite").write_bytes(b"SQLite format 3\x00" + bytes(range(256)) * 8)
    with pytest.raises(StateError, match=rf"{state / 'control.sqlite'}: the control state is"):
        lab.service()


def test_hostile_requests_are_refused_and_the_service_keeps_answering(
    lab: Lab, running: GatewayService
) -> None:
    stored = (lab.folder / "state" / "control.sqlite").read_bytes()
    hostile: list[Any] = [
        {"op": "plan", "sub": "s1", "down_min": "1" * 309 + "mbit", "down_max": "2mbit"},
        {"op": "quota", "sub": "s1", "bytes": "9" * 100},
        {"op": "quota", "sub": "s1", "bytes": 2**64 - 1},
        {"op": "suspend", "sub": "s1", "mod": "block"},
        {"op": {"nested": ["map"]}, "sub": None},
        [1, 2, 3],
        "plan",
        None,
    ]
    for body in hostile:
        reply = control(running, lab, body)
        assert reply["ok"] is False and reply["error"], body
    assert (lab.folder / "state" / "control.sqlite").read_bytes() == stored
    reply = control(running, lab, {"op": "show", "sub": "s1"})
    assert reply["ok"] is True and reply["state"] == "active" and reply["applied"] is True


def test_an_error_inside_the_gateway_is_one_error_reply(
    lab: Lab, running: GatewayService, monkeypatch: pytest.MonkeyPatch, caplog: Any
) -> None:
    def broken(*args: object) -> None:
        raise RuntimeError("a bug")

    monkeypatch.setattr("desanet.gateway.control_requests.changed_record", broken)
    reply = control(running, lab, {"op": "resume", "sub": "s1"})
    assert reply == {"ok": False, "error": "nothing changed: a bug"}
    assert [r.message for r in caplog.records if "a bug" in r.message] == [
        "control request refused by an error: RuntimeError: a bug"
    ]
    monkeypatch.undo()
    assert control(running, lab, {"op": "show", "sub": "s1"})["ok"] is True


def test_a_change_the_kernel_refuses_is_recorded_and_said_so(lab: Lab) -> None:
    lab.write(S1, S2, S3)
    first = lab.service()
    first.start()
    try:
        lab.shaper.refuse = "RTM_NEWTCLASS: No buffer space available"
        reply = control(first, lab, {"op": "suspend", "sub": "s2", "mode": "wall"})
        assert reply["ok"] is True and reply["state"] == "suspended (wall)"
        assert reply["applied"] is False and "No buffer space" in reply["error"]
        assert control(first, lab, {"op": "show", "sub": "s2"})["applied"] is False
        lab.shaper.refuse = None
    finally:
        first.close()
    again = lab.service()
    again.start()  # the recorded change is enforced at the next start
    try:
        s2 = lab.datapath.slot_of("10.0.0.2")
        assert lab.shaper.ceilings_bps(s2) == (64_000, 32_000)
        assert control(again, lab, {"op": "show", "sub": "s2"})["applied"] is True
    finally:
        again.close()


def test_a_subscribers_file_that_is_not_utf8_is_refused_on_reload(
    lab: Lab, running: GatewayService
) -> None:
    (lab.folder / "subscribers.csv").write_bytes(
        (HEADER + S1.replace(",A,", ",Andr\xe9,") + "\n").encode("latin-1")
    )
    running.request_reload()
    lab.settle(running)
    snap = read_snapshot(lab.folder / "state")
    assert [s.id for s in snap.subscribers] == ["s1", "s2", "s3"]
    assert any("subscribers.csv:2: byte 62 is not UTF-8" in w for w in snap.warnings), snap.warnings
    assert control(running, lab, {"op": "show", "sub": "s3"})["ok"] is True


def curve(lab: Lab, control_keys: bool = True) -> tuple[ClientSecurity, ClientSecurity]:
    """Switch the lab to CURVE: a reader key and a controller key, each in its own list."""
    generate_keypair(lab.folder / "keys", "gateway")
    generate_keypair(lab.folder / "readers", "billing")
    generate_keypair(lab.folder / "controllers", "operator")
    control = 'allowed_keys = "controllers"\n' if control_keys else ""
    (lab.folder / "gateway.toml").write_text(
        CONFIG.replace(
            "plaintext = true",
            'secret_key = "keys/gateway.key_secret"\nallowed_keys = "readers"',
        ).replace('suspend = "block"\n', f'suspend = "block"\n{control}')
    )
    server = load_keypair(lab.folder / "keys" / "gateway.key").public
    return (
        ClientSecurity(server, load_keypair(lab.folder / "readers" / "billing.key_secret")),
        ClientSecurity(server, load_keypair(lab.folder / "controllers" / "operator.key_secret")),
    )


def test_a_readers_key_reads_usage_and_cannot_change_anything(lab: Lab) -> None:
    reader, controller = curve(lab)
    lab.write(S1, S2)
    service = lab.service()
    service.start()
    try:
        with pytest.raises(ControlError, match="no reply"):
            control(service, lab, {"op": "suspend", "sub": "s1"}, reader, timeout_ms=500)
        assert lab.datapath.slots[1].flags == 0
        reply = control(service, lab, {"op": "suspend", "sub": "s2"}, controller)
        assert reply["ok"] is True and lab.datapath.slots[2].flags == SLOT_BLOCKED
        lab.datapath.send("10.0.0.1", up=77)
        lab.tick(service)
        assert lab.meter is not None
        usage, replay = lab.meter.usage_endpoint, lab.meter.replay_endpoint
        with UsageClient(usage, replay, security=reader) as client:
            assert client.snapshot().totals["s1"] == (77, 0)
            events = [(e.sub, e.kind) for m in client.messages(1, follow=False) for e in m.events]
        assert events == [("s2", "suspend")]
    finally:
        service.close()


def test_without_control_keys_nobody_may_control(lab: Lab, caplog: Any) -> None:
    reader, controller = curve(lab, control_keys=False)
    lab.write(S1)
    service = lab.service()
    assert "no [control] allowed_keys: no client may change plans" in caplog.text
    service.start()
    try:
        for who in (reader, controller):
            with pytest.raises(ControlError, match="no reply"):
                control(service, lab, {"op": "suspend", "sub": "s1"}, who, timeout_ms=500)
        assert lab.datapath.slots[1].flags == 0
    finally:
        service.close()


def test_traffic_of_nobody_is_shown_and_streamed_billed_to_nobody(
    lab: Lab, running: GatewayService
) -> None:
    lab.datapath.send("10.200.0.9", up=700, down=3000)  # an address no subscriber owns
    lab.datapath.send("10.0.0.1", up=100)  # s1
    lab.datapath.drops = {"blocked": (0, 0), "unprovisioned": (4, 2400), "mac_mismatch": (1, 80)}
    lab.tick(running)
    messages = lab.received()
    assert all("-unprovisioned" not in m.sub and "" not in m.sub for m in messages)
    assert lab.billed()["s1"] == (100, 0)
    nobody = messages[-1].unprovisioned
    assert nobody is not None
    assert (nobody["up"], nobody["down"], nobody["up_pkts"], nobody["down_pkts"]) == (
        700,
        3000,
        1,
        1,
    )
    assert (nobody["up_total"], nobody["down_total"]) == (700, 3000)
    assert (nobody["drop_unprovisioned_pkts"], nobody["drop_unprovisioned_bytes"]) == (4, 2400)
    assert (nobody["drop_mac_mismatch_pkts"], nobody["drop_mac_mismatch_bytes"]) == (1, 80)
    assert "drop_blocked_pkts" not in nobody  # nothing of that reason dropped yet
    snap = read_snapshot(lab.folder / "state")
    assert snap.unprovisioned["down_total"] == 3000
    assert snap.unprovisioned["drop_unprovisioned_pkts"] == 4
    assert "no subscriber (billed to nobody)" in render(snap)
    metrics = {
        (m.name, tuple(s.labels.values())): s.value
        for m in running.collector.collect()
        for s in m.samples
    }
    assert metrics[("desanet_unprovisioned_bytes", ("down",))] == 3000
    assert metrics[("desanet_dropped_packets", ("unprovisioned",))] == 4
    assert metrics[("desanet_dropped_bytes", ("mac_mismatch",))] == 80
