"""The console's own database (SQLite, mode 0600): users, the audit log, usage history.

One file in the console's state directory. Each thread opens its own
connection (SQLite connections are not shared across threads); WAL lets the
history follower write while pages read.
"""

from __future__ import annotations

import contextlib
import os
import sqlite3
import threading
from collections.abc import Iterator
from pathlib import Path

from desanet.errors import DesanetError

DB_FILE = "console.db"

_SCHEMA = """
CREATE TABLE IF NOT EXISTS users (
    name TEXT PRIMARY KEY,
    role TEXT NOT NULL,
    hash TEXT NOT NULL,
    language TEXT NOT NULL DEFAULT '',
    -- bumped on a password or role change or removal: sessions of the old epoch end
    epoch INTEGER NOT NULL DEFAULT 1,
    created_ms INTEGER NOT NULL
);
CREATE TABLE IF NOT EXISTS audit (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    t_ms INTEGER NOT NULL,
    user TEXT NOT NULL,
    action TEXT NOT NULL,
    target TEXT NOT NULL,
    detail TEXT NOT NULL,
    ok INTEGER NOT NULL
);
CREATE TABLE IF NOT EXISTS usage_daily (
    day TEXT NOT NULL,
    sub TEXT NOT NULL,
    up INTEGER NOT NULL,
    down INTEGER NOT NULL,
    PRIMARY KEY (sub, day)
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS stream_events (
    seq INTEGER NOT NULL,
    t_ms INTEGER NOT NULL,
    sub TEXT NOT NULL,
    kind TEXT NOT NULL,
    detail TEXT NOT NULL
);
CREATE INDEX IF NOT EXISTS stream_events_sub ON stream_events (sub, t_ms);
CREATE TABLE IF NOT EXISTS cursor (
    name TEXT PRIMARY KEY,
    gw TEXT NOT NULL,
    seq INTEGER NOT NULL
);
"""


class Database:
    """The console database in `state_dir`: one connection per thread, tables made once."""

    def __init__(self, state_dir: Path) -> None:
        self.path = state_dir / DB_FILE
        self._local = threading.local()
        try:
            state_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
            if not self.path.exists():
                os.close(os.open(self.path, os.O_WRONLY | os.O_CREAT, 0o600))
            with self.connection() as conn:
                conn.execute("PRAGMA journal_mode=WAL")
                conn.executescript(_SCHEMA)
        except (OSError, sqlite3.Error) as err:
            raise DesanetError(f"{self.path}: cannot open the console database: {err}") from err

    @contextlib.contextmanager
    def connection(self) -> Iterator[sqlite3.Connection]:
        """This thread's connection, in autocommit mode (use `BEGIN` for a transaction)."""
        conn = getattr(self._local, "conn", None)
        if conn is None:
            conn = sqlite3.connect(self.path, timeout=10, isolation_level=None)
            conn.execute("PRAGMA synchronous=NORMAL")
            conn.row_factory = sqlite3.Row
            self._local.conn = conn
        try:
            yield conn
        except sqlite3.Error as err:
            raise DesanetError(f"{self.path}: {err}") from err

    @contextlib.contextmanager
    def transaction(self) -> Iterator[sqlite3.Connection]:
        """This thread's connection inside BEGIN ... COMMIT (ROLLBACK on an exception)."""
        with self.connection() as conn:
            conn.execute("BEGIN IMMEDIATE")
            try:
                yield conn
            except BaseException:
                conn.execute("ROLLBACK")
                raise
            conn.execute("COMMIT")
