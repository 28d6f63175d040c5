"""The hub collector on a real nats-server and a real PostgreSQL: exact, idempotent, shared.

PostgreSQL is a throwaway cluster (tests/pg_harness.py); role `hubapp` needs
its password, so the tests can show it never travels in argv or errors.
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import signal
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import nats
import psycopg
import pytest

from desanet.errors import ConfigError, StreamError
from desanet.gateway.cli import main
from desanet.meter import fleet
from desanet.meter.collector import month_bounds_ms
from desanet.meter.dsn import check_no_password
from desanet.meter.fleet_collect import decode_stored
from desanet.meter.fleet_store import (
    REPORT_SQL,
    HubStore,
    StoredUsage,
    partition_bounds,
)
from desanet.meter.wire import decode_usage, encode_usage
from tests.fleet_harness import FleetHub, fleet_hub, start_collector
from tests.pg_harness import PostgresCluster, postgres_cluster

pytestmark = pytest.mark.unit

PASSWORD = "s3cret-Hub-pw"
NOV = month_bounds_ms("2026-11")


@pytest.fixture(scope="module")
def pg() -> Iterator[PostgresCluster]:
    with postgres_cluster(["local all hubapp scram-sha-256"]) as cluster:
        with psycopg.connect(cluster.dsn, autocommit=True) as conn:
            conn.execute(f"CREATE ROLE hubapp LOGIN PASSWORD '{PASSWORD}'")
            conn.execute("CREATE DATABASE hub OWNER hubapp")
        yield cluster


@pytest.fixture
def dsn(pg: PostgresCluster) -> Iterator[str]:
    """A fresh database for each test, owned by the superuser (trusted on the socket)."""
    name = f"t{time.monotonic_ns()}"
    with psycopg.connect(pg.dsn, autocommit=True) as conn:
        conn.execute(f"CREATE DATABASE {name}")
    yield pg.dsn_for("postgres", name)


def usage(gw: str, seq: int, t1: int, subs: list[str], up: list[int], epoch: str = "e1") -> bytes:
    """A usage message: down = 2 * up, totals = up * seq (enough to tell them apart)."""
    columns = {
        "up": up,
        "down": [2 * u for u in up],
        "up_pkts": [1] * len(up),
        "down_pkts": [1] * len(up),
        "up_total": [u * seq for u in up],
        "down_total": [2 * u * seq for u in up],
    }
    return encode_usage(gw, seq, t1 - 1000, t1, subs, columns, epoch=epoch)


def stored(gw: str, seq: int, t1: int, subs: list[str], up: list[int]) -> StoredUsage:
    return StoredUsage("e1", decode_usage(usage(gw, seq, t1, subs, up)))


def query(dsn: str, sql: str, params: Any = None) -> list[tuple[Any, ...]]:
    with psycopg.connect(dsn) as conn:
        return list(conn.execute(sql, params).fetchall())


def snapshot(gw: str, seq: int, t1: int, subs: list[str], totals: list[int]) -> StoredUsage:
    """A totals snapshot: no deltas, up_total = totals, down_total = 2 * totals."""
    zeros = [0] * len(subs)
    columns = {
        "up": zeros,
        "down": zeros,
        "up_pkts": zeros,
        "down_pkts": zeros,
        "up_total": totals,
        "down_total": [2 * t for t in totals],
    }
    data = encode_usage(gw, seq, t1, t1, subs, columns, epoch="e1", snapshot=True)
    return StoredUsage("e1", decode_usage(data))


def test_store_is_idempotent_and_the_monthly_report_reads_one_partition(dsn: str) -> None:
    start, end = NOV
    batch = [
        stored("gw1", 1, start, ["a", "b"], [1, 2]),  # ends at midnight: October's
        stored("gw1", 2, start + 1000, ["a", "b"], [10, 20]),
        snapshot("gw1", 3, start + 1000, ["a", "b", "c"], [20, 40, 7]),  # c never moved
        stored("gw2", 1, end, ["a"], [100]),  # the last instant of November
        stored("gw1", 4, end + 1000, ["a"], [1000]),  # December
    ]

    async def run() -> list[Any]:
        store = await HubStore.connect(dsn)
        try:
            assert await store.store(batch) == 6
            assert await store.store(batch[1:4]) == 0  # redelivered: nothing new
            assert await store.store([batch[1], batch[1]]) == 0  # twice in one batch, too
            assert await store.progress() == {("gw1", "e1"): 4, ("gw2", "e1"): 1}
            return await store.report("2026-11")
        finally:
            await store.close()

    report = {(r.gw, r.sub): (r.up, r.down, r.up_total, r.down_total) for r in asyncio.run(run())}
    # Totals as November ended for them: seq 2 and the snapshot after it; December's
    # seq 4 (a's total 4,000) is not November's.
    assert report == {
        ("gw1", "a"): (10, 20, 20, 40),
        ("gw1", "b"): (20, 40, 40, 80),
        ("gw1", "c"): (0, 0, 7, 14),
        ("gw2", "a"): (100, 200, 100, 200),
    }
    assert query(dsn, "SELECT count(*) FROM hub.usage") == [(6,)]
    assert query(dsn, "SELECT count(*) FROM hub.snapshots") == [(3,)]
    assert query(dsn, "SELECT count(*), SUM(rows) FROM hub.stored") == [(5, 9)]
    for table in ("usage", "snapshots", "stored"):
        partitions = query(
            dsn,
            "SELECT inhrelid::regclass::text FROM pg_inherits "
            f"WHERE inhparent = 'hub.{table}'::regclass ORDER BY 1",
        )
        assert partitions == [(f"hub.{table}_{m}",) for m in ("202610", "202611", "202612")]
    low, high = partition_bounds("2026-11")
    (plan,) = query(
        dsn, f"EXPLAIN (FORMAT JSON, VERBOSE) {REPORT_SQL}", {"low": low, "high": high}
    )[0]
    scanned = set()

    def walk(node: dict[str, Any]) -> None:
        if node.get("Schema") == "hub" and "Relation Name" in node:
            scanned.add(node["Relation Name"])
        for child in node.get("Plans", []):
            walk(child)

    walk(plan[0]["Plan"])
    assert scanned == {"usage_202611", "snapshots_202611"}, json.dumps(plan, indent=1)


def test_a_schema_of_the_earlier_layout_is_refused_untouched(dsn: str) -> None:
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute("CREATE SCHEMA hub")
        conn.execute("CREATE TABLE hub.usage (gw text, sub text, up bigint)")
        conn.execute("INSERT INTO hub.usage VALUES ('gw1', 'a', 5)")
    with pytest.raises(ConfigError, match=r"earlier layout.*RENAME TO hub_old"):
        asyncio.run(HubStore.connect(dsn))
    assert query(dsn, "SELECT * FROM hub.usage") == [("gw1", "a", 5)]
    assert query(dsn, "SELECT to_regclass('hub.stored')") == [(None,)]


def test_a_message_must_come_from_the_gateway_it_names() -> None:
    data = usage("gw2", 7, NOV[0] + 1000, ["a"], [1], epoch="e9")
    ok = decode_stored("desanet.usage.gw2", {fleet.MSG_ID_HEADER: "gw2:e9:7"}, data)
    assert (ok.epoch, ok.msg.gw, ok.msg.seq) == ("e9", "gw2", 7)
    with pytest.raises(StreamError, match="may speak only for itself"):
        decode_stored("desanet.usage.gw1", {fleet.MSG_ID_HEADER: "gw1:e9:7"}, data)
    with pytest.raises(StreamError, match="holds seq 7"):
        decode_stored("desanet.usage.gw2", {fleet.MSG_ID_HEADER: "gw2:e9:8"}, data)
    with pytest.raises(StreamError, match="holds epoch 'e9'"):
        decode_stored("desanet.usage.gw2", {fleet.MSG_ID_HEADER: "gw2:e8:7"}, data)
    with pytest.raises(StreamError, match="no Nats-Msg-Id"):
        decode_stored("desanet.usage.gw2", None, data)
    twice = usage("gw2", 7, NOV[0] + 1000, ["a", "b", "a"], [1, 2, 3], epoch="e9")
    with pytest.raises(StreamError, match="names a subscriber twice"):
        decode_stored("desanet.usage.gw2", {fleet.MSG_ID_HEADER: "gw2:e9:7"}, twice)


def test_the_dsn_password_is_never_in_argv_or_errors(
    pg: PostgresCluster, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    app = pg.dsn_for("hubapp", "hub")
    with pytest.raises(ConfigError, match="PGPASSFILE") as refused:
        check_no_password(f"{app} password={PASSWORD}")
    assert PASSWORD not in str(refused.value)
    argv = ["hub", "collect", "--dsn", f"{app} password={PASSWORD}", "--report", "2026-11"]
    assert main(argv) == 2
    wrong = tmp_path / "wrong.dsn"
    wrong.write_text(f"{app} password=wr0ng-{PASSWORD}\n")
    assert main(["hub", "collect", "--dsn-file", str(wrong), "--report", "2026-11"]) == 2
    right = tmp_path / "right.dsn"
    right.write_text(f"{app} password={PASSWORD}\n")
    assert main(["hub", "collect", "--dsn-file", str(right), "--report", "2026-11"]) == 0
    pgpass = tmp_path / "pgpass"
    pgpass.write_text(f"*:*:*:hubapp:{PASSWORD}\n")
    pgpass.chmod(0o600)
    os.environ["PGPASSFILE"] = str(pgpass)
    try:
        assert main(["hub", "collect", "--dsn", app, "--report", "2026-11"]) == 0
    finally:
        del os.environ["PGPASSFILE"]
    out = capsys.readouterr()
    assert "password authentication failed" in out.err
    assert PASSWORD not in out.out + out.err


async def _publish(hub: FleetHub, gateways: list[str], messages: int, subs: int) -> None:
    """Each gateway publishes `messages` usage messages with its own key, as its forwarder would."""
    for gw in gateways:
        nc = await nats.connect(**hub.gateway(gw).connect_options())
        js = nc.jetstream()
        futures = []
        for seq in range(1, messages + 1):
            body = usage(gw, seq, NOV[0] + seq * 1000, [f"s{i}" for i in range(subs)], [seq] * subs)
            headers = {fleet.MSG_ID_HEADER: fleet.message_id(gw, "e1", seq)}
            futures.append(await js.publish_async(fleet.usage_subject(gw), body, headers=headers))
        await asyncio.gather(*futures)
        await nc.close()


async def _ack_pending(hub: FleetHub) -> int:
    nc = await nats.connect(**hub.collector().connect_options())
    try:
        info = await nc.jetstream().consumer_info(fleet.STREAM, fleet.CONSUMER)
        return int(info.num_ack_pending or 0)
    finally:
        await nc.close()


def test_collectors_share_the_stream_and_a_sigkill_mid_batch_loses_nothing(
    tmp_path: Path, dsn: str
) -> None:
    gateways, messages, subs = ["gw1", "gw2", "gw3"], 300, 10
    rows = len(gateways) * messages * subs
    with fleet_hub(tmp_path / "hub", gateways) as hub:
        asyncio.run(_publish(hub, gateways, messages, subs))
        first = start_collector(hub, dsn, tmp_path / "c1.log")
        try:
            deadline = time.monotonic() + 30
            while time.monotonic() < deadline:
                # Frozen between a fetch and its acks: the consumer holds unacked messages.
                if query(dsn, "SELECT to_regclass('hub.usage')") != [(None,)]:
                    (n,) = query(dsn, "SELECT count(*) FROM hub.usage")[0]
                    if n > 0:
                        first.send_signal(signal.SIGSTOP)
                        if asyncio.run(_ack_pending(hub)) > 0:
                            break
                        first.send_signal(signal.SIGCONT)
                time.sleep(0.005)
            else:
                pytest.fail("the first collector never stored a batch")
            stored_before = query(dsn, "SELECT count(*) FROM hub.usage")[0][0]
            assert 0 < stored_before < rows, "killed before or after the work: proves nothing"
        finally:
            first.kill()
            first.wait()
        others = [start_collector(hub, dsn, tmp_path / f"c{i}.log") for i in (2, 3)]
        try:
            deadline = time.monotonic() + 30
            while query(dsn, "SELECT count(*) FROM hub.usage")[0][0] < rows:
                assert time.monotonic() < deadline, "the collectors never stored every row"
                time.sleep(0.1)
        finally:
            for proc in others:
                proc.send_signal(signal.SIGTERM)
            codes = [proc.wait(10) for proc in others]
    assert codes == [0, 0], [(tmp_path / f"c{i}.log").read_text() for i in (2, 3)]
    expected = {(gw, f"s{i}"): sum(range(1, messages + 1)) for gw in gateways for i in range(subs)}
    sums = query(dsn, "SELECT gw, sub, SUM(up), SUM(down), count(*) FROM hub.usage GROUP BY 1, 2")
    assert {(g, s): int(up) for g, s, up, _down, _n in sums} == expected
    assert all(int(down) == 2 * int(up) and n == messages for _g, _s, up, down, n in sums)
    progress = query(dsn, "SELECT gw, epoch, seq FROM hub.progress ORDER BY gw")
    assert progress == [(gw, "e1", messages) for gw in gateways]
    # What the killed collector had not committed, the two others stored (redelivered
    # messages it had committed but not acked come again too, and change nothing).
    counts = [
        int(re.search(r"stored (\d+) messages", (tmp_path / f"c{i}.log").read_text())[1])  # type: ignore[index]
        for i in (2, 3)
    ]
    assert sum(counts) >= len(gateways) * messages - stored_before // subs, counts
