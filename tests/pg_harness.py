"""The throwaway PostgreSQL cluster of the tests: gateway/pg_lab.py's, failing a test clearly.

Tests that need a real PostgreSQL (the reference collector, the fleet's hub
collector, FreeRADIUS's radacct) start one with `postgres_cluster()`; the
starter lives in desanet.gateway.pg_lab, where benchmarks use it too.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence

import pytest

from desanet.gateway import pg_lab
from desanet.gateway.pg_lab import PG_BIN, PostgresCluster, free_port

__all__ = ["PG_BIN", "PostgresCluster", "free_port", "postgres_cluster"]


@contextlib.contextmanager
def postgres_cluster(hba: Sequence[str] = ()) -> Iterator[PostgresCluster]:
    """Start a cluster (see pg_lab.postgres_cluster); a test fails at once without PostgreSQL."""
    if not PG_BIN:
        pytest.fail(pg_lab.MISSING)
    with pg_lab.postgres_cluster(hba) as cluster:
        yield cluster
