"""The whole fleet on one machine: gateways, a three-node hub, collectors and PostgreSQL.

Simulated gateways (tests/fleet_sim.py: the real meter service, journal and
forwarder, synthetic counters) forward to a three-node JetStream cluster
(stream replicated 3 times); two collector processes store into PostgreSQL.
Mid-run one NATS node and one collector die by SIGKILL, then the whole hub
goes away and comes back while the gateways go on journaling. At the end
every gateway's and subscriber's bytes in PostgreSQL equal the truth exactly.
"""

from __future__ import annotations

import time
from pathlib import Path

import psycopg
import pytest

from desanet.meter.fleet_forward import ForwarderConfig
from tests.fleet_harness import fleet_hub, hub_totals, start_collector
from tests.fleet_sim import FleetSim, LoopThread, gateway_ids
from tests.pg_harness import postgres_cluster

pytestmark = pytest.mark.unit

GATEWAYS, SUBSCRIBERS, ROUNDS = 12, 20, 40
FORWARDER = ForwarderConfig(window=64, ack_timeout_s=3.0, save_interval_s=0.2)


def _progress(dsn: str) -> dict[str, int]:
    with psycopg.connect(dsn) as conn:
        if conn.execute("SELECT to_regclass('hub.progress')").fetchone() == (None,):
            return {}
        rows = conn.execute("SELECT gw, epoch, seq FROM hub.progress").fetchall()
    return {gw: int(seq) for gw, _epoch, seq in rows}  # one epoch per simulated gateway


def test_every_byte_reaches_postgres_through_node_collector_and_hub_failures(
    tmp_path: Path,
) -> None:
    with (
        postgres_cluster() as pg,
        fleet_hub(tmp_path / "hub", gateway_ids(GATEWAYS), nodes=3, replicas=3) as hub,
    ):
        loop = LoopThread()
        sim = FleetSim.start(tmp_path / "gateways", hub, loop.loop, SUBSCRIBERS, FORWARDER)
        logs = [tmp_path / f"collector{i}.log" for i in (1, 2)]
        collectors = [start_collector(hub, pg.dsn, log) for log in logs]
        nodes = hub.nats.nodes
        try:
            for round_ in range(ROUNDS):
                sim.step()
                time.sleep(0.05)
                if round_ == 10:
                    nodes[1].kill()
                elif round_ == 15:
                    collectors[0].kill()
                elif round_ == 20:
                    for node in nodes:
                        node.kill()  # the hub is away; the gateways go on journaling
                elif round_ == 30:
                    for node in nodes:
                        node.start()  # gateways and collectors find it by themselves
            assert sim.wait_forwarded(60), [g.forwarder.status() for g in sim.gateways]
            expected = sim.last_seqs()
            deadline = time.monotonic() + 60
            while _progress(pg.dsn) != expected:
                assert time.monotonic() < deadline, [log.read_text()[-3000:] for log in logs]
                time.sleep(0.2)
            assert collectors[1].poll() is None, logs[1].read_text()
        finally:
            sim.close()
            for proc in collectors:
                proc.terminate()
                proc.wait(10)
            loop.close()
        report = hub_totals(pg.dsn, "2026-11")
        with psycopg.connect(pg.dsn) as conn:
            usage = conn.execute(
                "SELECT gw, sub, SUM(up), SUM(down) FROM hub.usage GROUP BY gw, sub"
            ).fetchall()
    truth = sim.truth()
    assert {(g, s): (int(u), int(d)) for g, s, u, d in usage} == truth
    # The monthly report: the same sums, and every subscriber's totals at the end of it.
    assert {k: (u, d) for k, (u, d, _ut, _dt) in report.items()} == truth
    assert {k: (ut, dt) for k, (_u, _d, ut, dt) in report.items()} == truth
    assert sum(g.forwarder.status().republished for g in sim.gateways) > 0
