"""Control requests: check one request billing sent, and compute the control record it asks for.

A request is a msgpack map with `op` and `sub` and only the keys its op takes
(rates are tc-style strings or bit/s ints):

  plan {down_min, down_max, up_min, up_max} | plan_reset | suspend {mode?} |
  resume | quota {bytes: int|str|None} | quota_reset | show

`decide` checks the request in full and computes the new record and the
reply (the subscriber's state after it); the caller stores a batch of them in
one transaction before any reply leaves. `handle` is `decide` and the store
for one request. A refused request changes nothing and gets `{ok: false,
error}`.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass, replace
from typing import Any

from desanet.errors import ControlError, ValidationError
from desanet.gateway.config import SUSPEND_MODES, ControlConfig, LinkConfig
from desanet.gateway.control_record import UNTOUCHED, SubscriberControl
from desanet.gateway.control_state import ControlState
from desanet.gateway.enforcement import enforce, quota_in_force
from desanet.gateway.quota import used_in_period
from desanet.gateway.registry import RatePlan, Subscriber
from desanet.shaper.plan import RATE_FIELDS, rate_fault
from desanet.units import (
    MAX_BYTES,
    MAX_RATE_BPS,
    format_bytes,
    format_rate,
    parse_bytes,
    parse_rate_bps,
)

# Each op and the keys it takes beside `op` and `sub`; any other key is refused (a
# misspelt `mod: "block"` must not suspend with the default mode).
OPS: dict[str, tuple[str, ...]] = {
    "plan": RATE_FIELDS,
    "plan_reset": (),
    "suspend": ("mode",),
    "resume": (),
    "quota": ("bytes",),
    "quota_reset": (),
    "show": (),
}


class Malformed:
    """A request body that could not be decoded at all (not msgpack)."""


MALFORMED = Malformed()


@dataclass(frozen=True)
class Context:
    """What checking a request needs beside the control state.

    `total_of(sub)` gives the subscriber's usage bytes; `check_plan(sub, plan)`
    raises ValidationError when the plan does not fit the link beside everyone
    else's.
    """

    subscribers: Mapping[str, Subscriber]
    policy: ControlConfig
    link: LinkConfig
    total_of: Callable[[str], int]
    check_plan: Callable[[str, RatePlan], None]


def handle(request: object, state: ControlState, ctx: Context) -> tuple[dict[str, Any], str | None]:
    """Check and apply one request; returns (reply, subscriber whose record changed)."""
    decision = decide(request, state.records, ctx)
    if decision.changed:
        state.update({decision.sub_id: decision.record})
    return decision.reply, (decision.sub_id if decision.changed else None)


@dataclass(frozen=True)
class Decision:
    """What one request asks: its reply, and the record to store when `changed`."""

    reply: dict[str, Any]
    sub_id: str = ""
    record: SubscriberControl = UNTOUCHED
    changed: bool = False
    op: str = ""


def decide(request: object, records: Mapping[str, SubscriberControl], ctx: Context) -> Decision:
    """Check one request against `records` and compute what it changes; stores nothing.

    The reply is built before anything is stored: whatever fails after this
    (storing, a refusal by the caller) must turn it into a failure reply, so
    a reply is always the truth.
    """
    try:
        op, sub_id, args = parse(request, ctx.subscribers)
        record = records.get(sub_id, UNTOUCHED)
        new = changed_record(op, sub_id, args, record, ctx)
    except (ControlError, ValidationError) as err:
        return Decision({"ok": False, "error": str(err)})
    reply = reply_for(ctx.subscribers[sub_id], new, ctx)
    return Decision(reply, sub_id, new, new != record, op)


def reply_for(sub: Subscriber, record: SubscriberControl, ctx: Context) -> dict[str, Any]:
    """The reply describing a subscriber's state after a request."""
    enforced = enforce(sub, record, ctx.policy)
    return {
        "ok": True,
        "sub": sub.id,
        "state": enforced.state,
        "plan": asdict(enforced.plan),
        "quota": quota_in_force(sub, record),
        "used": used_in_period(ctx.total_of(sub.id), record),
        "period": record.period,
    }


