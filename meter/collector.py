"""The reference collector: usage stream -> SQLite (default) or PostgreSQL, idempotently.

Tables (the same in both databases):

    usage(gw, seq, sub, t0, t1, up, down, up_pkts, down_pkts, up_total, down_total)
        one row per subscriber and interval; primary key (gw, seq, sub)
    totals(gw, sub, seq, up_total, down_total)   latest totals; primary key (gw, sub)
    progress(gw, seq)                            newest seq stored; primary key (gw)

A message is stored in one transaction; storing it again (a replay, a
duplicate) changes nothing, so the collector can always restart from
`progress.seq + 1`.
"""

from __future__ import annotations

import calendar
import logging
import sqlite3
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from desanet.errors import ConfigError, StreamError
from desanet.meter.client import ReplayGone, Snapshot, UsageClient
from desanet.meter.wire import UsageMessage

log = logging.getLogger(__name__)

_SCHEMA = (
    """CREATE TABLE IF NOT EXISTS usage (
        gw TEXT NOT NULL, seq BIGINT NOT NULL, sub TEXT NOT NULL,
        t0 BIGINT NOT NULL, t1 BIGINT NOT NULL,
        up BIGINT NOT NULL, down BIGINT NOT NULL,
        up_pkts BIGINT NOT NULL, down_pkts BIGINT NOT NULL,
        up_total BIGINT NOT NULL, down_total BIGINT NOT NULL,
        PRIMARY KEY (gw, seq, sub))""",
    """CREATE TABLE IF NOT EXISTS totals (
        gw TEXT NOT NULL, sub TEXT NOT NULL, seq BIGINT NOT NULL,
        up_total BIGINT NOT NULL, down_total BIGINT NOT NULL,
        PRIMARY KEY (gw, sub))""",
    """CREATE TABLE IF NOT EXISTS progress (gw TEXT PRIMARY KEY, seq BIGINT NOT NULL)""",
)
_INSERT_USAGE = """INSERT INTO usage
        (gw, seq, t0, t1, sub, up, down, up_pkts, down_pkts, up_total, down_total)
        VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)
    ON CONFLICT (gw, seq, sub) DO NOTHING"""
# Totals only move forward in seq: a replayed old message cannot roll them back.
_UPSERT_TOTALS = """INSERT INTO totals (gw, sub, seq, up_total, down_total) VALUES (?, ?, ?, ?, ?)
    ON CONFLICT (gw, sub) DO UPDATE SET seq = excluded.seq,
        up_total = excluded.up_total, down_total = excluded.down_total
    WHERE excluded.seq > totals.seq"""
_UPSERT_PROGRESS = """INSERT INTO progress (gw, seq) VALUES (?, ?)
    ON CONFLICT (gw) DO UPDATE SET seq = excluded.seq WHERE excluded.seq > progress.seq"""


@dataclass(frozen=True)
class PeriodUsage:
    """One subscriber's usage in a billing period, plus its totals now."""

    gw: str
    sub: str
    up: int
    down: int
    up_total: int
    down_total: int


