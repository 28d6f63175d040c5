"""The reference collector: idempotent upserts, billing-period report, catching up after downtime.

Every store test runs against SQLite and against a real PostgreSQL server,
a throwaway cluster started from Debian's postgresql package for this module.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import pytest

from desanet.errors import ConfigError
from desanet.meter.client import UsageClient
from desanet.meter.collector import UsageStore, collect, month_bounds_ms
from desanet.meter.journal import Retention
from desanet.meter.wire import UsageMessage
from tests.pg_harness import postgres_cluster
from tests.unit.test_stream import interval, loopback_service

pytestmark = pytest.mark.unit


@pytest.fixture(scope="module")
def postgres_dsn() -> Iterator[str]:
    """A throwaway PostgreSQL cluster for this module (tests/pg_harness.py)."""
    with postgres_cluster() as pg:
        yield pg.dsn


@pytest.fixture(params=["sqlite", "postgres"])
def store(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[UsageStore]:
    if request.param == "sqlite":
        st = UsageStore.sqlite(tmp_path / "usage.sqlite")
    else:
        dsn = request.getfixturevalue("postgres_dsn")
        st = UsageStore.postgres(dsn)
        for table in ("usage", "totals", "progress"):
            st._conn.execute(f"DELETE FROM {table}")
    try:
        yield st
    finally:
        st.close()


def message(seq: int, t1: int, subs: list[str], up: list[int], totals: list[int]) -> UsageMessage:
    return UsageMessage(
        gw="gw1",
        seq=seq,
        t0=t1 - 1000,
        t1=t1,
        sub=subs,
        up=up,
        down=[2 * x for x in up],
        up_pkts=[1] * len(subs),
        down_pkts=[1] * len(subs),
        up_total=totals,
        down_total=[2 * x for x in totals],
    )


def test_upserts_are_idempotent(store: UsageStore) -> None:
    m1 = message(1, 1000, ["a", "b"], [10, 20], [10, 20])
    m2 = message(2, 2000, ["a"], [5], [15])
    for msg in (m1, m2, m1, m2, m1):
        store.store(msg)
    assert store.last_seq("gw1") == 2
    assert store.totals("gw1") == {"a": (15, 30), "b": (20, 40)}
    start, end = 0, 10_000
    rows = {r.sub: r for r in store.report(start, end)}
    assert (rows["a"].up, rows["a"].down) == (15, 30)
    assert (rows["b"].up, rows["b"].up_total) == (20, 20)


def test_report_is_per_billing_month(store: UsageStore) -> None:
    nov_start, nov_end = month_bounds_ms("2026-11")
    store.store(message(1, nov_start, ["a"], [1], [1]))  # ends at midnight: still October
    store.store(message(2, nov_start + 1000, ["a"], [10], [11]))
    store.store(message(3, nov_end, ["a"], [100], [111]))  # ends at the last instant of November
    store.store(message(4, nov_end + 1000, ["a"], [1000], [1111]))
    (row,) = store.report(nov_start, nov_end)
    assert (row.sub, row.up, row.down, row.up_total) == ("a", 110, 220, 1111)


def test_month_bounds() -> None:
    assert month_bounds_ms("2026-12") == (1_796_083_200_000, 1_798_761_600_000)
    with pytest.raises(ConfigError, match="YYYY-MM"):
        month_bounds_ms("2026-13")


def test_collector_catches_up_after_being_offline(tmp_path: Path, store: UsageStore) -> None:
    svc = loopback_service(tmp_path / "state", snapshot_every=7)
    expected = {"s1": 0, "s2": 0}

    def publish(n: int) -> None:
        for _ in range(n):
            expected["s1"] += 3
            expected["s2"] += 5
            svc.publish(
                interval(svc.last_seq * 1000 + 1000, [1, 2], [3, 5], list(expected.values())), {}
            )

    def run_collector() -> int:
        with UsageClient(svc.usage_endpoint, svc.replay_endpoint, gateway_id="gw1") as client:
            return collect(client, store, idle_timeout_ms=500)

    try:
        publish(10)
        run_collector()
        first = store.last_seq("gw1")
        assert first == svc.last_seq
        publish(25)  # the collector is offline
        assert run_collector() == svc.last_seq - first
        assert store.totals("gw1") == {k: (v, 2 * v) for k, v in expected.items()}
        (s1,) = [r for r in store.report(0, 10**12) if r.sub == "s1"]
        assert s1.up == expected["s1"]
    finally:
        svc.close()


def test_collector_resyncs_from_a_snapshot_when_history_is_gone(
    tmp_path: Path, store: UsageStore
) -> None:
    svc = loopback_service(
        tmp_path / "state",
        retention=Retention(max_bytes=2000, segment_bytes=500),
        checkpoint_every=5,
        snapshot_every=10**9,
    )
    try:
        for t in range(1, 60):
            svc.publish(interval(t * 1000, [1], [1], [t]), {})
        assert svc.journal.first_seq > 1
        with UsageClient(svc.usage_endpoint, svc.replay_endpoint) as client:
            collect(client, store, "gw1", idle_timeout_ms=300)
        assert store.totals("gw1") == {"s1": (59, 118)}
        assert store.last_seq("gw1") == svc.last_seq
    finally:
        svc.close()


def test_cli_usage_collect_report_and_keygen(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from desanet.gateway.cli import main

    assert main(["keygen", "billing", "--dir", str(tmp_path / "keys")]) == 0
    assert (tmp_path / "keys" / "billing.key").exists()
    assert (tmp_path / "keys" / "billing.key_secret").stat().st_mode & 0o077 == 0
    svc = loopback_service(tmp_path / "state")
    try:
        t1 = month_bounds_ms("2026-11")[0] + 5000
        for n in range(3):
            svc.publish(interval(t1 + n * 1000, [1], [10], [10 * (n + 1)]), {})
        connect = ["--connect", svc.usage_endpoint, "--replay", svc.replay_endpoint]
        capsys.readouterr()
        assert main(["usage", *connect, "--from-seq", "2", "--json"]) == 0
        lines = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
        assert [(d["seq"], d["sub"], d["up_total"]) for d in lines] == [
            (2, ["s1"], [20]),
            (3, ["s1"], [30]),
        ]
        assert main(["usage", *connect]) == 0
        assert "s1: up 30 B, down 60 B" in capsys.readouterr().out
        db = ["--db", str(tmp_path / "c.sqlite")]
        assert main(["collect", *connect, *db, "--idle-exit", "0.5"]) == 0
        assert main(["collect", *db, "--report", "2026-11"]) == 0
        assert "gw1 s1: up 30 B" in capsys.readouterr().out
    finally:
        svc.close()
