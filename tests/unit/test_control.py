"""Control requests, enforcement and quota periods: plans, suspension, quotas, fair use."""

from __future__ import annotations

from pathlib import Path

import pytest

from desanet.ebpf.abi import SLOT_BLOCKED
from desanet.errors import ValidationError
from desanet.gateway import control_requests
from desanet.gateway.config import ControlConfig, LinkConfig
from desanet.gateway.control_state import ControlState
from desanet.gateway.enforcement import Enforced, enforce, quota_in_force
from desanet.gateway.quota import quota_pass
from desanet.gateway.registry import RatePlan, Subscriber
from desanet.meter.wire import UsageEvent

pytestmark = pytest.mark.unit

LINK = LinkConfig(down_bps=20_000_000, up_bps=5_000_000)
CONTROL = ControlConfig(
    endpoint="tcp://127.0.0.1:7572",
    suspend="wall",
    wall_down_bps=64_000,
    wall_up_bps=32_000,
    fair_use_down_bps=1_000_000,
    fair_use_up_bps=256_000,
)
PLAN = RatePlan(2_000_000, 10_000_000, 500_000, 2_000_000)
SUBS = {
    "s1": Subscriber("s1", "A", ("10.0.0.1",), PLAN, 1_000_000),
    "s2": Subscriber("s2", "B", ("10.0.0.2",), PLAN, None),
}
MAY_2026 = 1_779_000_000_000  # 2026-05-17
JUNE_2026 = 1_781_000_000_000  # 2026-06-09


def fits(sub_id: str, plan: RatePlan) -> None:
    if plan.down_min_bps > 15_000_000:
        raise ValidationError(f"subscriber {sub_id}: guaranteed rates exceed the link")


def opened(tmp_path: Path) -> ControlState:
    state = ControlState(tmp_path)
    state.open()
    return state


def ask(state: ControlState, request: object, totals: dict[str, int] | None = None) -> dict:
    totals = totals or {}
    ctx = control_requests.Context(SUBS, CONTROL, LINK, lambda s: totals.get(s, 0), fits)
    reply, _ = control_requests.handle(request, state, ctx)
    return reply


def enforced(state: ControlState, sub_id: str) -> Enforced:
    return enforce(SUBS[sub_id], state.get(sub_id), CONTROL)


def quotas(state: ControlState, totals: dict[str, int], t_ms: int) -> list[UsageEvent]:
    changed, events = quota_pass(SUBS, state.records, totals, t_ms, CONTROL)
    state.update(changed)
    return events


def test_plan_change_suspend_and_resume(tmp_path: Path) -> None:
    state = opened(tmp_path)
    reply = ask(
        state,
        {
            "op": "plan",
            "sub": "s2",
            "down_min": "1mbit",
            "down_max": "4mbit",
            "up_min": 128_000,
            "up_max": "1mbit",
        },
    )
    assert reply["ok"] and reply["plan"]["down_max_bps"] == 4_000_000
    assert enforced(state, "s2").plan == RatePlan(1_000_000, 4_000_000, 128_000, 1_000_000)
    assert ask(state, {"op": "suspend", "sub": "s2"})["state"] == "suspended (wall)"
    walled = enforced(state, "s2")
    assert walled.plan.down_max_bps == 64_000 and walled.plan.down_min_bps == 64_000
    assert walled.flags == 0
    ask(state, {"op": "suspend", "sub": "s2", "mode": "block"})
    assert enforced(state, "s2").flags == SLOT_BLOCKED
    assert ask(state, {"op": "resume", "sub": "s2"})["state"] == "active"
    assert enforced(state, "s2").plan.down_max_bps == 4_000_000
    ask(state, {"op": "plan_reset", "sub": "s2"})
    assert enforced(state, "s2").plan == PLAN


