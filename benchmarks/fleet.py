"""Fleet throughput: simulated gateways -> three-node JetStream -> collectors -> PostgreSQL.

desanet's path, end to end on this one machine: N simulated gateways
(tests/fleet_sim.py: the real meter service with its journal fsync'd per
message, and the real forwarder, all forwarders on one event loop), a
three-node nats-server cluster on loopback with the stream replicated 3
times, two `desanet hub collect` processes and a throwaway PostgreSQL. The
gateways journal as fast as they can for a while; records_per_s_to_postgres
is the subscriber rows stored divided by the time from the first interval
journaled to the last row committed, and every row is checked against the
simulator's truth before the figure counts. journal_bytes_7d_200 is a 200-
subscriber gateway's journal bytes per 1 s interval (every subscriber moving),
times a week.

Not measured yet, so not in the headline: catchup_7d_s (needs the backlog
compaction and an emulated 2 Mbit/s, 600 ms link) and vs_radius_sql (the
FreeRADIUS radacct peer). The hub's processes come from the test harness
(tests/fleet_harness.py, tests/pg_harness.py): run it from the source tree, as
`make bench` does.
"""

from __future__ import annotations

import importlib.util
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

from desanet.benchmarks.common import Report, parse_args
from desanet.cython_ext.usage import UsageInterval
from desanet.meter.fleet_forward import ForwarderConfig
from desanet.meter.keys import ServerSecurity
from desanet.meter.service import MeterService, StreamConfig

QUICK = {"gateways": 20, "subscribers": 20, "seconds": 3.0}
FULL = {"gateways": 1000, "subscribers": 100, "seconds": 60.0}
COLLECTORS = 2
WEEK_S = 7 * 86400


def _progress(dsn: str) -> dict[str, int]:
    import psycopg  # the postgres extra; only a checkout runs this benchmark (main())

    with psycopg.connect(dsn) as conn:
        rows = conn.execute("SELECT gw, epoch, seq FROM hub.progress").fetchall()
    # A simulated gateway lives one epoch: its progress is that epoch's newest seq.
    return {gw: int(seq) for gw, _epoch, seq in rows}


def _stored(dsn: str) -> dict[tuple[str, str], tuple[int, int]]:
    import psycopg  # the postgres extra; only a checkout runs this benchmark (main())

    with psycopg.connect(dsn) as conn:
        rows = conn.execute(
            "SELECT gw, sub, SUM(up), SUM(down) FROM hub.usage GROUP BY gw, sub"
        ).fetchall()
    return {(g, s): (int(u), int(d)) for g, s, u, d in rows}


def fleet_run(directory: Path, gateways: int, subscribers: int, seconds: float) -> dict[str, Any]:
    # The checkout's harnesses start nats-server and PostgreSQL (see main()).
    from tests.fleet_harness import fleet_hub, start_collector
    from tests.fleet_sim import FleetSim, LoopThread, gateway_ids
    from tests.pg_harness import postgres_cluster

    """One end-to-end run; the figures of the table row."""
    config = ForwarderConfig(window=256, read_batch=64)
    with (
        postgres_cluster() as pg,
        fleet_hub(directory / "hub", gateway_ids(gateways), nodes=3, replicas=3) as hub,
    ):
        loop = LoopThread()
        sim = FleetSim.start(directory / "gateways", hub, loop.loop, subscribers, config)
        logs = [directory / f"collector{i}.log" for i in range(COLLECTORS)]
        procs = [start_collector(hub, pg.dsn, log, batch=500, ack_wait_s=30) for log in logs]
        try:
            start = time.monotonic()
            rows = rounds = 0
            while time.monotonic() - start < seconds:
                rows += sim.step()
                rounds += 1
            journaled_s = time.monotonic() - start
            if not sim.wait_forwarded(600):
                raise RuntimeError("the gateways' journals never all reached the hub")
            expected = sim.last_seqs()
            deadline = time.monotonic() + 600
            while _progress(pg.dsn) != expected:
                if time.monotonic() > deadline or any(p.poll() is not None for p in procs):
                    raise RuntimeError(f"collectors did not store everything: {logs}")
                time.sleep(0.05)
            end_to_end_s = time.monotonic() - start
            stored = _stored(pg.dsn)
        finally:
            sim.close()
            for proc in procs:
                proc.terminate()
                proc.wait(30)
            loop.close()
    truth = sim.truth()
    if stored != truth:
        wrong = sorted(k for k in truth.keys() | stored.keys() if stored.get(k) != truth.get(k))
        raise RuntimeError(
            f"PostgreSQL's usage differs from the simulator's truth for {len(wrong)} "
            f"subscribers, e.g. {[(k, stored.get(k), truth.get(k)) for k in wrong[:3]]}"
        )
    return {
        "case": "desanet: journal -> JetStream R3 -> collectors -> PostgreSQL",
        "gateways": gateways,
        "subscribers": subscribers,
        "intervals": rounds,
        "rows": rows,
        "journaled_s": journaled_s,
        "end_to_end_s": end_to_end_s,
        "rows_per_s": rows / end_to_end_s,
    }


