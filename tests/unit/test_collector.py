"""The reference collector: idempotent upserts, billing-period report, catching up after downtime.

Every store test runs against SQLite and against a real PostgreSQL server,
a throwaway cluster started from Debian's postgresql package for this module.
"""

from __future__ import annotations

import json
import sqlite3
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from desanet.errors import ConfigError, StreamError
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
        for table in ("usage", "totals", "progress", "epochs"):
            st._conn.execute(f"DELETE FROM {table}")
    try:
        yield st
    finally:
        st.close()


def message(
    seq: int, t1: int, subs: list[str], up: list[int], totals: list[int], epoch: str = "e1"
) -> UsageMessage:
    return UsageMessage(
        gw="gw1",
        epoch=epoch,
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


def snapshot_message(seq: int, subs: list[str], totals: list[int], epoch: str) -> UsageMessage:
    zeros = [0] * len(subs)
    return UsageMessage(
        gw="gw1",
        epoch=epoch,
        seq=seq,
        t0=9000,
        t1=9000,
        sub=subs,
        up=zeros,
        down=zeros,
        up_pkts=zeros,
        down_pkts=zeros,
        up_total=totals,
        down_total=[2 * x for x in totals],
        snapshot=True,
    )


def test_a_new_epoch_bills_only_what_its_totals_add(store: UsageStore) -> None:
    def billed() -> dict[str, int]:
        return {r.sub: r.up for r in store.report(0, 10**6)}

    store.store(message(1, 1000, ["a"], [10], [10], "E1"))
    store.store(message(2, 2000, ["a", "b"], [5, 20], [15, 20], "E1"))
    # E2 restarted from the state after seq 1 (seq 2 was lost): its first row of "a" covers
    # 10 -> 17 again, of which 10 -> 15 was billed in E1. "c" is new.
    store.store(message(1, 3000, ["a", "c"], [7, 3], [17, 3], "E2"))
    assert billed() == {"a": 17, "b": 20, "c": 3}
    store.store(message(2, 4000, ["a"], [4], [21], "E2"))
    assert billed()["a"] == 21
    assert store.position("gw1") == ("E2", 2)
    # E3 lost all state: its totals restart below what was billed; nothing negative, nothing
    # billed twice; from its second row on, "a" is billed as usual.
    store.store(message(1, 5000, ["a"], [5], [5], "E3"))
    store.store(message(2, 6000, ["a"], [30], [35], "E3"))
    assert billed()["a"] == 21 + 0 + 30
    # A snapshot of a new epoch does not settle the overlap; the first interval row does.
    store.store(snapshot_message(1, ["a"], [10], "E4"))
    assert store.totals("gw1")["a"] == (35, 70)
    store.store(message(2, 7000, ["a"], [12], [43], "E4"))
    assert billed()["a"] == 51 + 8
    assert store.totals("gw1")["a"] == (43, 86)
    assert store.epochs("gw1") == ["E1", "E2", "E3", "E4"]
    # Late messages of an epoch left behind: a stored one changes nothing, a new one is refused.
    store.store(message(1, 3000, ["a", "c"], [7, 3], [17, 3], "E2"))
    with pytest.raises(StreamError, match=r"epoch E2 \(seq 3\) arrived after a newer epoch"):
        store.store(message(3, 4500, ["a"], [1], [22], "E2"))
    assert billed()["a"] == 59 and store.position("gw1") == ("E4", 2)


_V1_TABLES = (
    """CREATE TABLE usage (gw TEXT NOT NULL, seq BIGINT NOT NULL, sub TEXT NOT NULL,
        t0 BIGINT NOT NULL, t1 BIGINT NOT NULL, up BIGINT NOT NULL, down BIGINT NOT NULL,
        up_pkts BIGINT NOT NULL, down_pkts BIGINT NOT NULL, up_total BIGINT NOT NULL,
        down_total BIGINT NOT NULL, PRIMARY KEY (gw, seq, sub))""",
    """CREATE TABLE totals (gw TEXT NOT NULL, sub TEXT NOT NULL, seq BIGINT NOT NULL,
        up_total BIGINT NOT NULL, down_total BIGINT NOT NULL, PRIMARY KEY (gw, sub))""",
    "CREATE TABLE progress (gw TEXT PRIMARY KEY, seq BIGINT NOT NULL)",
    "INSERT INTO usage VALUES ('gw1', 1, 'a', 0, 1000, 10, 20, 1, 1, 10, 20)",
    "INSERT INTO usage VALUES ('gw1', 2, 'a', 1000, 2000, 5, 10, 1, 1, 15, 30)",
    "INSERT INTO totals VALUES ('gw1', 'a', 2, 15, 30)",
    "INSERT INTO progress VALUES ('gw1', 2)",
)


@pytest.mark.parametrize("db", ["sqlite", "postgres"])
def test_a_collector_database_from_before_epochs_is_carried_over(
    db: str, tmp_path: Path, request: pytest.FixtureRequest
) -> None:
    if db == "sqlite":
        conn = sqlite3.connect(tmp_path / "old.sqlite")
        for statement in _V1_TABLES:
            conn.execute(statement)
        conn.commit()
        conn.close()
        st = UsageStore.sqlite(tmp_path / "old.sqlite")
    else:
        import psycopg

        dsn = request.getfixturevalue("postgres_dsn")
        with psycopg.connect(dsn, autocommit=True) as conn:
            for table in ("usage", "totals", "progress", "epochs"):
                conn.execute(f"DROP TABLE IF EXISTS {table}")
            for statement in _V1_TABLES:
                conn.execute(statement)
        st = UsageStore.postgres(dsn)
    try:
        assert st.position("gw1") == ("", 2)
        assert st.totals("gw1") == {"a": (15, 30)}
        (row,) = st.report(0, 10**6)
        assert (row.up, row.down) == (15, 30)
        # The upgraded gateway starts an epoch from the state it had: nothing billed twice.
        st.store(message(1, 3000, ["a"], [9], [18], "E1"))
        (row,) = st.report(0, 10**6)
        assert (row.up, row.up_total) == (18, 18)
        assert st.epochs("gw1") == ["", "E1"]
    finally:
        st.close()


def test_collectors_started_together_on_one_database_store_everything_once(
    tmp_path: Path, postgres_dsn: str
) -> None:
    import psycopg
    from psycopg import conninfo

    with psycopg.connect(postgres_dsn, autocommit=True) as admin:
        admin.execute("CREATE DATABASE together")
    dsn = conninfo.make_conninfo(postgres_dsn, dbname="together")
    svc = loopback_service(tmp_path / "state", snapshot_every=1000)
    expected = {"s1": 0, "s2": 0}
    for _ in range(40):
        expected["s1"] += 3
        expected["s2"] += 5
        svc.publish(
            interval(svc.last_seq * 1000 + 1000, [1, 2], [3, 5], list(expected.values())), {}
        )
    start = threading.Barrier(4)
    failures: list[BaseException] = []

    def collector() -> None:
        try:
            start.wait()
            store = UsageStore.postgres(dsn)  # all four create the tables at once
            try:
                with UsageClient(svc.usage_endpoint, svc.replay_endpoint, gateway_id="gw1") as c:
                    collect(c, store, idle_timeout_ms=500)
            finally:
                store.close()
        except BaseException as err:
            failures.append(err)

    threads = [threading.Thread(target=collector) for _ in range(4)]
    try:
        for t in threads:
            t.start()
        for t in threads:
            t.join(60)
    finally:
        svc.close()
    assert failures == []
    check = UsageStore.postgres(dsn)
    try:
        assert check.last_seq("gw1") == 40
        assert check.totals("gw1") == {k: (v, 2 * v) for k, v in expected.items()}
        (s1,) = [r for r in check.report(0, 10**12) if r.sub == "s1"]
        assert s1.up == expected["s1"]  # every interval once, whichever collector stored it
    finally:
        check.close()


def test_a_password_never_goes_on_the_command_line_nor_into_an_error(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from desanet.gateway.cli import main

    assert main(["collect", "--dsn", "host=/nowhere password=hunter2", "--report", "2026-11"]) == 2
    err = capsys.readouterr().err
    assert "PGPASSFILE" in err and "hunter2" not in err
    dsn_file = tmp_path / "dsn"
    dsn_file.write_text("host=/nowhere port=1 dbname=x user=billing password=hunter2\n")
    assert main(["collect", "--dsn-file", str(dsn_file), "--report", "2026-11"]) == 2
    err = capsys.readouterr().err
    assert "cannot connect to PostgreSQL" in err and "hunter2" not in err
