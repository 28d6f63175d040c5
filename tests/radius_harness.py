"""FreeRADIUS with SQL accounting for the tests: desanet.gateway.radius_lab's, plus queries.

The server, its raddb and its `radius` database come from
desanet.gateway.radius_lab (benchmarks start the same one); here it gains
typed queries of radacct through psycopg, and a missing FreeRADIUS fails the
test at once, naming the Debian packages.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

import psycopg
import pytest

from desanet.gateway import radius_lab
from desanet.gateway.pg_lab import PostgresCluster
from desanet.gateway.radius_lab import SECRET, free_udp_port

__all__ = ["SECRET", "FreeRadius", "free_udp_port", "freeradius_server"]


class FreeRadius(radius_lab.FreeRadius):
    """The lab's FreeRADIUS, with radacct read back as Python values."""

    def query(self, sql: str, *params: Any) -> list[tuple[Any, ...]]:
        """Rows of one query on the `radius` database."""
        with psycopg.connect(self.dsn, autocommit=True) as conn:
            cur = conn.execute(sql, params)
            return list(cur.fetchall()) if cur.description else []

    def octets_by_user(self) -> dict[str, tuple[int, int]]:
        """Sum of (AcctInputOctets, AcctOutputOctets) of every radacct row, per UserName."""
        rows = self.query(
            "SELECT username, SUM(acctinputoctets), SUM(acctoutputoctets) "
            "FROM radacct GROUP BY username"
        )
        return {str(r[0]): (int(r[1]), int(r[2])) for r in rows}


@contextlib.contextmanager
def freeradius_server(pg: PostgresCluster, debug: bool = True) -> Iterator[FreeRadius]:
    """A started FreeRADIUS with a fresh `radius` database; stopped and removed on exit."""
    reason = radius_lab.missing()
    if reason is not None:
        pytest.fail(reason)
    with radius_lab.freeradius_server(pg, debug, FreeRadius) as server:
        assert isinstance(server, FreeRadius)  # built as `kind`
        yield server
