"""Quota periods: monthly usage counted from each subscriber's totals, and the fair-use throttle.

A quota counts delivered bytes in both directions (`usage_bytes`) since the
start of the UTC calendar month or billing's last `quota_reset`. Each pass
over the totals starts a new period for a subscriber whose period is of an
earlier month (lifting its throttle) and throttles one past its quota. The
pass only computes: the service stores the new records in one transaction and
re-enforces the subscribers named in the events.
"""

from __future__ import annotations

import time
from collections.abc import Mapping
from dataclasses import replace

import numpy as np
import numpy.typing as npt

from desanet.gateway.config import ControlConfig
from desanet.gateway.control_record import SubscriberControl
from desanet.gateway.enforcement import quota_in_force
from desanet.gateway.registry import Subscriber
from desanet.meter.wire import UsageEvent
from desanet.units import format_rate

THROTTLED = "throttled"
NEW_PERIOD = "period"


def month_of(t_ms: int) -> str:
    """The UTC calendar month "YYYY-MM" quota periods are counted in."""
    return time.strftime("%Y-%m", time.gmtime(t_ms / 1000))


def usage_bytes(totals: npt.NDArray[np.uint64], slot: int) -> int:
    """What a quota counts for the subscriber in `slot`: up_total + down_total.

    `totals` is the aggregator's (n_slots, 4) array, columns up, up_pkts, down, down_pkts.
    """
    row = totals[slot]
    return int(row[0]) + int(row[2])


def used_in_period(total: int, record: SubscriberControl) -> int:
    """Bytes used in the current quota period, from the subscriber's `usage_bytes`."""
    return total - record.period_base


def quota_pass(
    subscribers: Mapping[str, Subscriber],
    records: Mapping[str, SubscriberControl],
    totals: Mapping[str, int],
    t_ms: int,
    policy: ControlConfig,
) -> tuple[dict[str, SubscriberControl], list[UsageEvent]]:
    """New periods and throttles due at `t_ms`: (changed records, events).

    `totals` maps subscriber id to `usage_bytes`; `records` holds the control
    records (a subscriber missing from it has the defaults).
    """
    changed: dict[str, SubscriberControl] = {}
    events: list[UsageEvent] = []
    month = month_of(t_ms)
    for sub_id, total in totals.items():
        sub = subscribers.get(sub_id)
        if sub is None:
            continue
        record = records.get(sub_id, SubscriberControl())
        if record.period != month:
            if record.period:
                events.append(UsageEvent(t_ms, sub_id, NEW_PERIOD, f"new quota period {month}"))
            record = replace(record, period=month, period_base=total, throttled=False)
            changed[sub_id] = record
        quota = quota_in_force(sub, record)
        used = used_in_period(total, record)
        if quota is not None and used >= quota and not record.throttled:
            changed[sub_id] = replace(record, throttled=True)
            events.append(
                UsageEvent(
                    t_ms,
                    sub_id,
                    THROTTLED,
                    f"quota {quota} B passed ({used} B used): fair-use plan "
                    f"{format_rate(policy.fair_use_down_bps)} down, "
                    f"{format_rate(policy.fair_use_up_bps)} up",
                )
            )
    return changed, events
