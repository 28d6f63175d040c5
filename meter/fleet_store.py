"""The hub's PostgreSQL store: usage rows partitioned by month, written by COPY, idempotently.

Tables, in schema `hub`:

    usage(gw, epoch, seq, sub, t0, t1, up, down, up_pkts, down_pkts, up_total, down_total)
        one row per subscriber and interval; key (gw, epoch, seq, sub) (+ t1, the
        partition key: one message has one t1); PARTITION BY RANGE (t1), one
        partition per billing month, usage_YYYYMM, holding t1 in (start, end]
        as the monthly report counts it, so the report reads one partition
    totals(gw, sub, epoch, seq, t1, up_total, down_total)   the newest totals
    progress(gw, epoch, seq)                                 the newest seq stored
    events(gw, epoch, seq, idx, t, sub, kind, detail)        the messages' events

A batch of messages is one transaction: its rows are COPYed (binary, the
tuples encoded by cython_ext._copyrows in one pass per message) into a
temporary staging table and moved with INSERT ... ON CONFLICT DO NOTHING, so a
redelivered message changes nothing. Totals only move forward in (t1, seq).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import psycopg
from psycopg import sql

from desanet.cython_ext._copyrows import COPY_SIGNATURE, COPY_TRAILER, usage_rows
from desanet.errors import ConfigError, StreamError
from desanet.meter.collector import PeriodUsage, month_bounds_ms
from desanet.meter.dsn import redacted, scrub
from desanet.meter.wire import UsageMessage

log = logging.getLogger(__name__)

SCHEMA = "hub"
_COLUMNS = "gw, epoch, seq, sub, t0, t1, up, down, up_pkts, down_pkts, up_total, down_total"
_DDL = (
    f"CREATE SCHEMA IF NOT EXISTS {SCHEMA}",
    f"""CREATE TABLE IF NOT EXISTS {SCHEMA}.usage (
        gw text NOT NULL, epoch text NOT NULL, seq bigint NOT NULL, sub text NOT NULL,
        t0 bigint NOT NULL, t1 bigint NOT NULL, up bigint NOT NULL, down bigint NOT NULL,
        up_pkts bigint NOT NULL, down_pkts bigint NOT NULL,
        up_total bigint NOT NULL, down_total bigint NOT NULL,
        PRIMARY KEY (gw, epoch, seq, sub, t1)) PARTITION BY RANGE (t1)""",
    f"""CREATE TABLE IF NOT EXISTS {SCHEMA}.totals (
        gw text NOT NULL, sub text NOT NULL, epoch text NOT NULL, seq bigint NOT NULL,
        t1 bigint NOT NULL, up_total bigint NOT NULL, down_total bigint NOT NULL,
        PRIMARY KEY (gw, sub))""",
    f"""CREATE TABLE IF NOT EXISTS {SCHEMA}.progress (
        gw text NOT NULL, epoch text NOT NULL, seq bigint NOT NULL, PRIMARY KEY (gw, epoch))""",
    f"""CREATE TABLE IF NOT EXISTS {SCHEMA}.events (
        gw text NOT NULL, epoch text NOT NULL, seq bigint NOT NULL, idx int NOT NULL,
        t bigint NOT NULL, sub text NOT NULL, kind text NOT NULL, detail text NOT NULL,
        PRIMARY KEY (gw, epoch, seq, idx))""",
)
_STAGING = """CREATE TEMP TABLE IF NOT EXISTS hub_staging (
    gw text, epoch text, seq bigint, sub text, t0 bigint, t1 bigint, up bigint, down bigint,
    up_pkts bigint, down_pkts bigint, up_total bigint, down_total bigint, snapshot boolean)
    ON COMMIT DELETE ROWS"""
_COPY = f"COPY hub_staging ({_COLUMNS}, snapshot) FROM STDIN (FORMAT BINARY)"
_MOVE_USAGE = f"""INSERT INTO {SCHEMA}.usage ({_COLUMNS})
    SELECT {_COLUMNS} FROM hub_staging WHERE NOT snapshot ON CONFLICT DO NOTHING"""
# Sorted, so concurrent collectors lock totals rows in one order (no deadlock between them).
_MOVE_TOTALS = f"""INSERT INTO {SCHEMA}.totals AS t (gw, sub, epoch, seq, t1, up_total, down_total)
    SELECT DISTINCT ON (gw, sub) gw, sub, epoch, seq, t1, up_total, down_total
        FROM hub_staging ORDER BY gw, sub, t1 DESC, seq DESC
    ON CONFLICT (gw, sub) DO UPDATE SET epoch = excluded.epoch, seq = excluded.seq,
        t1 = excluded.t1, up_total = excluded.up_total, down_total = excluded.down_total
    WHERE (excluded.t1, excluded.seq) > (t.t1, t.seq)"""
_PROGRESS = f"""INSERT INTO {SCHEMA}.progress AS p (gw, epoch, seq) VALUES (%s, %s, %s)
    ON CONFLICT (gw, epoch) DO UPDATE SET seq = GREATEST(p.seq, excluded.seq)"""
_EVENT = f"""INSERT INTO {SCHEMA}.events (gw, epoch, seq, idx, t, sub, kind, detail)
    VALUES (%s, %s, %s, %s, %s, %s, %s, %s) ON CONFLICT DO NOTHING"""
# The period's usage is summed in a subquery bounded exactly as the partitions are
# ([low, high), not (start, end]: the planner does not reason that t1 > x means
# t1 >= x + 1 for integers), so it keeps only that month's partition.
REPORT_SQL = f"""SELECT t.gw, t.sub, COALESCE(p.up, 0), COALESCE(p.down, 0),
        t.up_total, t.down_total
    FROM {SCHEMA}.totals t LEFT JOIN (
        SELECT gw, sub, SUM(up) AS up, SUM(down) AS down FROM {SCHEMA}.usage
        WHERE t1 >= %(low)s AND t1 < %(high)s GROUP BY gw, sub) p
    ON p.gw = t.gw AND p.sub = t.sub
    ORDER BY t.gw, t.sub"""
_PARTITION_LOCK = 0x64657361  # one advisory lock serialises partition creation


@dataclass(frozen=True)
class StoredUsage:
    """One usage message as the hub stores it: its stream identity and its decoded body."""

    epoch: str
    msg: UsageMessage


def month_of(t1_ms: int) -> str:
    """The billing month (YYYY-MM) an interval ending at `t1_ms` belongs to: t1 in (start, end]."""
    year, month = time.gmtime((t1_ms - 1) // 1000)[:2]
    return f"{year:04d}-{month:02d}"


def partition_bounds(period: str) -> tuple[int, int]:
    """[from, to) of the t1 values partition usage_YYYYMM holds: t1 in (start, end]."""
    start, end = month_bounds_ms(period)
    return start + 1, end + 1


def copy_data(batch: Sequence[StoredUsage]) -> bytes:
    """The binary COPY stream of every subscriber row of `batch`, in hub_staging's columns."""
    chunks = [COPY_SIGNATURE]
    for s in batch:
        m = s.msg
        columns = (m.up, m.down, m.up_pkts, m.down_pkts, m.up_total, m.down_total)
        chunks.append(usage_rows(m.gw, s.epoch, m.seq, m.sub, m.t0, m.t1, columns, m.snapshot))
    chunks.append(COPY_TRAILER)
    return b"".join(chunks)