def parse(
    request: object, subscribers: Mapping[str, Subscriber]
) -> tuple[str, str, Mapping[str, Any]]:
    """(op, subscriber id, the whole request) of a well-formed request; raises ControlError."""
    if isinstance(request, Malformed):
        raise ControlError("malformed: the body is not msgpack")
    if not isinstance(request, dict):
        raise ControlError("a request is a map with 'op' and 'sub'")
    op, sub_id = request.get("op"), request.get("sub")
    if not isinstance(op, str) or op not in OPS:
        raise ControlError(f"unknown op {op!r} (known: {', '.join(OPS)})")
    unknown = sorted(str(k) for k in request if k not in ("op", "sub", *OPS[op]))
    if unknown:
        allowed = ", ".join(OPS[op]) or "nothing beside op and sub"
        raise ControlError(f"{op}: unknown key {', '.join(unknown)} (allowed: {allowed})")
    if not isinstance(sub_id, str):
        raise ControlError("'sub' must be a subscriber id string")
    if sub_id not in subscribers:
        raise ControlError(f"unknown subscriber {sub_id!r}")
    return op, sub_id, request


def changed_record(
    op: str, sub_id: str, args: Mapping[str, Any], record: SubscriberControl, ctx: Context
) -> SubscriberControl:
    """The control record after `op`; raises ControlError or ValidationError if refused."""
    if op == "plan":
        plan = parse_plan(args, ctx.link)
        ctx.check_plan(sub_id, plan)
        return replace(record, plan=plan)
    if op == "plan_reset":
        ctx.check_plan(sub_id, ctx.subscribers[sub_id].plan)
        return replace(record, plan=None)
    if op == "suspend":
        mode = args.get("mode", ctx.policy.suspend)
        if not isinstance(mode, str) or mode not in SUSPEND_MODES:
            raise ControlError(f"suspend mode {mode!r} is not one of {', '.join(SUSPEND_MODES)}")
        return replace(record, suspended=mode)
    if op == "resume":
        return replace(record, suspended=None)
    if op == "quota":
        quota = parse_quota(args)
        used = used_in_period(ctx.total_of(sub_id), record)
        return replace(
            record,
            quota_overridden=True,
            quota_bytes=quota,
            throttled=quota is not None and used >= quota,
        )
    if op == "quota_reset":
        return replace(record, period_base=ctx.total_of(sub_id), throttled=False)
    return record


_MISSING = object()


def parse_quota(args: Mapping[str, Any]) -> int | None:
    """The `bytes` of a quota request: an int, a size string, or None (no quota)."""
    quota = args.get("bytes", _MISSING)
    if quota is _MISSING:
        raise ControlError("quota: give 'bytes' (an int, a size like '50GB', or nil)")
    if isinstance(quota, str):
        quota = parse_bytes(quota)
    if quota is not None and (not isinstance(quota, int) or isinstance(quota, bool)):
        raise ControlError(f"quota: bytes must be an int, a size or nil, not {quota!r}")
    if quota is not None and quota <= 0:
        raise ControlError("quota: bytes must be above zero (nil removes the quota)")
    if quota is not None and quota > MAX_BYTES:
        raise ControlError(f"quota: {quota} bytes is above {format_bytes(MAX_BYTES)}")
    return quota


def parse_plan(args: Mapping[str, Any], link: LinkConfig) -> RatePlan:
    """The four rates of a plan request, each a rate string or bit/s above zero."""
    rates = {}
    for key in RATE_FIELDS:
        value = args.get(key)
        if isinstance(value, str):
            rates[key] = parse_rate_bps(value)
        elif isinstance(value, int) and not isinstance(value, bool) and 0 < value <= MAX_RATE_BPS:
            rates[key] = value
        else:
            raise ControlError(
                f"plan: {key} must be a rate ('2mbit') or bit/s above zero, at most "
                f"{format_rate(MAX_RATE_BPS)}"
            )
    fault = rate_fault(rates, link.down_bps, link.up_bps)
    if fault is not None:
        raise ControlError(f"plan: {fault[0]}: {fault[1]}")
    return RatePlan(rates["down_min"], rates["down_max"], rates["up_min"], rates["up_max"])
