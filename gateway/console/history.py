"""Usage history for the console: the usage stream, followed into daily totals and events.

A thread follows the gateway's usage stream with the billing client (replayed
from where it stopped, then live), adds every interval's delivered bytes to
its subscriber's day (in the console's time zone) and keeps the events the
stream carries. The day totals and the stream position are written in one
transaction, so a restart neither loses nor counts twice an interval.
"""

from __future__ import annotations

import datetime as dt
import logging
import threading
import time
from collections.abc import Iterable
from dataclasses import dataclass
from zoneinfo import ZoneInfo

from desanet.errors import DesanetError
from desanet.gateway.console.store import Database
from desanet.meter.client import ReplayGone, UsageClient
from desanet.meter.keys import ClientSecurity
from desanet.meter.wire import UsageMessage

log = logging.getLogger(__name__)

_CURSOR = "usage"
_RETRY_S = 5.0
# Messages per transaction while catching up; live messages are committed one by one.
_BATCH = 500


@dataclass(frozen=True)
class DayUsage:
    """A subscriber's delivered bytes on one local day."""

    day: dt.date
    up: int
    down: int


@dataclass(frozen=True)
class StreamEvent:
    """An event the usage stream carried (a throttle, a new period, a control change)."""

    t_ms: int
    sub: str
    kind: str
    detail: str


@dataclass(frozen=True)
class FollowerState:
    """Where the follower is: the last seq stored, when, and its last error."""

    seq: int
    updated_ms: int
    error: str


class UsageHistory:
    """Reads the stored history; `start()` runs the follower that writes it."""

    def __init__(
        self,
        db: Database,
        usage_endpoint: str,
        replay_endpoint: str,
        security: ClientSecurity,
        tz: ZoneInfo,
    ) -> None:
        self.db = db
        self.usage_endpoint = usage_endpoint
        self.replay_endpoint = replay_endpoint
        self.security = security
        self.tz = tz
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._state = FollowerState(self._cursor()[1], 0, "")

    # -- reading ----------------------------------------------------------------------------

    def days(self, sub_id: str, today: dt.date, count: int = 30) -> list[DayUsage]:
        """The last `count` days up to `today`, oldest first, zero where nothing was used."""
        first = today - dt.timedelta(days=count - 1)
        with self.db.connection() as conn:
            rows = conn.execute(
                "SELECT day, up, down FROM usage_daily WHERE sub = ? AND day >= ? AND day <= ?",
                (sub_id, first.isoformat(), today.isoformat()),
            ).fetchall()
        stored = {r["day"]: (r["up"], r["down"]) for r in rows}
        out = []
        for i in range(count):
            day = first + dt.timedelta(days=i)
            up, down = stored.get(day.isoformat(), (0, 0))
            out.append(DayUsage(day, up, down))
        return out

    def events(self, sub_id: str | None = None, limit: int = 20) -> list[StreamEvent]:
        """The newest events (of one subscriber, or all), newest first."""
        where, args = ("WHERE sub = ?", (sub_id,)) if sub_id is not None else ("", ())
        with self.db.connection() as conn:
            rows = conn.execute(
                f"SELECT t_ms, sub, kind, detail FROM stream_events {where} "
                "ORDER BY t_ms DESC, rowid DESC LIMIT ?",
                (*args, limit),
            ).fetchall()
        return [StreamEvent(r[0], r[1], r[2], r[3]) for r in rows]

    @property
    def state(self) -> FollowerState:
        """The follower's position and last error."""
        return self._state

    # -- following --------------------------------------------------------------------------

    def start(self) -> None:
        """Follow the stream in a daemon thread until `stop()`."""
        self._thread = threading.Thread(target=self._run, name="usage-history", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        """Stop following (returns when the thread ended)."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=10)

    def _cursor(self) -> tuple[str, int]:
        with self.db.connection() as conn:
            row = conn.execute("SELECT gw, seq FROM cursor WHERE name = ?", (_CURSOR,)).fetchone()
        return (row["gw"], row["seq"]) if row else ("", 0)

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                self._follow()
            except DesanetError as err:
                # The gateway is down or restarting: try again, the journal keeps the gap.
                self._state = FollowerState(self._state.seq, self._state.updated_ms, str(err))
                log.warning("usage history: %s; retrying in %.0f s", err, _RETRY_S)
                self._stop.wait(_RETRY_S)

    def _follow(self) -> None:
        with UsageClient(
            self.usage_endpoint, self.replay_endpoint, security=self.security
        ) as client:
            gw, seq = self._cursor()
            newest = client.snapshot()
            if newest.gw != gw or newest.seq < seq:
                # Another gateway, or a journal started anew: its seqs are not ours.
                gw, seq = newest.gw, 0
            try:
                self._store(client.messages(seq + 1, stop=self._stop.is_set), gw, newest.seq)
            except ReplayGone as gone:
                log.warning("usage history: seqs before %d are gone; skipping to it", gone.oldest)
                self._store(client.messages(gone.oldest, stop=self._stop.is_set), gw, newest.seq)

    def _store(self, messages: Iterable[UsageMessage], gw: str, caught_up_at: int) -> None:
        batch: list[UsageMessage] = []
        for msg in messages:
            batch.append(msg)
            # Batched while replaying the backlog; one by one once live, so a page shows
            # an interval (and its events) as soon as it was published.
            if len(batch) >= _BATCH or msg.seq >= caught_up_at:
                self._write(batch, gw)
                batch = []
        if batch:
            self._write(batch, gw)

    def _write(self, batch: list[UsageMessage], gw: str) -> None:
        days: dict[tuple[str, str], list[int]] = {}
        events: list[tuple[int, int, str, str, str]] = []
        for msg in batch:
            if msg.snapshot:
                continue
            day = dt.datetime.fromtimestamp(msg.t1 / 1000, self.tz).date().isoformat()
            for i, sub in enumerate(msg.sub):
                cell = days.setdefault((sub, day), [0, 0])
                cell[0] += msg.up[i]
                cell[1] += msg.down[i]
            events.extend((msg.seq, e.t, e.sub, e.kind, e.detail) for e in msg.events)
        last = batch[-1].seq
        with self.db.transaction() as conn:
            conn.executemany(
                "INSERT INTO usage_daily (sub, day, up, down) VALUES (?, ?, ?, ?) "
                "ON CONFLICT (sub, day) DO UPDATE SET up = up + excluded.up, "
                "down = down + excluded.down",
                [(sub, day, up, down) for (sub, day), (up, down) in days.items()],
            )
            conn.executemany(
                "INSERT INTO stream_events (seq, t_ms, sub, kind, detail) VALUES (?, ?, ?, ?, ?)",
                events,
            )
            conn.execute(
                "INSERT INTO cursor (name, gw, seq) VALUES (?, ?, ?) "
                "ON CONFLICT (name) DO UPDATE SET gw = excluded.gw, seq = excluded.seq",
                (_CURSOR, gw, last),
            )
        self._state = FollowerState(last, time.time_ns() // 1_000_000, "")
