"""Enforcement policy: the plan and datapath flags a subscriber gets right now, and why.

From the subscriber's declared plan and billing's changes (its control
record): a `block` suspension drops its packets in the datapath; a `wall`
suspension caps its plan to `[control] wall_*`; a subscriber past its quota is
capped to `[control] fair_use_*`; otherwise billing's plan, else the file's.
A cap never raises a rate above the subscriber's own plan.
"""

from __future__ import annotations

from dataclasses import dataclass

from desanet.ebpf.abi import SLOT_BLOCKED
from desanet.gateway.config import ControlConfig
from desanet.gateway.control_record import SubscriberControl
from desanet.gateway.registry import RatePlan, Subscriber

ACTIVE = "active"
WALLED = "suspended (wall)"
BLOCKED = "suspended (block)"
FAIR_USE = "fair-use"


@dataclass(frozen=True)
class Enforced:
    """What the gateway enforces on a subscriber: the plan, the datapath flags, the state name."""

    plan: RatePlan
    flags: int
    state: str  # ACTIVE, WALLED, BLOCKED or FAIR_USE


def enforce(sub: Subscriber, record: SubscriberControl, policy: ControlConfig) -> Enforced:
    """The plan and datapath flags to enforce on `sub` given its control record."""
    base = record.plan or sub.plan
    if record.suspended == "block":
        return Enforced(base, SLOT_BLOCKED, BLOCKED)
    if record.suspended == "wall":
        return Enforced(capped(base, policy.wall_down_bps, policy.wall_up_bps), 0, WALLED)
    if record.throttled:
        return Enforced(capped(base, policy.fair_use_down_bps, policy.fair_use_up_bps), 0, FAIR_USE)
    return Enforced(base, 0, ACTIVE)


def quota_in_force(sub: Subscriber, record: SubscriberControl) -> int | None:
    """The monthly quota in bytes: billing's override, else the subscribers file's."""
    return record.quota_bytes if record.quota_overridden else sub.quota_bytes


def capped(plan: RatePlan, down_bps: int, up_bps: int) -> RatePlan:
    """`plan` with both ceilings (and guarantees) at most the given rates."""
    down_max, up_max = min(plan.down_max_bps, down_bps), min(plan.up_max_bps, up_bps)
    return RatePlan(
        down_min_bps=min(plan.down_min_bps, down_max),
        down_max_bps=down_max,
        up_min_bps=min(plan.up_min_bps, up_max),
        up_max_bps=up_max,
    )
