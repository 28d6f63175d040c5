# Over 400 lines: every page's view of the status, one place where the console decides what an
# operator sees.
"""What each page shows, prepared for templates that hold no logic: rows of formatted strings.

Search, sort and paging of the subscribers table happen here, on the
server, over the cached status: a page renders the rows it shows, never all
of them.
"""

from __future__ import annotations

import datetime as dt
import math
import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from flask_babel import lazy_gettext as _l

from desanet.gateway.console import fmt
from desanet.gateway.console.history import DayUsage, StreamEvent
from desanet.gateway.console.status_source import (
    SATURATED_FOR_S as SATURATED_ALERT_S,
)
from desanet.gateway.console.status_source import (
    Reading,
    RowView,
    SnapshotView,
    StatusSource,
)
from desanet.gateway.registry import Subscriber

PAGE_SIZE = 50
BUSIEST = 5
RECENT_EVENTS = 10

STATE_LABELS: Mapping[str, Any] = {
    "active": _l("active"),
    "suspended (wall)": _l("suspended (walled)"),
    "suspended (block)": _l("suspended (blocked)"),
    "fair-use": _l("fair use (quota passed)"),
    "pending": _l("waiting for the gateway"),
}
EVENT_LABELS: Mapping[str, Any] = {
    "throttled": _l("quota passed: fair-use plan"),
    "period": _l("new quota month"),
    "plan": _l("plan changed"),
    "plan_reset": _l("plan back to the file's"),
    "suspend": _l("suspended"),
    "resume": _l("resumed"),
    "quota": _l("quota changed"),
    "quota_reset": _l("quota reset"),
}
SORT_KEYS = ("id", "name", "plan", "down", "up", "usage", "state")


def state_label(state: str) -> str:
    """The translated name of a subscriber state (the raw one if the service has a new state)."""
    return str(STATE_LABELS.get(state, state))


def state_class(state: str) -> str:
    """A CSS class for a state's badge."""
    return state.split(" ")[0].replace("-", "")


@dataclass(frozen=True)
class Row:
    """One subscriber as the table and the home page show it."""

    id: str
    name: str
    state: str
    state_label: str
    state_class: str
    plan: str
    down: str
    up: str
    usage: str
    usage_share: float
    usage_percent: str


def _usage(period_bytes: int, quota: int | None) -> tuple[str, float, str]:
    if quota is None:
        return fmt.size(period_bytes), 0.0, ""
    share = period_bytes / quota if quota else 0.0
    text = str(_l("%(used)s of %(quota)s", used=fmt.size(period_bytes), quota=fmt.size(quota)))
    return text, min(share, 1.0), fmt.percent(share)


def row(r: RowView, reading: Reading) -> Row:
    """The table row of one status line."""
    usage, share, percent = _usage(r.period_bytes, r.quota_bytes)
    down_bps, up_bps = reading.rate(r)
    return Row(
        id=r.id,
        name=r.name,
        state=r.state,
        state_label=state_label(r.state),
        state_class=state_class(r.state),
        plan=f"{fmt.rate(r.down_max_bps)} / {fmt.rate(r.up_max_bps)}",
        down=fmt.rate(down_bps),
        up=fmt.rate(up_bps),
        usage=usage,
        usage_share=share,
        usage_percent=percent,
    )


def pending_row(sub: Subscriber) -> Row:
    """A subscriber in the file the service has not taken up yet."""
    usage, share, percent = _usage(0, sub.quota_bytes)
    return Row(
        id=sub.id,
        name=sub.name,
        state="pending",
        state_label=state_label("pending"),
        state_class="pending",
        plan=f"{fmt.rate(sub.plan.down_max_bps)} / {fmt.rate(sub.plan.up_max_bps)}",
        down="",
        up="",
        usage=usage,
        usage_share=share,
        usage_percent=percent,
    )


@dataclass(frozen=True)
class Table:
    """One page of the subscribers table and how to reach the others."""

    rows: list[Row]
    total: int
    matched: int
    page: int
    pages: int
    sort: str
    descending: bool
    query: str


def _sort_key(sort: str, reading: Reading) -> Any:
    def usage(r: RowView) -> float:
        return r.period_bytes / r.quota_bytes if r.quota_bytes else r.period_bytes / 1e18

    keys = {
        "id": lambda r: r.id,
        "name": lambda r: r.name.casefold(),
        "plan": lambda r: r.down_max_bps,
        "down": lambda r: reading.rate(r)[0],
        "up": lambda r: reading.rate(r)[1],
        "usage": usage,
        "state": lambda r: r.state,
    }
    return keys[sort]


