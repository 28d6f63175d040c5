"""Quota periods: monthly usage counted from each subscriber's totals, and the fair-use throttle.

A quota counts delivered bytes in both directions (`usage_bytes`) since the
start of the UTC calendar month or billing's last `quota_reset`. Each pass
over the totals starts a new period for a subscriber whose period is of an
earlier month (lifting its throttle) and throttles one past its quota. The
pass only computes: the service stores the new records in one transaction and
re-enforces the subscribers named in the events. `QuotaDue` names the
subscribers a pass must look at, so that a tick's pass costs what moved.
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
from desanet.gateway.registry import SlotTable, Subscriber
from desanet.gateway.roster import Roster
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


class QuotaDue:
    """The subscribers whose quota pass could change anything, with their `usage_bytes`.

    A pass decides from a subscriber's usage, control record, quota and the
    month alone: after the first pass only those whose usage moved or whose
    record was replaced are due, and everyone again when the month, the
    roster or its slot table changes.
    """

    def __init__(self) -> None:
        self._roster: Roster | None = None
        self._slot_table: SlotTable | None = None
        self._month = ""
        self._version = -1
        self._ids: list[str] = []
        self._slots = np.zeros(0, dtype=np.intp)
        self._usage = np.zeros(0, dtype=np.uint64)
        self._records: list[SubscriberControl | None] = []

    def usage(self, roster: Roster, totals: npt.NDArray[np.uint64], t_ms: int) -> dict[str, int]:
        """{subscriber id: usage_bytes} of the subscribers due for a pass at `t_ms`."""
        month = month_of(t_ms)
        control = roster.control
        whole = (
            roster is not self._roster
            or roster.slots is not self._slot_table
            or month != self._month
        )
        if whole:
            self._roster, self._slot_table, self._month = roster, roster.slots, month
            self._ids = list(roster.slots.slots)
            self._slots = np.array(list(roster.slots.slots.values()), dtype=np.intp)
        usage = totals[self._slots, 0] + totals[self._slots, 2]
        records = self._records
        if whole or control.version != self._version:
            records = list(map(control.records.get, self._ids))
        if whole:
            due: set[int] | range = range(len(self._ids))
        else:
            due = set(np.flatnonzero(usage != self._usage).tolist())
            if records is not self._records:
                pairs = enumerate(zip(records, self._records, strict=True))
                due.update(i for i, (a, b) in pairs if a is not b)
        self._usage, self._records, self._version = usage, records, control.version
        return {self._ids[i]: int(usage[i]) for i in due}