def journal_bytes_per_interval(
    directory: Path, subscribers: int = 200, intervals: int = 200
) -> float:
    """Journal bytes per interval of one gateway whose `subscribers` all move every interval."""
    slots = {i: f"s{i:04d}" for i in range(1, subscribers + 1)}
    any_port = "tcp://127.0.0.1:*"
    stream = StreamConfig(any_port, any_port, ServerSecurity(plaintext=True))
    service = MeterService("desa-0001", directory, stream, slots)
    rng = np.random.default_rng(0)
    ids = np.arange(1, subscribers + 1, dtype=np.uint32)
    totals = np.zeros((2, subscribers), dtype=np.uint64)
    try:
        for n in range(intervals):
            up = rng.integers(1, 50_000, subscribers, dtype=np.uint64)
            down = rng.integers(1, 500_000, subscribers, dtype=np.uint64)
            totals += np.stack([up, down])
            pkts = np.ones(subscribers, dtype=np.uint64)
            t1 = 1_793_491_200_000 + (n + 1) * 1000
            service.publish(
                UsageInterval(t1 - 1000, t1, ids, up, down, pkts, pkts, totals[0], totals[1]), {}
            )
        return service.journal.size_bytes / service.last_seq
    finally:
        service.close()


def radius_sql_records_per_s(directory: Path, subscribers: int, rounds: int) -> float:
    """vs_radius_sql's peer: subscriber records (one per subscriber and interval) sent as
    RADIUS Interim-Updates by the gateway's accounting client to FreeRADIUS writing radacct
    to PostgreSQL (benchmarks/radius.py's server and measurement)."""
    from desanet.benchmarks.radius import interims_per_s_for
    from desanet.gateway.pg_lab import postgres_cluster
    from desanet.gateway.radius_lab import freeradius_server

    with postgres_cluster() as pg, freeradius_server(pg, debug=False) as server:
        rate, _count = interims_per_s_for(server, directory, subscribers, rounds)
    return rate


def main() -> None:
    args = parse_args(__doc__.splitlines()[0] if __doc__ else "fleet")
    size = QUICK if args.quick else FULL
    report = Report(
        "fleet",
        ["case", "gateways", "subscribers", "intervals", "rows", "end_to_end_s", "rows_per_s"],
        quick=args.quick,
    )
    try:
        harness = importlib.util.find_spec("tests.fleet_harness") is not None
    except ModuleNotFoundError:  # no `tests`: not a source checkout
        harness = False
    if not harness:
        report.skip(
            args,
            "it needs the fleet harness of a source checkout (tests/fleet_harness.py: "
            "nats-server and PostgreSQL on loopback); run `make bench` in a clone",
        )
        return
    with tempfile.TemporaryDirectory(prefix="desanet-bench-fleet-") as tmp:
        row = fleet_run(
            Path(tmp) / "run",
            int(size["gateways"]),
            int(size["subscribers"]),
            float(size["seconds"]),
        )
        per_interval = journal_bytes_per_interval(Path(tmp) / "journal200")
        radius_rate = radius_sql_records_per_s(Path(tmp) / "radius", 200, 5 if args.quick else 50)
    report.add(**row)
    report.headline["gateways"] = float(row["gateways"])
    report.headline["records_per_s_to_postgres"] = float(row["rows_per_s"])
    report.headline["journal_bytes_7d_200"] = per_interval * WEEK_S
    report.headline["vs_radius_sql"] = float(row["rows_per_s"]) / radius_rate
    report.notes.append(
        f"vs_radius_sql: the same records as RADIUS Interim-Updates (200 sessions) into "
        f"FreeRADIUS writing radacct to PostgreSQL: {radius_rate:.0f} records/s"
    )
    report.notes.append(
        f"journal_bytes_7d_200: {per_interval:.0f} B per 1 s interval of 200 subscribers, "
        "uncompacted (the backlog compaction is not built yet)"
    )
    report.notes.append(
        "not measured yet: catchup_7d_s (compaction, emulated 2 Mbit/s 600 ms link) and "
        "vs_radius_sql (the FreeRADIUS radacct peer)"
    )
    report.finish(args)


if __name__ == "__main__":
    main()