def table(
    reading: Reading,
    in_file: Mapping[str, Subscriber],
    query: str,
    sort: str,
    descending: bool,
    page: int,
) -> Table:
    """Search (id, name or address), sort and cut out one page of the subscribers."""
    rows: Sequence[RowView] = reading.snapshot.subscribers if reading.snapshot else []
    needle = query.strip().casefold()
    if needle:
        prefixes = {s.id: " ".join(s.prefixes) for s in in_file.values()}
        rows = [
            r
            for r in rows
            if needle in r.id.casefold()
            or needle in r.name.casefold()
            or needle in prefixes.get(r.id, "")
        ]
    if sort not in SORT_KEYS:
        sort = "id"
    ordered = sorted(rows, key=_sort_key(sort, reading), reverse=descending)
    pending = [
        s
        for s in in_file.values()
        if s.id not in reading.by_id
        and (not needle or needle in s.id.casefold() or needle in s.name.casefold())
    ]
    matched = len(ordered) + len(pending)
    pages = max(1, math.ceil(matched / PAGE_SIZE))
    page = min(max(1, page), pages)
    start = (page - 1) * PAGE_SIZE
    shown = [row(r, reading) for r in ordered[start : start + PAGE_SIZE]]
    if len(shown) < PAGE_SIZE:
        offset = max(0, start - len(ordered))
        shown.extend(pending_row(s) for s in pending[offset : offset + PAGE_SIZE - len(shown)])
    total = len(reading.by_id) + len([s for s in in_file if s not in reading.by_id])
    return Table(shown, total, matched, page, pages, sort, descending, query)


@dataclass(frozen=True)
class Link:
    """The shared uplink now: rates against the shaped rates."""

    down: str
    up: str
    down_of: str
    up_of: str
    down_share: float
    up_share: float
    down_percent: str
    up_percent: str


def link(reading: Reading) -> Link | None:
    """The link's use in the latest snapshot (None without one)."""
    snap = reading.snapshot
    if snap is None:
        return None
    down = reading.down_bps / snap.link_down_bps if snap.link_down_bps else 0.0
    up = reading.up_bps / snap.link_up_bps if snap.link_up_bps else 0.0
    return Link(
        down=fmt.rate(reading.down_bps),
        up=fmt.rate(reading.up_bps),
        down_of=fmt.rate(snap.link_down_bps),
        up_of=fmt.rate(snap.link_up_bps),
        down_share=min(down, 1.0),
        up_share=min(up, 1.0),
        down_percent=fmt.percent(down),
        up_percent=fmt.percent(up),
    )


def busiest(reading: Reading) -> list[Row]:
    """The subscribers moving the most bytes now."""
    rows: Sequence[RowView] = reading.snapshot.subscribers if reading.snapshot else []
    top = sorted(rows, key=lambda r: sum(reading.rate(r)), reverse=True)[:BUSIEST]
    return [row(r, reading) for r in top if sum(reading.rate(r)) > 0]


@dataclass(frozen=True)
class EventLine:
    """An event as lists show it."""

    when: str
    sub: str
    what: str


def events(items: Iterable[StreamEvent | Mapping[str, Any]]) -> list[EventLine]:
    """Events of the stream (or of the status file) for a list."""
    out = []
    for item in items:
        if isinstance(item, StreamEvent):
            t_ms, sub, kind = item.t_ms, item.sub, item.kind
        else:
            # The status file holds the service's events as UsageEvent fields (t in ms).
            t_ms, sub, kind = int(item.get("t", 0)), str(item.get("sub")), str(item.get("kind"))
        out.append(EventLine(fmt.when(t_ms), sub, str(EVENT_LABELS.get(kind, kind))))
    return out


def recent_events(reading: Reading) -> list[EventLine]:
    """The newest events the service reported, newest first."""
    snap = reading.snapshot
    return events(reversed(snap.events[-RECENT_EVENTS:])) if snap else []


@dataclass(frozen=True)
class Alert:
    """Something the operator should look at, worst first."""

    level: str  # "danger" or "warning"
    text: str


# The journal this full warns that billing may soon get only totals for the oldest intervals.
JOURNAL_FULL_ALERT = 0.8
# The hub this many messages behind (ten minutes at a 1 s interval) warns that billing is behind.
BEHIND_ALERT_MESSAGES = 600


