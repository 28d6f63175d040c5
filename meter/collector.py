# Over 400 lines: one store for SQLite and PostgreSQL, its schema, migration and the epoch rule
# together.
"""The reference collector: usage stream -> SQLite (default) or PostgreSQL, idempotently.

Tables (the same in both databases):

    usage(gw, epoch, seq, sub, t0, t1, up, down, up_pkts, down_pkts, up_total, down_total,
          billed_up, billed_down)     one row per subscriber and interval; key (gw, epoch, seq, sub)
    totals(gw, sub, epoch, seq, up_total, down_total)   latest totals; key (gw, sub)
    progress(gw, epoch, seq)          the epoch being read and its newest seq stored; key (gw)
    epochs(gw, epoch, n, first_seq)   every epoch seen, n = 1, 2, ... in the order they began

A message is stored in one transaction; storing it again (a replay, a
duplicate) changes nothing, so the collector can always restart from its
progress. `billed_up`/`billed_down` are what a row adds to the bill: its
`up`/`down`, except on the first interval row of a subscriber in a new epoch.
That row may repeat usage the previous epoch already reported (a gateway that
lost the tail of its journal counts it again from an older state), so it
bills only what its totals add to the subscriber's latest totals of the
earlier epoch, and never less than nothing: max(0, total - earlier total).
See docs/usage-stream.md, "A new epoch".
"""

from __future__ import annotations

import calendar
import logging
import sqlite3
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple

from desanet.errors import ConfigError, StreamError
from desanet.meter.client import ReplayGone, UsageClient
from desanet.meter.dsn import redacted, scrub
from desanet.meter.wire import TotalsSnapshot, UsageMessage

log = logging.getLogger(__name__)


def _tables(suffix: str = "") -> tuple[str, ...]:
    return (
        f"""CREATE TABLE IF NOT EXISTS usage{suffix} (
        gw TEXT NOT NULL, epoch TEXT NOT NULL, seq BIGINT NOT NULL, sub TEXT NOT NULL,
        t0 BIGINT NOT NULL, t1 BIGINT NOT NULL,
        up BIGINT NOT NULL, down BIGINT NOT NULL,
        up_pkts BIGINT NOT NULL, down_pkts BIGINT NOT NULL,
        up_total BIGINT NOT NULL, down_total BIGINT NOT NULL,
        billed_up BIGINT NOT NULL, billed_down BIGINT NOT NULL,
        PRIMARY KEY (gw, epoch, seq, sub))""",
        f"""CREATE TABLE IF NOT EXISTS totals{suffix} (
        gw TEXT NOT NULL, sub TEXT NOT NULL, epoch TEXT NOT NULL, seq BIGINT NOT NULL,
        up_total BIGINT NOT NULL, down_total BIGINT NOT NULL,
        PRIMARY KEY (gw, sub))""",
        f"""CREATE TABLE IF NOT EXISTS progress{suffix} (
        gw TEXT PRIMARY KEY, epoch TEXT NOT NULL, seq BIGINT NOT NULL)""",
    )


_EPOCHS = """CREATE TABLE IF NOT EXISTS epochs (
        gw TEXT NOT NULL, epoch TEXT NOT NULL, n BIGINT NOT NULL, first_seq BIGINT NOT NULL,
        PRIMARY KEY (gw, epoch))"""
_TOTALS_BY_EPOCH = "CREATE INDEX IF NOT EXISTS totals_by_epoch ON totals (gw, epoch)"
# Tables of a collector from before epochs, moved into the new ones with epoch "".
_V1_COPY = (
    """INSERT INTO usage_v2 SELECT gw, '', seq, sub, t0, t1, up, down, up_pkts, down_pkts,
        up_total, down_total, up, down FROM usage""",
    "INSERT INTO totals_v2 SELECT gw, sub, '', seq, up_total, down_total FROM totals",
    "INSERT INTO progress_v2 SELECT gw, '', seq FROM progress",
    "INSERT INTO epochs SELECT gw, '', 1, 1 FROM progress",
)
_INSERT_USAGE = """INSERT INTO usage
        (gw, epoch, seq, t0, t1, sub, up, down, up_pkts, down_pkts, up_total, down_total,
         billed_up, billed_down)
        VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)
    ON CONFLICT (gw, epoch, seq, sub) DO NOTHING"""
_UPSERT = """INSERT INTO totals (gw, sub, epoch, seq, up_total, down_total)
    VALUES (?, ?, ?, ?, ?, ?)
    ON CONFLICT (gw, sub) DO UPDATE SET epoch = excluded.epoch, seq = excluded.seq,
        up_total = excluded.up_total, down_total = excluded.down_total"""
