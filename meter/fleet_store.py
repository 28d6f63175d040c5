"""The hub's PostgreSQL store: usage rows partitioned by month, written by COPY, idempotently.

Tables, in schema `hub`, each PARTITION BY RANGE (t1), one partition per
billing month (`<table>_YYYYMM`, holding t1 in (start, end] as the monthly
report counts it, so the report reads one partition of each):

    stored(gw, epoch, seq, t1, rows)     one per message stored; key (gw, epoch, seq, t1)
    usage(gw, epoch, seq, sub, t0, t1, up, down, up_pkts, down_pkts, up_total, down_total)
                                         one row per subscriber and interval
    snapshots(same columns as usage)     the gateways' totals snapshots (every
                                         `snapshot_every` intervals, every subscriber)
    progress(gw, epoch, seq)             the newest seq stored per gateway life
    events(gw, epoch, seq, idx, t, sub, kind, detail)   the messages' events

Idempotence is kept per message, not per row: a batch is one transaction that
first inserts the messages' keys into `stored` (ON CONFLICT DO NOTHING,
RETURNING what was new) and then COPYs (binary, the tuples encoded by
cython_ext._copyrows in one pass per message) the rows of only those messages
straight into `usage` or `snapshots`. A message's rows exist exactly when its
`stored` row does, and a message names each subscriber once (the collector
checks), so (gw, epoch, seq, sub) is unique without a per-row index. That index
and a per-row totals upsert cost PostgreSQL 16 us a row; this costs under 2.
A collector that meets a message another one is storing waits on its key
until that commit, then skips it.

The monthly report sums the month's usage per subscriber and takes its totals
from the newest row of that month, usage or snapshot, by (t1, seq): the
totals at the end of the period (now, for the month under way), and every
subscriber the month's snapshots name, moved or not.
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
PARTITIONED = ("stored", "usage", "snapshots")
_COLUMNS = "gw, epoch, seq, sub, t0, t1, up, down, up_pkts, down_pkts, up_total, down_total"
_ROW_TYPES = """gw text NOT NULL, epoch text NOT NULL, seq bigint NOT NULL, sub text NOT NULL,
        t0 bigint NOT NULL, t1 bigint NOT NULL, up bigint NOT NULL, down bigint NOT NULL,
        up_pkts bigint NOT NULL, down_pkts bigint NOT NULL,
        up_total bigint NOT NULL, down_total bigint NOT NULL"""
_DDL = (
    f"CREATE SCHEMA IF NOT EXISTS {SCHEMA}",
    f"""CREATE TABLE IF NOT EXISTS {SCHEMA}.stored (
        gw text NOT NULL, epoch text NOT NULL, seq bigint NOT NULL, t1 bigint NOT NULL,
        rows int NOT NULL, PRIMARY KEY (gw, epoch, seq, t1)) PARTITION BY RANGE (t1)""",
    f"CREATE TABLE IF NOT EXISTS {SCHEMA}.usage ({_ROW_TYPES}) PARTITION BY RANGE (t1)",
    f"CREATE TABLE IF NOT EXISTS {SCHEMA}.snapshots ({_ROW_TYPES}) PARTITION BY RANGE (t1)",
    f"""CREATE TABLE IF NOT EXISTS {SCHEMA}.progress (
        gw text NOT NULL, epoch text NOT NULL, seq bigint NOT NULL, PRIMARY KEY (gw, epoch))""",
    f"""CREATE TABLE IF NOT EXISTS {SCHEMA}.events (
        gw text NOT NULL, epoch text NOT NULL, seq bigint NOT NULL, idx int NOT NULL,
        t bigint NOT NULL, sub text NOT NULL, kind text NOT NULL, detail text NOT NULL,
        PRIMARY KEY (gw, epoch, seq, idx))""",
)
# A schema of the earlier layout (a key per usage row, a totals table) is not converted.
_OLD_LAYOUT = (
    f"SELECT to_regclass('{SCHEMA}.usage') IS NOT NULL AND to_regclass('{SCHEMA}.stored') IS NULL"
)
# Sorted keys, so concurrent collectors take the keys' locks in one order (no deadlock).
_CLAIM = f"""INSERT INTO {SCHEMA}.stored (gw, epoch, seq, t1, rows)
    SELECT * FROM unnest(%s::text[], %s::text[], %s::bigint[], %s::bigint[], %s::int[])
    ON CONFLICT DO NOTHING RETURNING gw, epoch, seq"""
_COPY = "COPY {table} (" + _COLUMNS + ") FROM STDIN (FORMAT BINARY)"
_PROGRESS = f"""INSERT INTO {SCHEMA}.progress AS p (gw, epoch, seq) VALUES (%s, %s, %s)
    ON CONFLICT (gw, epoch) DO UPDATE SET seq = GREATEST(p.seq, excluded.seq)"""
_EVENT = f"""INSERT INTO {SCHEMA}.events (gw, epoch, seq, idx, t, sub, kind, detail)
    VALUES (%s, %s, %s, %s, %s, %s, %s, %s) ON CONFLICT DO NOTHING"""
# Bounded exactly as the partitions are ([low, high), not (start, end]: the planner
# does not reason that t1 > x means t1 >= x + 1 for integers), so it reads only that
# month's partition of usage and of snapshots. `last` is the newest row by (t1, seq).
REPORT_SQL = f"""SELECT gw, sub, up, down, last[3], last[4] FROM (
        SELECT gw, sub, SUM(up) AS up, SUM(down) AS down,
            max(ARRAY[t1, seq, up_total, down_total]) AS last
        FROM (
            SELECT gw, sub, up, down, t1, seq, up_total, down_total FROM {SCHEMA}.usage
                WHERE t1 >= %(low)s AND t1 < %(high)s
            UNION ALL
            SELECT gw, sub, 0, 0, t1, seq, up_total, down_total FROM {SCHEMA}.snapshots
                WHERE t1 >= %(low)s AND t1 < %(high)s) r
        GROUP BY gw, sub) m
    ORDER BY gw, sub"""
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
    """The binary COPY stream of every subscriber row of `batch`, in the usage table's columns."""
    chunks = [COPY_SIGNATURE]
    for s in batch:
        m = s.msg
        columns = (m.up, m.down, m.up_pkts, m.down_pkts, m.up_total, m.down_total)
        chunks.append(usage_rows(m.gw, s.epoch, m.seq, m.sub, m.t0, m.t1, columns))
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
        try:
            async with conn.transaction():
                await conn.execute("SELECT pg_advisory_xact_lock(%s)", (_PARTITION_LOCK,))
                row = await (await conn.execute(_OLD_LAYOUT)).fetchone()
                if row is not None and row[0]:
                    raise ConfigError(
                        f"schema {SCHEMA} in {redacted(dsn)} has the earlier layout (a key on "
                        f"every usage row, a totals table); rename it (ALTER SCHEMA {SCHEMA} "
                        f"RENAME TO {SCHEMA}_old) and the collector creates the current one"
                    )
                for statement in _DDL:
                    await conn.execute(statement)
        except BaseException:
            await conn.close()
            raise
        return store

    async def close(self) -> None:
        """Close the connection."""
        await self._conn.close()

    async def _ensure_months(self, months: set[str]) -> None:
        for month in sorted(months - self._months):
            low, high = partition_bounds(month)
            async with self._conn.transaction():
                await self._conn.execute("SELECT pg_advisory_xact_lock(%s)", (_PARTITION_LOCK,))
                for table in PARTITIONED:
                    create = sql.SQL(
                        "CREATE TABLE IF NOT EXISTS {} PARTITION OF {} FOR VALUES FROM ({}) TO ({})"
                    ).format(
                        sql.Identifier(SCHEMA, f"{table}_{month.replace('-', '')}"),
                        sql.Identifier(SCHEMA, table),
                        sql.Literal(low),
                        sql.Literal(high),
                    )
                    await self._conn.execute(create)
            self._months.add(month)

    async def store(self, batch: Sequence[StoredUsage]) -> int:
        """Store a batch in one transaction; returns the usage rows that were new.

        Storing a batch again (a redelivery) changes nothing and returns 0.
        """
        unique = sorted(
            {(s.msg.gw, s.epoch, s.msg.seq): s for s in reversed(batch)}.items(),
            key=lambda item: item[0],
        )
        if not unique:
            return 0
        await self._ensure_months({month_of(s.msg.t1) for _, s in unique})
        progress: dict[tuple[str, str], int] = {}
        for (gw, epoch, seq), _s in unique:
            progress[(gw, epoch)] = max(progress.get((gw, epoch), 0), seq)
        claim = (
            [k[0] for k, _ in unique],
            [k[1] for k, _ in unique],
            [k[2] for k, _ in unique],
            [s.msg.t1 for _, s in unique],
            [len(s.msg.sub) for _, s in unique],
        )
        try:
            async with self._conn.transaction():
                cur = self._conn.cursor()
                await cur.execute(_CLAIM, claim)
                claimed = {(str(g), str(e), int(q)) for g, e, q in await cur.fetchall()}
                new = [s for key, s in unique if key in claimed]
                usage = [s for s in new if not s.msg.snapshot and s.msg.sub]
                snapshots = [s for s in new if s.msg.snapshot and s.msg.sub]
                for table, part in (("usage", usage), ("snapshots", snapshots)):
                    if part:
                        statement = _COPY.format(table=f"{SCHEMA}.{table}")
                        async with cur.copy(statement) as copy:
                            await copy.write(copy_data(part))
                await cur.executemany(_PROGRESS, [(*k, v) for k, v in sorted(progress.items())])
                events = [
                    (s.msg.gw, s.epoch, s.msg.seq, i, e.t, e.sub, e.kind, e.detail)
                    for s in new
                    for i, e in enumerate(s.msg.events)
                ]
                if events:
                    await cur.executemany(_EVENT, events)
        except psycopg.Error as err:
            raise StreamError(
                f"PostgreSQL ({self._dsn}) did not store a batch: {scrub(str(err), self._dsn_full)}"
            ) from err
        return sum(len(s.msg.sub) for s in usage)

    async def report(self, period: str) -> list[PeriodUsage]:
        """Usage per subscriber in billing month `period` (YYYY-MM), every gateway, with the
        totals of the month's newest row (its end; now, for the month under way)."""
        low, high = partition_bounds(period)
        cur = await self._conn.execute(REPORT_SQL, {"low": low, "high": high})
        rows = await cur.fetchall()
        return [PeriodUsage(str(r[0]), str(r[1]), *(int(v) for v in r[2:])) for r in rows]

    async def progress(self) -> dict[tuple[str, str], int]:
        """The newest seq stored per (gateway, epoch)."""
        cur = await self._conn.execute(f"SELECT gw, epoch, seq FROM {SCHEMA}.progress")
        return {(str(r[0]), str(r[1])): int(r[2]) for r in await cur.fetchall()}
