"""The service's status file as the console reads it: cached per write, aged, never trusted blindly.

The service rewrites its status file every interval; the console parses it
once per new version (keyed by mtime and size), however many browsers poll.
`SnapshotView` names only the fields the console reads, so a renamed snapshot
class in the service needs no change here.
"""

from __future__ import annotations

import os
import threading
import time
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass
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

    @property
    def subscribers(self) -> Sequence[RowView]: ...


@dataclass(frozen=True)
class Reading:
    """The latest snapshot (None when there is none) and why not, with rows indexed by id."""

    snapshot: SnapshotView | None
    error: str
    by_id: dict[str, RowView]
    down_bps: float
    up_bps: float


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
            down = sum(r.down_bps for r in rows)
            up = sum(r.up_bps for r in rows)
            self._reading = Reading(snap, "", {r.id: r for r in rows}, down, up)
            self._shares.append(
                (
                    snap.t_ms,
                    down / snap.link_down_bps if snap.link_down_bps else 0.0,
                    up / snap.link_up_bps if snap.link_up_bps else 0.0,
                )
            )
            return self._reading

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