class HubStore:
    """The hub's PostgreSQL database, written by one collector process (async psycopg)."""

    def __init__(self, conn: psycopg.AsyncConnection[Any], dsn: str) -> None:
        self._conn = conn
        self._dsn = redacted(dsn)
        self._dsn_full = dsn
        self._months: set[str] = set()

    @classmethod
    async def connect(cls, dsn: str) -> HubStore:
        """Connect and create the schema if missing; errors never show a password."""
        try:
            conn = await psycopg.AsyncConnection.connect(dsn, autocommit=True)
        except psycopg.Error as err:
            raise ConfigError(
                f"cannot connect to PostgreSQL ({redacted(dsn)}): {scrub(str(err), dsn)}"
            ) from None
        store = cls(conn, dsn)
        async with conn.transaction():
            await conn.execute("SELECT pg_advisory_xact_lock(%s)", (_PARTITION_LOCK,))
            for statement in _DDL:
                await conn.execute(statement)
        await conn.execute(_STAGING)
        return store

    async def close(self) -> None:
        """Close the connection."""
        await self._conn.close()

    async def _ensure_months(self, months: set[str]) -> None:
        for month in sorted(months - self._months):
            low, high = partition_bounds(month)
            name = sql.Identifier(SCHEMA, "usage_" + month.replace("-", ""))
            create = sql.SQL(
                "CREATE TABLE IF NOT EXISTS {} PARTITION OF {}.usage FOR VALUES FROM ({}) TO ({})"
            ).format(name, sql.Identifier(SCHEMA), sql.Literal(low), sql.Literal(high))
            async with self._conn.transaction():
                await self._conn.execute("SELECT pg_advisory_xact_lock(%s)", (_PARTITION_LOCK,))
                await self._conn.execute(create)
            self._months.add(month)

    async def store(self, batch: Sequence[StoredUsage]) -> int:
        """Store a batch in one transaction; returns the usage rows that were new.

        Storing a batch again (a redelivery) changes nothing and returns 0.
        """
        if not batch:
            return 0
        await self._ensure_months({month_of(s.msg.t1) for s in batch if not s.msg.snapshot})
        progress: dict[tuple[str, str], int] = {}
        for s in batch:
            key = (s.msg.gw, s.epoch)
            progress[key] = max(progress.get(key, 0), s.msg.seq)
        events = [
            (s.msg.gw, s.epoch, s.msg.seq, i, e.t, e.sub, e.kind, e.detail)
            for s in batch
            for i, e in enumerate(s.msg.events)
        ]
        data = copy_data(batch)
        try:
            async with self._conn.transaction():
                cur = self._conn.cursor()
                async with cur.copy(_COPY) as copy:
                    await copy.write(data)
                await cur.execute(_MOVE_USAGE)
                new_rows = cur.rowcount
                await cur.execute(_MOVE_TOTALS)
                await cur.executemany(_PROGRESS, [(*k, v) for k, v in sorted(progress.items())])
                if events:
                    await cur.executemany(_EVENT, events)
        except psycopg.Error as err:
            raise StreamError(
                f"PostgreSQL ({self._dsn}) did not store a batch: {scrub(str(err), self._dsn_full)}"
            ) from err
        return new_rows

    async def report(self, period: str) -> list[PeriodUsage]:
        """Usage per subscriber in billing month `period` (YYYY-MM), every gateway."""
        low, high = partition_bounds(period)
        cur = await self._conn.execute(REPORT_SQL, {"low": low, "high": high})
        rows = await cur.fetchall()
        return [PeriodUsage(str(r[0]), str(r[1]), *(int(v) for v in r[2:])) for r in rows]

    async def progress(self) -> dict[tuple[str, str], int]:
        """The newest seq stored per (gateway, epoch)."""
        cur = await self._conn.execute(f"SELECT gw, epoch, seq FROM {SCHEMA}.progress")
        return {(str(r[0]), str(r[1])): int(r[2]) for r in await cur.fetchall()}