def _backlog_alerts(snap: SnapshotView) -> list[Alert]:
    """The journal nearly full, billing (the district hub) far behind the journal."""
    out = []
    held, most = snap.journal.get("bytes", 0), snap.journal.get("max_bytes", 0)
    if most and held >= JOURNAL_FULL_ALERT * most:
        share = fmt.number(round(100 * held / most))
        text = _l(
            "The usage journal is %(share)s%% full: its oldest intervals go first, and billing "
            "that has not fetched them gets their totals only.",
            share=share,
        )
        out.append(Alert("warning", str(text)))
    for consumer in snap.outbound:
        behind = snap.seq - int(consumer.get("acked_seq", 0))
        if behind >= BEHIND_ALERT_MESSAGES:
            text = _l(
                "Billing is behind: the district hub lacks the newest %(count)s usage messages.",
                count=fmt.number(behind),
            )
            out.append(Alert("warning", str(text)))
    return out


def alerts(
    status: StatusSource,
    reading: Reading,
    file_error: str,
    history_error: str,
    now_ms: int | None = None,
) -> list[Alert]:
    """Service down or stuck, link saturated for long, a refused file, the stream unreachable."""
    out = []
    if reading.snapshot is None:
        out.append(Alert("danger", str(_l("The gateway service is not running: no status yet."))))
    elif status.stale(reading, now_ms):
        age = fmt.number(status.age_s(reading, now_ms))
        out.append(
            Alert(
                "danger",
                str(_l("The gateway service stopped reporting %(age)s seconds ago.", age=age)),
            )
        )
    down_s, up_s = status.saturated_s()
    if down_s >= SATURATED_ALERT_S:
        minutes = fmt.number(down_s // 60)
        text = _l("The download link has been full for %(minutes)s minutes.", minutes=minutes)
        out.append(Alert("warning", str(text)))
    if up_s >= SATURATED_ALERT_S:
        minutes = fmt.number(up_s // 60)
        text = _l("The upload link has been full for %(minutes)s minutes.", minutes=minutes)
        out.append(Alert("warning", str(text)))
    if file_error:
        out.append(
            Alert(
                "danger", str(_l("The subscribers file has an error: %(error)s", error=file_error))
            )
        )
    if history_error:
        out.append(
            Alert(
                "warning",
                str(
                    _l(
                        "Usage history is not updating (the usage stream: %(error)s)",
                        error=history_error,
                    )
                ),
            )
        )
    if reading.snapshot is not None:
        out.extend(_backlog_alerts(reading.snapshot))
        out.extend(
            Alert("warning", str(_l("The gateway warns: %(text)s", text=w)))
            for w in reading.snapshot.warnings
        )
    return out


@dataclass(frozen=True)
class SubscriberPage:
    """One subscriber's page: its row, addresses, 30 days and events."""

    row: Row
    addresses: list[str]
    macs: list[str]  # the devices' MACs the subscriber is bound to (or followed by)
    plan_override: bool
    suspended: bool
    days: list[tuple[str, str, str]]
    days_total: str
    events: list[EventLine]


def subscriber_page(
    reading: Reading,
    declared: Subscriber | None,
    sub_id: str,
    days: Sequence[DayUsage],
    stream_events: Iterable[StreamEvent],
) -> SubscriberPage | None:
    """What the page of `sub_id` shows (None when neither the status nor the file has it)."""
    status_row = reading.by_id.get(sub_id)
    if status_row is not None:
        shown = row(status_row, reading)
    elif declared is not None:
        shown = pending_row(declared)
    else:
        return None
    # An active subscriber whose ceilings differ from the file's runs a plan set by
    # the console or billing, which "back to the file's plan" undoes.
    override = (
        status_row is not None
        and declared is not None
        and status_row.state == "active"
        and (status_row.down_max_bps, status_row.up_max_bps)
        != (declared.plan.down_max_bps, declared.plan.up_max_bps)
    )
    return SubscriberPage(
        row=shown,
        addresses=list(declared.prefixes) if declared else [],
        macs=list(declared.macs) if declared else [],
        plan_override=override,
        suspended=shown.state.startswith("suspended"),
        days=[(fmt.day(d.day), fmt.size(d.down), fmt.size(d.up)) for d in reversed(days)],
        days_total=fmt.size(sum(d.down + d.up for d in days)),
        events=events(stream_events),
    )


def today(tz: dt.tzinfo) -> dt.date:
    """Today in the console's time zone."""
    return dt.datetime.fromtimestamp(time.time(), tz).date()
