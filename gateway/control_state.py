"""Durable control state: billing's changes to every subscriber, in SQLite (`control.sqlite`).

One row per subscriber that billing or the quota clock ever touched. The rows
live in memory for the service loop's reads; every change is written through
in one transaction (WAL, synchronous=FULL: durable when `update` returns), and
a batch of changes (a new quota month touches everyone) is one transaction too.

Damage is never guessed around: a file SQLite cannot read, a failed
`quick_check`, an unknown schema or a row whose checksum or values are wrong
stops the service with a `StateError` naming the file, before anything is
applied. SQLite has no page checksums of its own, so each row carries a CRC32
of its values: a flipped bit in a stored value is caught on load like a
damaged page.

A `control.journal` of earlier versions (checksummed JSON lines) is read once,
written into a new `control.sqlite` and renamed `control.journal.migrated`.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import sqlite3
import zlib
from collections.abc import Iterable, Iterator, Mapping
from pathlib import Path
from typing import Any

from desanet.durable import PRIVATE, fsync_dir
from desanet.errors import StateError
from desanet.gateway.control_legacy import read_legacy_journal
from desanet.gateway.control_record import (
    UNTOUCHED,
    SubscriberControl,
    check_record,
    damaged,
)
from desanet.gateway.registry import RatePlan

log = logging.getLogger(__name__)

STATE_FILE = "control.sqlite"
LEGACY_JOURNAL = "control.journal"
SCHEMA_VERSION = "1"

_SCHEMA = (
    "CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL) STRICT",
    """CREATE TABLE IF NOT EXISTS control (
        sub TEXT PRIMARY KEY,
        down_min_bps INTEGER, down_max_bps INTEGER, up_min_bps INTEGER, up_max_bps INTEGER,
        suspended TEXT,
        quota_overridden INTEGER NOT NULL,
        quota_bytes INTEGER,
        period TEXT NOT NULL,
        period_base INTEGER NOT NULL,
        throttled INTEGER NOT NULL,
        crc INTEGER NOT NULL
    ) STRICT""",
)
_COLUMNS = (
    "sub, down_min_bps, down_max_bps, up_min_bps, up_max_bps, suspended, quota_overridden, "
    "quota_bytes, period, period_base, throttled, crc"
)
_UPSERT = (
    f"INSERT INTO control ({_COLUMNS}) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?) "
    "ON CONFLICT(sub) DO UPDATE SET down_min_bps = excluded.down_min_bps, "
    "down_max_bps = excluded.down_max_bps, up_min_bps = excluded.up_min_bps, "
    "up_max_bps = excluded.up_max_bps, suspended = excluded.suspended, "
    "quota_overridden = excluded.quota_overridden, quota_bytes = excluded.quota_bytes, "
    "period = excluded.period, period_base = excluded.period_base, "
    "throttled = excluded.throttled, crc = excluded.crc"
)


class ControlState:
    """Every subscriber's `SubscriberControl`, read at construction, written through on change.

    Construction only reads (a missing file is an empty state, and nothing is
    created: `desanet run --check` and refused starts leave no trace); `open()`
    creates the file if needed and finishes a migration.
    """

    def __init__(self, state_dir: Path) -> None:
        self.path = state_dir / STATE_FILE
        self.legacy = state_dir / LEGACY_JOURNAL
        self.records: dict[str, SubscriberControl] = {}
        # +1 at every change of `records`: readers that keep a copy know when to look again.
        self.version = 0
        self._db: sqlite3.Connection | None = None
        self._migrating = False
        if self.path.exists():
            self.records = _load(self.path)
        elif self.legacy.exists():
            self.records = read_legacy_journal(self.legacy)
            self._migrating = True

    def open(self) -> None:
        """Open the database for writing (created 0600 if missing), migrating an old journal."""
        self.path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        created = not self.path.exists()
        if created:
            os.close(os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, PRIVATE))
        self._db = _connect(self.path)
        try:
            with _transaction(self._db):
                for statement in _SCHEMA:
                    self._db.execute(statement)
                self._db.execute(
                    "INSERT OR IGNORE INTO meta VALUES ('schema', ?)", (SCHEMA_VERSION,)
                )
                if self._migrating:
                    self._db.executemany(_UPSERT, (_row(k, v) for k, v in self.records.items()))
        except sqlite3.Error as err:
            raise StateError(f"{self.path}: cannot write the control state: {err}") from err
        if created:
            fsync_dir(self.path.parent)
        if self.legacy.exists():
            migrated = self.legacy.with_name(LEGACY_JOURNAL + ".migrated")
            os.replace(self.legacy, migrated)
            fsync_dir(self.path.parent)
            log.info(
                "control state: %d subscribers migrated from %s into %s (old file kept as %s)",
                len(self.records),
                self.legacy,
                self.path,
                migrated,
            )
        self._migrating = False

    def close(self) -> None:
        """Close the database (every change is already on disk)."""
        if self._db is not None:
            self._db.close()
            self._db = None

    def get(self, sub_id: str) -> SubscriberControl:
        """A subscriber's control record (defaults when billing never touched it)."""
        return self.records.get(sub_id, UNTOUCHED)

    def update(self, changes: Mapping[str, SubscriberControl]) -> None:
        """Store new records for some subscribers in one transaction; durable on return."""
        if not changes:
            return
        db = self._require_open()
        try:
            with _transaction(db):
                db.executemany(_UPSERT, (_row(k, v) for k, v in changes.items()))
        except sqlite3.Error as err:
            raise StateError(f"{self.path}: cannot write the control state: {err}") from err
        self.records.update(changes)
        self.version += 1

    def forget(self, sub_ids: Iterable[str]) -> None:
        """Drop the records of subscribers removed from the registry (one transaction)."""
        gone = [s for s in sub_ids if s in self.records]
        if not gone:
            return
        db = self._require_open()
        try:
            with _transaction(db):
                db.executemany("DELETE FROM control WHERE sub = ?", ((s,) for s in gone))
        except sqlite3.Error as err:
            raise StateError(f"{self.path}: cannot write the control state: {err}") from err
        for sub_id in gone:
            del self.records[sub_id]
        self.version += 1

    def _require_open(self) -> sqlite3.Connection:
        if self._db is None:
            raise StateError(f"{self.path}: the control state is not open for writing")
        return self._db


