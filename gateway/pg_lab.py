"""A throwaway PostgreSQL cluster in a temp dir, from Debian's postgresql binaries.

What the tests and benchmarks that need a real PostgreSQL start (the
collectors' stores, FreeRADIUS's radacct): `postgres_cluster()` listens only
on a Unix socket in its temp dir and is stopped and removed on exit, whatever
happened. As root the server runs as the `postgres` user, since PostgreSQL
refuses root. It lives beside the network lab (gateway/lab.py) so benchmarks,
which never import tests/, can start one too.
"""

from __future__ import annotations

import contextlib
import os
import pwd
import shutil
import socket
import subprocess
import tempfile
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

from desanet.errors import DesanetError

PG_BIN = sorted(Path("/usr/lib/postgresql").glob("*/bin"))
MISSING = "PostgreSQL is not installed: run `make setup` (Debian package postgresql)"


_HANDED_OUT: set[int] = set()


def free_port() -> int:
    """A TCP port on loopback that nothing listens on right now, and not one this process
    was given before: the kernel often hands a just-released port out again, and a server
    given the same port for two of its listeners fails to start."""
    for _ in range(1000):
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = int(s.getsockname()[1])
        if port not in _HANDED_OUT:
            _HANDED_OUT.add(port)
            return port
    raise OSError("no loopback port left that this process has not used already")


@dataclass(frozen=True)
class PostgresCluster:
    """A running throwaway cluster: its socket directory, port and superuser DSN."""

    socket_dir: Path
    port: int

    @property
    def dsn(self) -> str:
        """libpq DSN of the `postgres` superuser (trusted on the socket)."""
        return self.dsn_for("postgres")

    def dsn_for(self, user: str, dbname: str = "postgres") -> str:
        """libpq DSN of `user`, without a password."""
        return f"host={self.socket_dir} port={self.port} dbname={dbname} user={user}"

    def psql(self, dbname: str, *args: str) -> str:
        """psql's unaligned, tuples-only output of `args` (-c SQL, -f FILE) on `dbname`."""
        psql = PG_BIN[-1] / "psql"
        dsn = self.dsn_for("postgres", dbname)
        done = subprocess.run(
            [str(psql), "-X", "-q", "-A", "-t", "-v", "ON_ERROR_STOP=1", "-d", dsn, *args],
            capture_output=True,
            text=True,
        )
        if done.returncode != 0:
            raise DesanetError(f"psql {' '.join(args)}: {done.stderr.strip()}")
        return done.stdout


@contextlib.contextmanager
def postgres_cluster(hba: Sequence[str] = ()) -> Iterator[PostgresCluster]:
    """Start a cluster; `hba` lines go first in pg_hba.conf (the rest trusts every local user).

    For example `["local all app scram-sha-256"]` makes role `app` need its password.
    """
    if not PG_BIN:
        raise DesanetError(MISSING)
    bindir = PG_BIN[-1]
    as_user: list[str] = []
    tmp = Path(tempfile.mkdtemp(prefix="desanet-pg-"))
    if os.geteuid() == 0:
        as_user = ["runuser", "-u", "postgres", "--"]
        pw = pwd.getpwnam("postgres")
        os.chown(tmp, pw.pw_uid, pw.pw_gid)
    data, port = tmp / "data", free_port()
    try:
        subprocess.run(
            [*as_user, str(bindir / "initdb"), "-D", str(data), "-U", "postgres", "-A", "trust"],
            check=True,
            capture_output=True,
        )
        if hba:
            conf = data / "pg_hba.conf"
            conf.write_text("".join(f"{line}\n" for line in hba) + conf.read_text())
        subprocess.run(
            [
                *as_user,
                str(bindir / "pg_ctl"),
                "-D",
                str(data),
                "-l",
                str(tmp / "log"),
                "-w",
                "-o",
                f"-k {tmp} -p {port} -c listen_addresses=''",
                "start",
            ],
            check=True,
            capture_output=True,
        )
        yield PostgresCluster(tmp, port)
    finally:
        subprocess.run(
            [*as_user, str(bindir / "pg_ctl"), "-D", str(data), "-m", "immediate", "stop"],
            capture_output=True,
        )
        shutil.rmtree(tmp, ignore_errors=True)