class UsageStore:
    """Idempotent storage of usage messages in SQLite or PostgreSQL."""

    def __init__(self, conn: Any, placeholder: str, transaction: Callable[[], Any]) -> None:
        self._conn = conn
        self._ph = placeholder
        self._transaction = transaction
        with self._transaction():
            cur = self._conn.cursor()
            for statement in _SCHEMA:
                cur.execute(statement)

    @classmethod
    def sqlite(cls, path: Path) -> UsageStore:
        """A store in the SQLite file `path` (created if missing)."""
        try:
            conn = sqlite3.connect(str(path))
        except sqlite3.Error as err:
            raise ConfigError(f"cannot open SQLite database {path}: {err}") from err
        conn.execute("PRAGMA journal_mode=WAL")
        # sqlite3's connection context manager is one transaction: commit, or roll back.
        return cls(conn, "?", lambda: conn)

    @classmethod
    def postgres(cls, dsn: str) -> UsageStore:
        """A store in the PostgreSQL database `dsn` (tables created if missing)."""
        import psycopg  # only collectors given a DSN need the PostgreSQL driver

        try:
            conn = psycopg.connect(dsn, autocommit=True)
        except psycopg.Error as err:
            raise ConfigError(f"cannot connect to PostgreSQL ({dsn}): {err}") from err
        return cls(conn, "%s", conn.transaction)

    def _sql(self, statement: str) -> str:
        return statement.replace("?", self._ph)

    def close(self) -> None:
        """Close the database connection."""
        self._conn.close()

    def last_seq(self, gw: str) -> int:
        """The newest seq stored for gateway `gw`, 0 if none."""
        cur = self._conn.cursor()
        cur.execute(self._sql("SELECT seq FROM progress WHERE gw = ?"), (gw,))
        row = cur.fetchone()
        self._conn.commit()
        return int(row[0]) if row else 0

    def gateways(self) -> list[str]:
        """Gateway ids with stored usage."""
        cur = self._conn.cursor()
        cur.execute("SELECT gw FROM progress ORDER BY gw")
        rows = [str(r[0]) for r in cur.fetchall()]
        self._conn.commit()
        return rows

    def store(self, msg: UsageMessage) -> None:
        """Store one message (one transaction); storing it twice changes nothing."""
        totals = [
            (msg.gw, sub, msg.seq, msg.up_total[i], msg.down_total[i])
            for i, sub in enumerate(msg.sub)
        ]
        with self._transaction():
            cur = self._conn.cursor()
            if not msg.snapshot:
                cur.executemany(self._sql(_INSERT_USAGE), list(msg.records()))
            if totals:
                cur.executemany(self._sql(_UPSERT_TOTALS), totals)
            cur.execute(self._sql(_UPSERT_PROGRESS), (msg.gw, msg.seq))

    def store_snapshot(self, snap: Snapshot) -> None:
        """Take a replay snapshot's totals (after the gateway no longer had the missing seqs)."""
        rows = [(snap.gw, sub, snap.seq, up, down) for sub, (up, down) in snap.totals.items()]
        with self._transaction():
            cur = self._conn.cursor()
            if rows:
                cur.executemany(self._sql(_UPSERT_TOTALS), rows)
            cur.execute(self._sql(_UPSERT_PROGRESS), (snap.gw, snap.seq))

    def totals(self, gw: str) -> dict[str, tuple[int, int]]:
        """Latest (up_total, down_total) per subscriber of gateway `gw`."""
        cur = self._conn.cursor()
        cur.execute(self._sql("SELECT sub, up_total, down_total FROM totals WHERE gw = ?"), (gw,))
        out = {str(r[0]): (int(r[1]), int(r[2])) for r in cur.fetchall()}
        self._conn.commit()
        return out

    def report(self, start_ms: int, end_ms: int) -> list[PeriodUsage]:
        """Usage per subscriber of intervals ending in (start_ms, end_ms], every gateway."""
        cur = self._conn.cursor()
        cur.execute(
            self._sql(
                """SELECT t.gw, t.sub,
                    COALESCE(SUM(u.up), 0), COALESCE(SUM(u.down), 0), t.up_total, t.down_total
                FROM totals t LEFT JOIN usage u
                    ON u.gw = t.gw AND u.sub = t.sub AND u.t1 > ? AND u.t1 <= ?
                GROUP BY t.gw, t.sub, t.up_total, t.down_total ORDER BY t.gw, t.sub"""
            ),
            (start_ms, end_ms),
        )
        rows = [PeriodUsage(str(r[0]), str(r[1]), *(int(v) for v in r[2:])) for r in cur.fetchall()]
        self._conn.commit()
        return rows


def month_bounds_ms(period: str) -> tuple[int, int]:
    """[start, end) of a billing month `YYYY-MM` (UTC) in Unix ms."""
    try:
        year, month = (int(part) for part in period.split("-"))
        if not 1 <= month <= 12:
            raise ValueError(period)
    except ValueError:
        raise ConfigError(f"billing period {period!r}: write it as YYYY-MM, e.g. 2026-11") from None
    start = calendar.timegm((year, month, 1, 0, 0, 0))
    end = calendar.timegm((year + month // 12, month % 12 + 1, 1, 0, 0, 0))
    return start * 1000, end * 1000


def collect(
    client: UsageClient,
    store: UsageStore,
    gateway_id: str | None = None,
    *,
    idle_timeout_ms: int | None = None,
    stop: Callable[[], bool] | None = None,
    on_message: Callable[[UsageMessage], None] | None = None,
) -> int:
    """Store the stream from where the store left off; returns the messages stored.

    When the gateway no longer holds the missing seqs (journal retention), the
    totals are taken from a snapshot and collecting continues after it.
    """
    gw = gateway_id or client.gateway_id
    if gw is None:
        known: Sequence[str] = store.gateways()
        gw = known[0] if len(known) == 1 else None
    from_seq = store.last_seq(gw) + 1 if gw is not None else 1
    stored = 0
    while True:
        try:
            for msg in client.messages(from_seq, idle_timeout_ms=idle_timeout_ms, stop=stop):
                if gw is not None and msg.gw != gw:
                    raise StreamError(f"message from gateway {msg.gw!r}, collecting {gw!r}")
                store.store(msg)
                stored += 1
                from_seq = msg.seq + 1
                if on_message is not None:
                    on_message(msg)
            return stored
        except ReplayGone as gone:
            log.warning("%s; resynchronising totals from a snapshot", gone)
            snap = client.snapshot()
            store.store_snapshot(snap)
            from_seq = snap.seq + 1
