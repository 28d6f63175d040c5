"""The service's status file as the console reads it: cached per write, aged, never trusted blindly.

The service rewrites its status file every interval; the console parses it
once per new version (keyed by mtime and size), however many browsers poll.
Rates shown "now" are the delivered bytes of the last seconds, from the
totals of two snapshots (the service's own rates are smoothed over seconds,
so a suspension would take half a minute to show).
`SnapshotView` names only the fields the console reads, so a renamed snapshot
class in the service needs no change here.
"""

from __future__ import annotations

import os
import threading
import time
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

from desanet.errors import DesanetError
from desanet.gateway.status import STATUS_FILE, read_snapshot


class RowView(Protocol):
    """One subscriber's line of the status, as the console uses it."""

    id: str
    name: str
    state: str
    down_max_bps: int
    up_max_bps: int
    down_bps: float
    up_bps: float
    down_total: int
    up_total: int
    period_bytes: int
    quota_bytes: int | None


class SnapshotView(Protocol):
    """The status snapshot, as the console uses it."""

    gateway: str
    t_ms: int
    link_down_bps: int
    link_up_bps: int
    seq: int
    warnings: list[str]
    events: list[dict[str, Any]]
    journal: dict[str, int]
    outbound: list[dict[str, Any]]

    @property
    def subscribers(self) -> Sequence[RowView]: ...


@dataclass(frozen=True)
class Reading:
    """The latest snapshot (None when there is none) and why not, with rows indexed by id.

    `rates` holds each subscriber's (down, up) bit/s over the last RATE_WINDOW_MS, where
    two snapshots that far apart were seen; `rate()` falls back to the service's rates.
    """

    snapshot: SnapshotView | None
    error: str
    by_id: dict[str, RowView]
    down_bps: float
    up_bps: float
    rates: dict[str, tuple[float, float]] = field(default_factory=dict)

    def rate(self, row: RowView) -> tuple[float, float]:
        """(down, up) bit/s of a subscriber now."""
        return self.rates.get(row.id) or (row.down_bps, row.up_bps)


# Rates are measured over at least this long (shorter windows jitter with the poll timing),
# from a snapshot no older than RATE_MAX_AGE_MS (else the service's smoothed rates are shown).
RATE_WINDOW_MS = 2000
RATE_MAX_AGE_MS = 15000


# The link counts as saturated above this share of its rate, and the alert fires after
# it stayed there this long: a few seconds of full link are normal, minutes are not.
SATURATED_SHARE = 0.9
SATURATED_FOR_S = 300.0


class StatusSource:
    """Reads the status file of the service whose state directory is `state_dir`."""

    def __init__(self, state_dir: Path, interval_ms: int) -> None:
        self.path = state_dir / STATUS_FILE
        self.state_dir = state_dir
        self.interval_ms = interval_ms
        self._lock = threading.Lock()
        self._key: tuple[int, int] | None = None
        self._reading = Reading(None, "", {}, 0.0, 0.0)
        # (t_ms, down share, up share) of each new snapshot, for the saturation alert.
        self._shares: deque[tuple[int, float, float]] = deque(maxlen=4096)
        # (t_ms, {id: (down_total, up_total)}) of recent snapshots, for the measured rates.
        self._totals: deque[tuple[int, dict[str, tuple[int, int]]]] = deque()

    def read(self) -> Reading:
        """The newest snapshot, parsed only when the file changed."""
        try:
            st = os.stat(self.path)
            key: tuple[int, int] | None = (st.st_mtime_ns, st.st_size)
        except OSError:
            key = None
        with self._lock:
            if key is not None and key == self._key:
                return self._reading
            try:
                snap: SnapshotView | None = read_snapshot(self.state_dir)
                error = ""
            except DesanetError as err:
                snap, error = None, str(err)
            self._key = key
            if snap is None:
                self._reading = Reading(None, error, {}, 0.0, 0.0)
                return self._reading
            rows = snap.subscribers
            rates = self._measure(snap.t_ms, {r.id: (r.down_total, r.up_total) for r in rows})
            reading = Reading(snap, "", {r.id: r for r in rows}, 0.0, 0.0, rates)
            down = sum(reading.rate(r)[0] for r in rows)
            up = sum(reading.rate(r)[1] for r in rows)
            self._reading = Reading(snap, "", reading.by_id, down, up, rates)
            self._shares.append(
                (
                    snap.t_ms,
                    down / snap.link_down_bps if snap.link_down_bps else 0.0,
                    up / snap.link_up_bps if snap.link_up_bps else 0.0,
                )
            )
            return self._reading

    def _measure(
        self, t_ms: int, totals: dict[str, tuple[int, int]]
    ) -> dict[str, tuple[float, float]]:
        while self._totals and t_ms - self._totals[0][0] > RATE_MAX_AGE_MS:
            self._totals.popleft()
        # The newest snapshot at least a window old is the base of the measurement.
        base = None
        for seen_ms, seen in self._totals:
            if t_ms - seen_ms >= RATE_WINDOW_MS:
                base = (seen_ms, seen)
        self._totals.append((t_ms, totals))
        while len(self._totals) > 2 and t_ms - self._totals[1][0] >= RATE_WINDOW_MS:
            self._totals.popleft()  # older than the base we would pick next time
        if base is None:
            return {}
        seconds = (t_ms - base[0]) / 1000
        rates = {}
        for sub_id, (down, up) in totals.items():
            before = base[1].get(sub_id)
            # A subscriber new since then, or whose counters restarted, has no measurement.
            if before is not None and down >= before[0] and up >= before[1]:
                rates[sub_id] = (8 * (down - before[0]) / seconds, 8 * (up - before[1]) / seconds)
        return rates

    def wait_for_state(self, sub_id: str, state: str) -> bool:
        """Wait (a few intervals at most) until the status shows `sub_id` in `state`.

        A page shown right after an action then shows its effect, not the interval before.
        """
        deadline = time.monotonic() + max(2.0, 3 * self.interval_ms / 1000)
        while True:
            row = self.read().by_id.get(sub_id)
            if row is not None and row.state == state:
                return True
            if time.monotonic() >= deadline:
                return False
            time.sleep(min(0.05, self.interval_ms / 4000))

    def age_s(self, reading: Reading, now_ms: int | None = None) -> float:
        """Seconds since the snapshot was written (infinite without one)."""
        if reading.snapshot is None:
            return float("inf")
        now = time.time_ns() // 1_000_000 if now_ms is None else now_ms
        return max(0.0, (now - reading.snapshot.t_ms) / 1000)

    def stale(self, reading: Reading, now_ms: int | None = None) -> bool:
        """True when the service missed several intervals: it is down or stuck."""
        return self.age_s(reading, now_ms) > max(5.0, 5 * self.interval_ms / 1000)

    def saturated_s(self) -> tuple[float, float]:
        """For how long (seconds) the link has been saturated without a break, down and up."""
        with self._lock:
            shares = list(self._shares)
        if not shares:
            return 0.0, 0.0
        last = shares[-1][0]
        spans = []
        for index in (1, 2):
            start = last
            for t_ms, *share in reversed(shares):
                if share[index - 1] < SATURATED_SHARE:
                    break
                start = t_ms
            spans.append((last - start) / 1000 if shares[-1][index] >= SATURATED_SHARE else 0.0)
        return spans[0], spans[1]
