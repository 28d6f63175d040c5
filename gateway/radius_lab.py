"""A real FreeRADIUS 3 (Debian's) on loopback, writing accounting into a real PostgreSQL.

`freeradius_server(pg)` writes a raddb of its own into a temp dir: a minimal
radiusd.conf, a clients.conf with one secret for 127.0.0.1, and the sql
module with the postgresql driver and the queries.conf Debian ships, so
`radacct` is filled exactly as on a daloRADIUS or PHPNuxBill server. The
database `radius` gets FreeRADIUS's shipped schema.sql. The server runs as a
subprocess on a free high UDP port; `stop()`/`start()` take it away and bring
it back (an outage), and it is always stopped on exit. The tests
(tests/radius_harness.py) and benchmarks/radius.py both start it from here.
"""

from __future__ import annotations

import contextlib
import shutil
import socket
import subprocess
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

from desanet.errors import DesanetError
from desanet.gateway import pg_lab
from desanet.gateway.pg_lab import PostgresCluster

FREERADIUS = shutil.which("freeradius") or "/usr/sbin/freeradius"
SHIPPED_SQL = Path("/etc/freeradius/3.0/mods-config/sql/main/postgresql")
SECRET = "desanet-test-secret"
READY = "Ready to process requests"


def free_udp_port() -> int:
    """A UDP port on loopback that nothing is bound to right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _radiusd_conf(raddb: Path, port: int, pg: PostgresCluster) -> str:
    # Only the accounting listener and the sql module: nothing of /etc/freeradius is
    # read except the shipped SQL queries (modconfdir) and the dictionaries.
    return f"""
prefix = /usr
exec_prefix = /usr
sysconfdir = /etc
localstatedir = /var
sbindir = /usr/sbin
logdir = {raddb}/log
raddbdir = {raddb}
radacctdir = {raddb}/radacct
name = freeradius
confdir = {raddb}
modconfdir = {SHIPPED_SQL.parents[2]}
run_dir = {raddb}/run
db_dir = {raddb}
libdir = /usr/lib/freeradius
pidfile = {raddb}/run/freeradius.pid
max_request_time = 30
cleanup_delay = 5
max_requests = 16384
hostname_lookups = no
log {{
    destination = stdout
    colourise = no
}}
security {{
    allow_core_dumps = no
    max_attributes = 200
    reject_delay = 0
    status_server = yes
}}
thread pool {{
    start_servers = 4
    max_servers = 8
    min_spare_servers = 2
    max_spare_servers = 4
    max_requests_per_server = 0
    auto_limit_acct = no
}}
$INCLUDE clients.conf
modules {{
    # tolower and md5, used by the shipped queries and the session key below.
    expr {{
    }}
    always ok {{
        rcode = ok
    }}
    sql {{
        dialect = "postgresql"
        driver = "rlm_sql_postgresql"
        postgresql {{
            send_application_name = yes
        }}
        server = "{pg.socket_dir}"
        port = {pg.port}
        login = "postgres"
        password = ""
        radius_db = "radius"
        acct_table1 = "radacct"
        acct_table2 = "radacct"
        postauth_table = "radpostauth"
        authcheck_table = "radcheck"
        groupcheck_table = "radgroupcheck"
        authreply_table = "radreply"
        groupreply_table = "radgroupreply"
        usergroup_table = "radusergroup"
        client_table = "nas"
        group_attribute = "SQL-Group"
        delete_stale_sessions = yes
        pool {{
            start = 1
            min = 1
            max = 8
            spare = 2
            uses = 0
            retry_delay = 1
            lifetime = 0
            idle_timeout = 60
        }}
        $INCLUDE ${{modconfdir}}/sql/main/${{dialect}}/queries.conf
    }}
}}
server default {{
    listen {{
        type = acct
        ipaddr = 127.0.0.1
        port = {port}
    }}
    preacct {{
        # As FreeRADIUS's default site's acct_unique policy does: the row key of radacct.
        update request {{
            &Acct-Unique-Session-Id := "%{{md5:%{{User-Name}},%{{Acct-Session-ID}},\
%{{%{{NAS-IPv6-Address}}:-%{{NAS-IP-Address}}}},%{{NAS-Identifier}},%{{NAS-Port-ID}},%{{NAS-Port}}}}"
        }}
    }}
    accounting {{
        sql
        # sql is noop when a query touched no row (Accounting-On with no open session), and
        # FreeRADIUS answers only ok/updated: the default site's later modules give that.
        ok
    }}
}}
"""


def _clients_conf(secret: str) -> str:
    return f"""