# An interval row moves totals forward in seq, or into a newer epoch. A snapshot row only
# moves them forward within their epoch: totals of an earlier epoch stay until the
# subscriber's first interval row settles the overlap (see the module docstring).
_UPSERT_TOTALS = f"{_UPSERT} WHERE excluded.epoch <> totals.epoch OR excluded.seq > totals.seq"
_UPSERT_SNAPSHOT_TOTALS = (
    f"{_UPSERT} WHERE excluded.epoch = totals.epoch AND excluded.seq > totals.seq"
)
_IN_CHUNK = 500
_SCHEMA_LOCK = 0x6465_7361  # the advisory lock collectors hold while creating tables
_GATEWAY_LOCK = 0x6465_7362  # with hashtext(gw): one gateway's messages stored one at a time
_ATTEMPTS = 5  # a store PostgreSQL ends for a deadlock or a conflict is tried this often


def _pg_retryable() -> tuple[type[Exception], ...]:
    from psycopg import errors

    return (errors.DeadlockDetected, errors.SerializationFailure)


_SAME, _NEW, _LEFT = "same", "new", "left"


class StreamPosition(NamedTuple):
    """The newest message stored of a gateway: its epoch and seq."""

    epoch: str
    seq: int


@dataclass(frozen=True)
class PeriodUsage:
    """One subscriber's billed usage in a billing period, plus its totals now."""

    gw: str
    sub: str
    up: int
    down: int
    up_total: int
    down_total: int