@contextlib.contextmanager
def _transaction(db: sqlite3.Connection) -> Iterator[None]:
    # The connection is in autocommit mode: BEGIN IMMEDIATE ... COMMIT, or ROLLBACK on error.
    db.execute("BEGIN IMMEDIATE")
    try:
        yield
    except BaseException:
        db.execute("ROLLBACK")
        raise
    db.execute("COMMIT")


def _connect(path: Path) -> sqlite3.Connection:
    try:
        # Made private before SQLite opens it: its -wal and -shm files take the same mode.
        os.close(os.open(path, os.O_RDWR | os.O_CREAT, PRIVATE))
        db = sqlite3.connect(path, isolation_level=None)
        db.execute("PRAGMA journal_mode=WAL")
        # FULL: a commit is on disk when it returns (NORMAL may lose the last ones in a crash).
        db.execute("PRAGMA synchronous=FULL")
    except sqlite3.Error as err:
        raise damaged(path, str(err)) from err
    return db


def _load(path: Path) -> dict[str, SubscriberControl]:
    db = _connect(path)
    try:
        check = db.execute("PRAGMA quick_check").fetchone()
        if check is None or check[0] != "ok":
            raise damaged(path, f"quick_check: {check[0] if check else 'no answer'}")
        tables = {r[0] for r in db.execute("SELECT name FROM sqlite_master WHERE type='table'")}
        if not tables:
            return {}  # created, crashed before the schema was written
        if not {"meta", "control"} <= tables:
            raise damaged(path, f"tables {sorted(tables)}, expected meta and control")
        version = db.execute("SELECT value FROM meta WHERE key = 'schema'").fetchone()
        if version is None or version[0] != SCHEMA_VERSION:
            raise damaged(path, f"schema version {version[0] if version else None!r}")
        records = {}
        for row in db.execute(f"SELECT {_COLUMNS} FROM control"):
            sub_id, record = _record(row, path)
            records[sub_id] = record
        return records
    except sqlite3.Error as err:
        raise damaged(path, str(err)) from err
    finally:
        db.close()


def _values(sub_id: str, r: SubscriberControl) -> tuple[Any, ...]:
    plan: tuple[int | None, ...] = (None,) * 4
    if r.plan is not None:
        p = r.plan
        plan = (p.down_min_bps, p.down_max_bps, p.up_min_bps, p.up_max_bps)
    return (
        sub_id,
        *plan,
        r.suspended,
        int(r.quota_overridden),
        r.quota_bytes,
        r.period,
        r.period_base,
        int(r.throttled),
    )


def _crc(values: tuple[Any, ...]) -> int:
    return zlib.crc32(json.dumps(values, separators=(",", ":")).encode())


def _row(sub_id: str, record: SubscriberControl) -> tuple[Any, ...]:
    check_record(sub_id, record)
    values = _values(sub_id, record)
    return (*values, _crc(values))


def _record(row: tuple[Any, ...], path: Path) -> tuple[str, SubscriberControl]:
    values, crc = tuple(row[:-1]), row[-1]
    sub_id = values[0]
    if _crc(values) != crc:
        raise damaged(path, f"the row of subscriber {sub_id!r} fails its checksum")
    rates = values[1:5]
    overridden, throttled = values[6], values[10]
    if any(v is None for v in rates) != all(v is None for v in rates) or (
        overridden not in (0, 1) or throttled not in (0, 1)
    ):
        raise damaged(path, f"the row of subscriber {sub_id!r} holds impossible values")
    record = SubscriberControl(
        plan=None if rates[0] is None else RatePlan(*rates),
        suspended=values[5],
        quota_overridden=bool(overridden),
        quota_bytes=values[7],
        period=values[8],
        period_base=values[9],
        throttled=bool(throttled),
    )
    try:
        check_record(sub_id, record)
    except StateError as err:
        raise damaged(path, str(err)) from None
    return sub_id, record
