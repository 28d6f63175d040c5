"""Console users: names, roles, argon2 password hashes, and the audit log of what each one did.

Roles are ordered: a viewer reads, an operator also acts on subscribers, an
admin also manages users. Passwords are hashed with argon2id (argon2-cffi's
defaults, re-hashed on login when those defaults grow).
"""

from __future__ import annotations

import re
import sqlite3
import time
from dataclasses import dataclass

from argon2 import PasswordHasher
from argon2.exceptions import InvalidHashError, VerificationError

from desanet.errors import DesanetError
from desanet.gateway.console.store import Database

ROLES = ("viewer", "operator", "admin")
MIN_PASSWORD = 8
_NAME = re.compile(r"^[a-z0-9][a-z0-9_.-]{0,31}$")
_hasher = PasswordHasher()
# Verified against when the name is unknown, so a wrong name costs as long as a wrong password.
_DUMMY_HASH = _hasher.hash("not a password of anyone")


class UserError(DesanetError):
    """A user could not be added, changed or removed (the message says why)."""


@dataclass(frozen=True)
class User:
    """A console user as the pages see it (never the hash)."""

    name: str
    role: str
    language: str
    epoch: int

    def can(self, role: str) -> bool:
        """True when this user's role is `role` or above it."""
        return ROLES.index(self.role) >= ROLES.index(role)


@dataclass(frozen=True)
class AuditEntry:
    """One action: who, what, on what, and whether the gateway accepted it."""

    t_ms: int
    user: str
    action: str
    target: str
    detail: str
    ok: bool


def check_name(name: str) -> str:
    """`name` if it can be a user name (lowercase letters, digits, '_', '.', '-'; at most 32)."""
    if not _NAME.match(name):
        raise UserError(
            f"{name!r}: a user name is lowercase letters, digits, '_', '.' or '-' (at most 32)"
        )
    return name


def check_role(role: str) -> str:
    """`role` if it is one of ROLES."""
    if role not in ROLES:
        raise UserError(f"role {role!r} is not one of {', '.join(ROLES)}")
    return role


def check_password(password: str) -> str:
    """`password` if it is long enough."""
    if len(password) < MIN_PASSWORD:
        raise UserError(f"a password has at least {MIN_PASSWORD} characters")
    return password


class UserStore:
    """The users and audit tables of the console database."""

    def __init__(self, db: Database) -> None:
        self._db = db.connection

    def add(self, name: str, role: str, password: str) -> None:
        """Create a user; raises UserError if the name is taken or a field is invalid."""
        check_name(name)
        check_role(role)
        digest = _hasher.hash(check_password(password))
        with self._db() as db:
            try:
                db.execute(
                    "INSERT INTO users (name, role, hash, created_ms) VALUES (?, ?, ?, ?)",
                    (name, role, digest, time.time_ns() // 1_000_000),
                )
            except sqlite3.IntegrityError:
                raise UserError(f"user {name} already exists") from None

    def set_password(self, name: str, password: str) -> None:
        """Change a password; every session of the user ends."""
        digest = _hasher.hash(check_password(password))
        self._update(name, "hash = ?, epoch = epoch + 1", (digest,))

    def set_role(self, name: str, role: str) -> None:
        """Change a role; every session of the user ends."""
        self._update(name, "role = ?, epoch = epoch + 1", (check_role(role),))

    def set_language(self, name: str, language: str) -> None:
        """Remember the language the user chose."""
        self._update(name, "language = ?", (language,))

    def _update(self, name: str, assignments: str, values: tuple[str, ...]) -> None:
        with self._db() as db:
            cur = db.execute(f"UPDATE users SET {assignments} WHERE name = ?", (*values, name))
            if cur.rowcount == 0:
                raise UserError(f"no user {name}")

    def remove(self, name: str) -> None:
        """Delete a user; raises UserError when there is none."""
        with self._db() as db:
            if db.execute("DELETE FROM users WHERE name = ?", (name,)).rowcount == 0:
                raise UserError(f"no user {name}")

    def get(self, name: str) -> User | None:
        """The user called `name`, or None."""
        with self._db() as db:
            row = db.execute(
                "SELECT name, role, language, epoch FROM users WHERE name = ?", (name,)
            ).fetchone()
        return User(row["name"], row["role"], row["language"], row["epoch"]) if row else None

    def all(self) -> list[User]:
        """Every user, by name."""
        with self._db() as db:
            rows = db.execute("SELECT name, role, language, epoch FROM users ORDER BY name")
            return [User(r["name"], r["role"], r["language"], r["epoch"]) for r in rows]

    def count_admins(self) -> int:
        """How many admins there are (the last one cannot be removed or demoted)."""
        with self._db() as db:
            return int(db.execute("SELECT count(*) FROM users WHERE role = 'admin'").fetchone()[0])

    def verify(self, name: str, password: str) -> User | None:
        """The user when `password` is theirs, else None (same cost for an unknown name)."""
        with self._db() as db:
            row = db.execute("SELECT hash FROM users WHERE name = ?", (name,)).fetchone()
        digest = row["hash"] if row else _DUMMY_HASH
        try:
            _hasher.verify(digest, password)
        except (VerificationError, InvalidHashError):
            return None
        if row is None:
            return None
        if _hasher.check_needs_rehash(digest):
            with self._db() as db:
                db.execute(
                    "UPDATE users SET hash = ? WHERE name = ?", (_hasher.hash(password), name)
                )
        return self.get(name)

    def audit(self, user: str, action: str, target: str, detail: str, ok: bool) -> None:
        """Record one action (or attempt) and its outcome."""
        with self._db() as db:
            db.execute(
                "INSERT INTO audit (t_ms, user, action, target, detail, ok) VALUES (?,?,?,?,?,?)",
                (time.time_ns() // 1_000_000, user, action, target, detail, int(ok)),
            )

    def audit_log(self, limit: int = 200) -> list[AuditEntry]:
        """The newest `limit` audit entries, newest first."""
        with self._db() as db:
            rows = db.execute(
                "SELECT t_ms, user, action, target, detail, ok FROM audit ORDER BY id DESC LIMIT ?",
                (limit,),
            ).fetchall()
        return [AuditEntry(r[0], r[1], r[2], r[3], r[4], bool(r[5])) for r in rows]