class UsageStore:
    """Idempotent storage of usage messages in SQLite or PostgreSQL."""

    def __init__(
        self,
        conn: Any,
        placeholder: str,
        transaction: Callable[[], Any],
        columns_sql: str,
        schema_lock: str | None = None,
        retryable: tuple[type[Exception], ...] = (),
        gateway_lock: str | None = None,
    ) -> None:
        self._conn = conn
        self._ph = placeholder
        self._transaction = transaction
        self._columns_sql = columns_sql
        self._retryable = retryable
        self._gateway_lock = gateway_lock
        with self._transaction():
            cur = self._conn.cursor()
            if schema_lock is not None:
                cur.execute(schema_lock)
            old = self._columns(cur, "usage")
            if old and "epoch" not in old:
                self._migrate_v1(cur)
            for statement in (*_tables(), _EPOCHS, _TOTALS_BY_EPOCH):
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
        return cls(conn, "?", lambda: conn, "SELECT name FROM pragma_table_info(?)")

    @classmethod
    def postgres(cls, dsn: str) -> UsageStore:
        """A store in the PostgreSQL database `dsn` (tables created if missing)."""
        import psycopg  # only collectors given a DSN need the PostgreSQL driver

        try:
            conn = psycopg.connect(dsn, autocommit=True)
        except psycopg.Error as err:
            raise ConfigError(
                f"cannot connect to PostgreSQL ({redacted(dsn)}): {scrub(str(err), dsn)}"
            ) from None
        columns = """SELECT column_name FROM information_schema.columns
            WHERE table_schema = current_schema() AND table_name = %s"""
        # Collectors started together on one database create its tables one at a time
        # (concurrent CREATE ... IF NOT EXISTS can fail on PostgreSQL's catalog).
        schema_lock = f"SELECT pg_advisory_xact_lock({_SCHEMA_LOCK})"
        gateway_lock = f"SELECT pg_advisory_xact_lock({_GATEWAY_LOCK}, hashtext(%s))"
        return cls(
            conn, "%s", conn.transaction, columns, schema_lock, _pg_retryable(), gateway_lock
        )

    def _sql(self, statement: str) -> str:
        return statement.replace("?", self._ph)

    def _columns(self, cur: Any, table: str) -> set[str]:
        cur.execute(self._columns_sql, (table,))
        return {str(r[0]) for r in cur.fetchall()}

    def _migrate_v1(self, cur: Any) -> None:
        log.warning("collector database: adding stream epochs (earlier usage gets epoch '')")
        for statement in (*_tables("_v2"), _EPOCHS, *_V1_COPY):
            cur.execute(statement)
        for table in ("usage", "totals", "progress"):
            cur.execute(f"DROP TABLE {table}")
            cur.execute(f"ALTER TABLE {table}_v2 RENAME TO {table}")

    def close(self) -> None:
        """Close the database connection."""
        self._conn.close()

    def _one(self, statement: str, args: Sequence[Any]) -> Any:
        cur = self._conn.cursor()
        cur.execute(self._sql(statement), tuple(args))
        row = cur.fetchone()
        self._conn.commit()
        return row

    def position(self, gw: str) -> StreamPosition | None:
        """The epoch being read from gateway `gw` and its newest seq stored (None: nothing yet)."""
        row = self._one("SELECT epoch, seq FROM progress WHERE gw = ?", (gw,))
        return StreamPosition(str(row[0]), int(row[1])) if row else None

    def last_seq(self, gw: str) -> int:
        """The newest seq stored of gateway `gw`'s current epoch, 0 if none."""
        pos = self.position(gw)
        return pos.seq if pos is not None else 0

    def epochs(self, gw: str) -> list[str]:
        """The epochs of gateway `gw` stored, in the order they began."""
        cur = self._conn.cursor()
        cur.execute(self._sql("SELECT epoch FROM epochs WHERE gw = ? ORDER BY n"), (gw,))
        rows = [str(r[0]) for r in cur.fetchall()]
        self._conn.commit()
        return rows

    def gateways(self) -> list[str]:
        """Gateway ids with stored usage."""
        cur = self._conn.cursor()
        cur.execute("SELECT gw FROM progress ORDER BY gw")
        rows = [str(r[0]) for r in cur.fetchall()]
        self._conn.commit()
        return rows

    def store(self, msg: UsageMessage) -> None:
        """Store one message (one transaction); storing it twice changes nothing.

        Collectors sharing a database may meet on the same rows: a transaction
        PostgreSQL ends for a deadlock or a serialization conflict is run again.
        """
        for attempt in range(_ATTEMPTS):
            try:
                self._store(msg)
                return
            except self._retryable as err:
                if attempt == _ATTEMPTS - 1:
                    raise StreamError(
                        f"gateway {msg.gw} seq {msg.seq}: not stored after {_ATTEMPTS} "
                        f"attempts ({type(err).__name__})"
                    ) from err
                log.info("seq %d of %s met another collector; storing again", msg.seq, msg.gw)
                time.sleep(0.05 * (attempt + 1))

    def _store(self, msg: UsageMessage) -> None:
        """Store one message in one transaction (see `store`).

        Messages of one epoch must come in seq order (UsageClient.messages gives
        them so). A message of an epoch that was left for a newer one is refused,
        unless it was stored already or holds no usage (a snapshot).
        """
        with self._transaction():
            cur = self._conn.cursor()
            if self._gateway_lock is not None:
                # Collectors sharing the database take a gateway's messages one at a time:
                # its progress is read, then written, in the same transaction.
                cur.execute(self._gateway_lock, (msg.gw,))
            if self._advance(cur, msg.gw, msg.epoch, msg.seq) == _LEFT:
                cur.execute(
                    self._sql("SELECT 1 FROM usage WHERE gw = ? AND epoch = ? AND seq = ?"),
                    (msg.gw, msg.epoch, msg.seq),
                )
                if msg.snapshot or not msg.sub or cur.fetchone() is not None:
                    return
                raise StreamError(
                    f"gateway {msg.gw}: a message of epoch {msg.epoch} (seq {msg.seq}) arrived "
                    "after a newer epoch began; it was not stored"
                )
            if not msg.snapshot:
                earlier = self._earlier_totals(cur, msg)
                rows = []
                for rec in msg.records():
                    billed = (rec.up, rec.down)
                    if rec.sub in earlier:
                        up0, down0 = earlier[rec.sub]
                        billed = (max(0, rec.up_total - up0), max(0, rec.down_total - down0))
                    rows.append((*rec, *billed))
                cur.executemany(self._sql(_INSERT_USAGE), rows)
            upsert = _UPSERT_SNAPSHOT_TOTALS if msg.snapshot else _UPSERT_TOTALS
            totals = [
                (msg.gw, sub, msg.epoch, msg.seq, msg.up_total[i], msg.down_total[i])
                for i, sub in enumerate(msg.sub)
            ]
            if totals:
                cur.executemany(self._sql(upsert), totals)

    def _advance(self, cur: Any, gw: str, epoch: str, seq: int) -> str:
        """Move the progress to (epoch, seq): _SAME or _NEW epoch, or _LEFT (an older one)."""
        cur.execute(self._sql("SELECT epoch, seq FROM progress WHERE gw = ?"), (gw,))
        row = cur.fetchone()
        if row is not None and row[0] == epoch:
            if seq > int(row[1]):
                cur.execute(self._sql("UPDATE progress SET seq = ? WHERE gw = ?"), (seq, gw))
            return _SAME
        cur.execute(self._sql("SELECT epoch, n FROM epochs WHERE gw = ? ORDER BY n DESC"), (gw,))
        seen = {str(r[0]): int(r[1]) for r in cur.fetchall()}
        if epoch in seen:
            return _LEFT
        if row is not None:
            log.warning(
                "gateway %s: epoch %s (stored up to seq %s) is followed by epoch %s from seq %d",
                gw,
                row[0],
                row[1],
                epoch,
                seq,
            )
        cur.execute(
            self._sql("INSERT INTO epochs (gw, epoch, n, first_seq) VALUES (?, ?, ?, ?)"),
            (gw, epoch, max(seen.values(), default=0) + 1, seq),
        )
        cur.execute(
            self._sql(
                "INSERT INTO progress (gw, epoch, seq) VALUES (?, ?, ?) ON CONFLICT (gw) "
                "DO UPDATE SET epoch = excluded.epoch, seq = excluded.seq"
            ),
            (gw, epoch, seq),
        )
        return _NEW

    def _earlier_totals(self, cur: Any, msg: UsageMessage) -> dict[str, tuple[int, int]]:
        """Latest totals of the message's subscribers that date from an earlier epoch."""
        other = "gw = ? AND (epoch < ? OR epoch > ?)"
        cur.execute(
            self._sql(f"SELECT 1 FROM totals WHERE {other} LIMIT 1"),
            (msg.gw, msg.epoch, msg.epoch),
        )
        if cur.fetchone() is None:
            return {}
        out: dict[str, tuple[int, int]] = {}
        for start in range(0, len(msg.sub), _IN_CHUNK):
            chunk = msg.sub[start : start + _IN_CHUNK]
            marks = ", ".join("?" * len(chunk))
            cur.execute(
                self._sql(
                    f"SELECT sub, up_total, down_total FROM totals WHERE {other} "
                    f"AND sub IN ({marks})"
                ),
                (msg.gw, msg.epoch, msg.epoch, *chunk),
            )
            out.update((str(r[0]), (int(r[1]), int(r[2]))) for r in cur.fetchall())
        return out

    def store_snapshot(self, snap: TotalsSnapshot) -> None:
        """Take a replay snapshot's totals (after the gateway no longer had the missing seqs)."""
        rows = [
            (snap.gw, sub, snap.epoch, snap.seq, up, down)
            for sub, (up, down) in snap.totals.items()
        ]
        with self._transaction():
            cur = self._conn.cursor()
            if self._advance(cur, snap.gw, snap.epoch, snap.seq) == _LEFT:
                return  # totals of an epoch that was left behind say nothing new
            if rows:
                cur.executemany(self._sql(_UPSERT_TOTALS), rows)

    def totals(self, gw: str) -> dict[str, tuple[int, int]]:
        """Latest (up_total, down_total) per subscriber of gateway `gw`."""
        cur = self._conn.cursor()
        cur.execute(self._sql("SELECT sub, up_total, down_total FROM totals WHERE gw = ?"), (gw,))
        out = {str(r[0]): (int(r[1]), int(r[2])) for r in cur.fetchall()}
        self._conn.commit()
        return out

    def report(self, start_ms: int, end_ms: int) -> list[PeriodUsage]:
        """Billed usage per subscriber of intervals ending in (start_ms, end_ms], every gateway."""
        cur = self._conn.cursor()
        cur.execute(
            self._sql(
                """SELECT t.gw, t.sub, COALESCE(SUM(u.billed_up), 0),
                    COALESCE(SUM(u.billed_down), 0), t.up_total, t.down_total
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
    totals are taken from a snapshot and collecting continues after it. A new
    epoch is followed from its first seq (UsageClient.messages).
    """
    gw = gateway_id or client.gateway_id
    if gw is None:
        known: Sequence[str] = store.gateways()
        gw = known[0] if len(known) == 1 else None
    pos = store.position(gw) if gw is not None else None
    epoch, from_seq = (pos.epoch, pos.seq + 1) if pos is not None else (None, 1)
    stored = 0
    while True:
        try:
            for msg in client.messages(
                from_seq, epoch=epoch, idle_timeout_ms=idle_timeout_ms, stop=stop
            ):
                if gw is not None and msg.gw != gw:
                    raise StreamError(f"message from gateway {msg.gw!r}, collecting {gw!r}")
                store.store(msg)
                stored += 1
                epoch, from_seq = msg.epoch, msg.seq + 1
                if on_message is not None:
                    on_message(msg)
            return stored
        except ReplayGone as gone:
            log.warning("%s; resynchronising totals from a snapshot", gone)
            snap = client.snapshot()
            store.store_snapshot(snap)
            epoch, from_seq = snap.epoch, snap.seq + 1