client localhost {{
    ipaddr = 127.0.0.1
    secret = {secret}
    require_message_authenticator = no
    nas_type = other
}}
"""


@dataclass
class FreeRadius:
    """One FreeRADIUS accounting server on 127.0.0.1:`port`, its raddb and its database."""

    raddb: Path
    port: int
    pg: PostgresCluster
    secret: str = SECRET
    debug: bool = True
    process: subprocess.Popen[bytes] | None = field(default=None, init=False)

    @property
    def dsn(self) -> str:
        """libpq DSN of the `radius` database FreeRADIUS writes."""
        return self.pg.dsn_for("postgres", "radius")

    @property
    def output(self) -> Path:
        """Where the server's (debug) output goes."""
        return self.raddb / "log" / "output.txt"

    def start(self, timeout_s: float = 20.0) -> None:
        """Start the server and wait until it processes requests."""
        if self.process is not None:
            raise DesanetError("FreeRADIUS is already running")
        offset = self.output.stat().st_size if self.output.exists() else 0
        # -X: debug output, one process (every request logged); -f: foreground, threaded.
        mode = "-X" if self.debug else "-f"
        with open(self.output, "ab") as out:
            self.process = subprocess.Popen(
                [FREERADIUS, mode, "-d", str(self.raddb), "-l", "stdout"],
                stdout=out,
                stderr=subprocess.STDOUT,
            )
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            text = self.output.read_bytes()[offset:].decode(errors="replace")
            if READY in text:
                return
            if self.process.poll() is not None:
                break
            time.sleep(0.05)
        tail = self.output.read_bytes()[offset:].decode(errors="replace")[-3000:]
        self.stop()
        raise DesanetError(f"FreeRADIUS did not become ready:\n{tail}")

    def stop(self) -> None:
        """Stop the server (it answers nothing afterwards) and wait for it to exit."""
        if self.process is None:
            return
        self.process.terminate()
        try:
            self.process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()
        self.process = None


def create_radius_database(pg: PostgresCluster) -> None:
    """Create the `radius` database with FreeRADIUS's shipped PostgreSQL schema."""
    pg.psql("postgres", "-c", "DROP DATABASE IF EXISTS radius", "-c", "CREATE DATABASE radius")
    pg.psql("radius", "-f", str(SHIPPED_SQL / "schema.sql"))


def missing() -> str | None:
    """Why FreeRADIUS with SQL accounting cannot run here, or None when it can."""
    if not Path(FREERADIUS).exists() or not SHIPPED_SQL.is_dir():
        return (
            "FreeRADIUS is not installed: run `make setup` "
            "(Debian packages freeradius, freeradius-postgresql, freeradius-utils)"
        )
    return pg_lab.MISSING if not pg_lab.PG_BIN else None


@contextlib.contextmanager
def freeradius_server(
    pg: PostgresCluster, debug: bool = True, kind: type[FreeRadius] = FreeRadius
) -> Iterator[FreeRadius]:
    """A started FreeRADIUS (of class `kind`) with a fresh `radius` database; stopped on exit."""
    reason = missing()
    if reason is not None:
        raise DesanetError(reason)
    create_radius_database(pg)
    raddb = Path(tempfile.mkdtemp(prefix="desanet-raddb-"))
    server = kind(raddb, free_udp_port(), pg, debug=debug)
    try:
        for sub in ("log", "run", "radacct"):
            (raddb / sub).mkdir()
        (raddb / "radiusd.conf").write_text(_radiusd_conf(raddb, server.port, pg))
        (raddb / "clients.conf").write_text(_clients_conf(server.secret))
        server.start()
        yield server
    finally:
        server.stop()
        shutil.rmtree(raddb, ignore_errors=True)
