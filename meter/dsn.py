"""PostgreSQL DSNs as collectors take them: never a password on the command line or in a message.

A DSN given with `--dsn` is in the process list, readable by every local user,
so it may not hold a password (PostgreSQL reads one from PGPASSFILE); a DSN
with a password comes from a file (`--dsn-file`, mode 0600). Errors and logs
show DSNs without their password, and scrub it from the driver's own messages.
"""

from __future__ import annotations

from pathlib import Path

from desanet.errors import ConfigError


def params(dsn: str) -> dict[str, str]:
    """The DSN's key/value pairs (key=value form or a URI); ConfigError if malformed."""
    import psycopg  # only collectors given a DSN need the PostgreSQL driver
    from psycopg import conninfo

    try:
        parsed = conninfo.conninfo_to_dict(dsn)
    except psycopg.ProgrammingError:
        # psycopg's message quotes the DSN, which may hold a password: say less.
        raise ConfigError("the PostgreSQL DSN is malformed (key=value pairs or a URI)") from None
    return {k: str(v) for k, v in parsed.items() if v is not None}


def check_no_password(dsn: str) -> str:
    """`dsn` if it holds no password: one on the command line is readable by every local user."""
    if params(dsn).get("password"):
        raise ConfigError(
            "the PostgreSQL DSN holds a password: put it in PGPASSFILE (~/.pgpass) or in a "
            "file given with --dsn-file (mode 0600), not on the command line"
        )
    return dsn


def read_dsn(dsn: str | None, dsn_file: Path | None) -> str:
    """The DSN of `--dsn` (no password) or `--dsn-file`, exactly one of them."""
    if dsn is not None and dsn_file is None:
        return check_no_password(dsn)
    if dsn_file is not None and dsn is None:
        try:
            return dsn_file.read_text().strip()
        except OSError as err:
            raise ConfigError(f"--dsn-file {dsn_file}: {err.strerror}") from None
    raise ConfigError("give --dsn (password in PGPASSFILE) or --dsn-file, one of them")


def redacted(dsn: str) -> str:
    """`dsn` without its password, fit for logs and error messages."""
    from psycopg import conninfo

    shown = params(dsn)
    shown.pop("password", None)
    return conninfo.make_conninfo("", **shown)


def scrub(text: str, dsn: str) -> str:
    """`text` (a driver's error message) with the DSN's password replaced by ***."""
    password = params(dsn).get("password")
    return text.replace(password, "***") if password else text