@pytest.mark.parametrize(
    ("request_", "error"),
    [
        ("plan", "a request is a map"),
        ({"op": "explode", "sub": "s1"}, "unknown op 'explode'"),
        ({"op": "resume"}, "'sub' must be a subscriber id"),
        ({"op": "resume", "sub": "s9"}, "unknown subscriber 's9'"),
        ({"op": "plan", "sub": "s1", "down_min": "1mbit"}, "plan: down_max must be a rate"),
        (
            {
                "op": "plan",
                "sub": "s1",
                "down_min": "3mbit",
                "down_max": "2mbit",
                "up_min": "1mbit",
                "up_max": "1mbit",
            },
            "plan: down_min: 3.0 Mbit/s is above down_max 2.0 Mbit/s",
        ),
        (
            {
                "op": "plan",
                "sub": "s1",
                "down_min": "1mbit",
                "down_max": "30mbit",
                "up_min": "1mbit",
                "up_max": "1mbit",
            },
            "above the link's 20.0 Mbit/s",
        ),
        (
            {
                "op": "plan",
                "sub": "s1",
                "down_min": "16mbit",
                "down_max": "20mbit",
                "up_min": "1mbit",
                "up_max": "1mbit",
            },
            "subscriber s1: guaranteed rates exceed",
        ),
        ({"op": "suspend", "sub": "s1", "mode": "drop"}, "suspend mode 'drop'"),
        ({"op": "quota", "sub": "s1"}, "quota: give 'bytes'"),
        ({"op": "quota", "sub": "s1", "bytes": -5}, "above zero"),
        ({"op": "quota", "sub": "s1", "bytes": "many"}, "size 'many'"),
        # Values are bounded where they are parsed: nothing that cannot be stored and packed.
        (
            {"op": "plan", "sub": "s1", "down_min": "1" * 309 + "mbit", "down_max": "2mbit"}
            | {"up_min": "1mbit", "up_max": "1mbit"},
            "more than 20 digits",
        ),
        (
            {"op": "plan", "sub": "s1", "down_min": 10**13, "down_max": "2mbit"}
            | {"up_min": "1mbit", "up_max": "1mbit"},
            "plan: down_min must be a rate ('2mbit') or bit/s above zero, at most 1000.0 Gbit/s",
        ),
        ({"op": "quota", "sub": "s1", "bytes": "9" * 100}, "more than 20 digits"),
        ({"op": "quota", "sub": "s1", "bytes": "5000000TB"}, "is above 1000000.00 TB"),
        ({"op": "quota", "sub": "s1", "bytes": 2**64 - 1}, "bytes is above 1000000.00 TB"),
        ({"op": "quota", "sub": "s1", "bytes": 1.5}, "bytes must be an int, a size or nil"),
        # Unknown keys are refused: a misspelt mode must not suspend with the default one.
        (
            {"op": "suspend", "sub": "s1", "mod": "block"},
            "suspend: unknown key mod (allowed: mode)",
        ),
        ({"op": "show", "sub": "s1", "x": 1}, "show: unknown key x (allowed: nothing beside"),
        ({"op": "suspend", "sub": "s1", "mode": ["block"]}, "suspend mode ['block']"),
        ({"op": ["plan"], "sub": "s1"}, "unknown op ['plan']"),
    ],
)
def test_malformed_requests_get_an_error_and_change_nothing(
    tmp_path: Path, request_: object, error: str
) -> None:
    state = opened(tmp_path)
    reply = ask(state, request_)
    assert reply["ok"] is False and error in reply["error"]
    assert state.records == {}
    assert ControlState(tmp_path).records == {}


def test_quota_throttles_to_fair_use_and_reset_lifts_it(tmp_path: Path) -> None:
    state = opened(tmp_path)
    assert quotas(state, {"s1": 5_000, "s2": 7_000}, MAY_2026) == []
    assert quotas(state, {"s1": 900_000, "s2": 10**12}, MAY_2026 + 1000) == []
    events = quotas(state, {"s1": 1_005_000, "s2": 10**12}, MAY_2026 + 2000)
    assert [(e.sub, e.kind) for e in events] == [("s1", "throttled")]
    throttled = enforced(state, "s1")
    assert throttled.state == "fair-use"
    assert throttled.plan == RatePlan(1_000_000, 1_000_000, 256_000, 256_000)
    assert quotas(state, {"s1": 2_000_000}, MAY_2026 + 3000) == []
    reply = ask(state, {"op": "quota_reset", "sub": "s1"}, {"s1": 2_000_000})
    assert reply["state"] == "active" and reply["used"] == 0
    ask(state, {"op": "quota", "sub": "s2", "bytes": "1MB"}, {"s2": 10**12})
    assert enforced(state, "s2").state == "fair-use"
    ask(state, {"op": "quota", "sub": "s2", "bytes": None}, {"s2": 10**12})
    assert enforced(state, "s2").state == "active"
    assert quota_in_force(SUBS["s2"], state.get("s2")) is None


def test_new_month_starts_a_new_period(tmp_path: Path) -> None:
    state = opened(tmp_path)
    quotas(state, {"s1": 0}, MAY_2026)
    quotas(state, {"s1": 2_000_000}, MAY_2026 + 1000)
    assert enforced(state, "s1").state == "fair-use"
    events = quotas(state, {"s1": 2_000_000}, JUNE_2026)
    assert [e.kind for e in events] == ["period"]
    assert enforced(state, "s1").state == "active"
    assert state.get("s1").period == "2026-06" and state.get("s1").period_base == 2_000_000


def changes_made(state: ControlState) -> None:
    ask(state, {"op": "suspend", "sub": "s2", "mode": "block"})
    quotas(state, {"s1": 0, "s2": 0}, MAY_2026)
    quotas(state, {"s1": 3_000_000, "s2": 0}, MAY_2026 + 1)
    ask(
        state,
        {
            "op": "plan",
            "sub": "s1",
            "down_min": "1mbit",
            "down_max": "3mbit",
            "up_min": "1mbit",
            "up_max": "1mbit",
        },
    )


def assert_changes_kept(state: ControlState) -> None:
    assert enforced(state, "s2").flags == SLOT_BLOCKED
    assert enforced(state, "s1").state == "fair-use"
    assert state.get("s1").plan == RatePlan(1_000_000, 3_000_000, 1_000_000, 1_000_000)


def test_every_change_survives_a_restart(tmp_path: Path) -> None:
    state = opened(tmp_path)
    changes_made(state)
    state.close()  # no flush needed: each change was committed before its reply
    again = ControlState(tmp_path)
    assert_changes_kept(again)
    assert again.records == state.records
    again.open()
    again.forget(["s2"])
    assert set(ControlState(tmp_path).records) == {"s1"}
    assert (tmp_path / "control.sqlite").stat().st_mode & 0o777 == 0o600
