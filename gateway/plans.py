"""The gateway's view of a subscriber turned into what the shaper and the datapath take.

A subscriber here is (registry entry, slot, enforcement); the shaper wants a
`SubscriberPlan` per slot inside one HTB plan, the datapath a `Provision`
with the slot's prefixes, class ids and flags. Both conversions live here so
that the service loop never builds either by hand.
"""

from __future__ import annotations

from collections.abc import Iterable

from desanet.ebpf.datapath import Provision
from desanet.gateway.config import Config
from desanet.gateway.registry import RatePlan, Subscriber
from desanet.shaper.plan import Link, ShapingPlan, SubscriberPlan, build_plan, classids_for_slot


def shaping_plan(
    config: Config, entries: Iterable[tuple[Subscriber, int, RatePlan]]
) -> ShapingPlan:
    """The HTB plan for (subscriber, slot, enforced plan) triples; raises ValidationError."""
    down_bound, up_bound = unmatched_bounds_bps(config)
    link = Link(
        down_bps=config.link.down_bps,
        up_bps=config.link.up_bps,
        headroom=config.shaping.headroom,
        unmatched_down_bps=down_bound,
        unmatched_up_bps=up_bound,
    )
    plans = [subscriber_plan(sub.id, slot, plan) for sub, slot, plan in entries]
    return build_plan(link, plans, config.shaping.leaf, config.shaping.rtt_ms)


def unmatched_bounds_bps(config: Config) -> tuple[int | None, int | None]:
    """Ceilings (down, up) of the class of traffic of no subscriber, by `[policy] unprovisioned`.

    block: the datapath drops that traffic, so the class carries only traffic
    with the gateway itself, unbounded (None); wall: the wall rates; allow:
    the configured share of the link.
    """
    policy = config.policy
    if policy.unprovisioned == "wall":
        return policy.wall_down_bps, policy.wall_up_bps
    if policy.unprovisioned == "allow":
        share = policy.allow_share
        return int(config.link.down_bps * share), int(config.link.up_bps * share)
    return None, None


def subscriber_plan(sub_id: str, slot: int, plan: RatePlan) -> SubscriberPlan:
    """The shaper's view of one subscriber in `slot` with the enforced `plan`."""
    return SubscriberPlan(
        sub_id, slot, plan.down_min_bps, plan.down_max_bps, plan.up_min_bps, plan.up_max_bps
    )


def provision_entry(sub: Subscriber, slot: int, flags: int) -> Provision:
    """The datapath entry of `sub` in `slot`: its prefixes, MACs, HTB classes and `flags`."""
    down_classid, up_classid = classids_for_slot(slot)
    return Provision(slot, tuple(sub.prefixes), down_classid, up_classid, flags, tuple(sub.macs))
