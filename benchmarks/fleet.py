"""Fleet throughput: simulated gateways -> three-node JetStream -> collectors -> PostgreSQL.

desanet's path, end to end on this one machine: N simulated gateways
(tests/fleet_sim.py: the real meter service with its journal fsync'd per
message, and the real forwarder; the gateways journal from a pool of threads,
all forwarders share one event loop, all of it one Python process), a
three-node nats-server cluster on loopback with the stream replicated 3
times, one `desanet hub collect` process and a throwaway PostgreSQL. Every
row is checked against the simulator's truth before a figure counts.

records_per_s_to_postgres: the gateways journal `seconds` worth of intervals
while the hub is away for them (their forwarders not started), then every
forwarder starts at once, as when a hub comes back from an outage; the
subscriber rows stored divided by the time from that start to the last row
committed. The hub's side (JetStream R3, the collector, PostgreSQL) and the
gateways' forwarders carry the whole load; the gateways' own journaling,
which on a real fleet runs on a thousand machines, is done beforehand.
records_per_s_live: the same with the gateways journaling and forwarding at
once, timed from the first interval journaled to the last row committed: here
the one simulator process journaling for every gateway is the limit.
Each row of the table also gives the cores the run took (all of its
processes' CPU time over the timed span).

journal_bytes_7d_200: the journal of a 200-subscriber gateway (every
subscriber moving every 1 s) after a week without its hub, computed from
measured samples: the newest hour as journaled (bytes per interval of the real
meter service, state changes included, times 3,600) plus 167 hours compacted
(the journal bytes of one hour compacted by meter.compact, times 167).

catchup_7d_s: that week of compacted backlog (167 compacted hours, built from
the compacted sample hour, and the raw last hour) delivered by the real
forwarder to a nats-server hub over an emulated 2 Mbit/s link with 300 ms each
way (600 ms round trip), from the forwarder's start until the hub acknowledged
the last seq. The link is tests/fleet_slowlink.py, a rate-limiting, delaying
TCP proxy on loopback: this kernel has no netem, and the VM tier (which has)
runs under TCG, far too slow to carry a week of backlog through TLS.

vs_radius_sql: records_per_s_to_postgres over the same subscriber records
sent as RADIUS Interim-Updates by the gateway's accounting client to FreeRADIUS
3 writing radacct to PostgreSQL (benchmarks/radius.py's setup), in the same run.

The hub's processes come from the test harness
(tests/fleet_harness.py, tests/pg_harness.py): run it from the source tree, as
`make bench` does.
"""

from __future__ import annotations

import importlib.util
import os
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

from desanet.benchmarks.common import Report, cpu_seconds, parse_args, pids_named
from desanet.cython_ext.usage import UsageInterval
from desanet.meter.fleet import FleetConnection, gateway_inbox
from desanet.meter.fleet_forward import Forwarder, ForwarderConfig
from desanet.meter.keys import ServerSecurity
from desanet.meter.records import encode_record
from desanet.meter.service import MeterService, StreamConfig

QUICK = {"gateways": 20, "subscribers": 20, "seconds": 3.0}
FULL = {"gateways": 1000, "subscribers": 100, "seconds": 60.0}
# Two collectors share the consumer: with PostgreSQL's part under 2 us a row, one
# collector's fetch -> COPY -> commit -> acks in turn left the machine a core idle
# (1,000 gateways' backlog: 86,000 rows/s with one, 115,000 with two, same load).
COLLECTORS = 2
# A thousand replay threads in one process, each waking ten times a second with nothing
# to do, took 0.65 of a core from the rest of the run (0.07 waking once a second).
IDLE_POLL_MS = 1000
HOUR_S = 3600
WEEK_H = 7 * 24
# The catch-up: (subscribers, seconds of the compacted sample, copies of it, raw seconds).
CATCHUP_QUICK = (20, 600, 1, 60)
CATCHUP_FULL = (200, HOUR_S, WEEK_H - 1, HOUR_S)


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


def fleet_run(
    directory: Path, gateways: int, subscribers: int, seconds: float, backlog: bool = False
) -> dict[str, Any]:
    """One end-to-end run; the figures of the table row.

    Live (the default): the gateways journal for `seconds` while forwarding, and
    the time runs from the first interval journaled to the last row committed.
    `backlog`: the gateways journal `seconds` worth of rounds with their
    forwarders not yet started (the hub away), then all of them forward at once;
    the time runs from that start to the last row committed.
    """
    # The checkout's harnesses start nats-server and PostgreSQL (see main()).
    from tests.fleet_harness import fleet_hub, start_collector
    from tests.fleet_sim import FleetSim, LoopThread, gateway_ids
    from tests.pg_harness import postgres_cluster

    config = ForwarderConfig(window=256, read_batch=64)
    with (
        postgres_cluster() as pg,
        fleet_hub(directory / "hub", gateway_ids(gateways), nodes=3, replicas=3) as hub,
    ):
        loop = LoopThread()
        sim = FleetSim.start(
            directory / "gateways",
            hub,
            loop.loop,
            subscribers,
            config,
            forwarding=not backlog,
            idle_poll_ms=IDLE_POLL_MS,
        )
        logs = [directory / f"collector{i}.log" for i in range(COLLECTORS)]
        procs = [start_collector(hub, pg.dsn, log, batch=500, ack_wait_s=30) for log in logs]
        nats_pids = {n.proc.pid for n in hub.nats.nodes if n.proc is not None}
        collector_pids = {p.pid for p in procs}

        def cpu() -> dict[int, float]:
            return cpu_seconds({os.getpid()} | nats_pids | collector_pids | pids_named("postgres"))

        try:
            cpu_before = cpu()
            start = time.monotonic()
            rows = rounds = 0
            while time.monotonic() - start < seconds:
                rows += sim.step()
                rounds += 1
            journaled_s = time.monotonic() - start
            if backlog:
                cpu_before = cpu()
                start = time.monotonic()
                sim.start_forwarding()
            if not sim.wait_forwarded(600):
                raise RuntimeError("the gateways' journals never all reached the hub")
            expected = sim.last_seqs()
            deadline = time.monotonic() + 600
            while _progress(pg.dsn) != expected:
                if time.monotonic() > deadline or any(p.poll() is not None for p in procs):
                    raise RuntimeError(f"collectors did not store everything: {logs}")
                time.sleep(0.05)
            end_to_end_s = time.monotonic() - start
            cpu_after = cpu()
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
    used = {p: v - cpu_before.get(p, 0.0) for p, v in cpu_after.items()}
    groups = {
        "simulator": {os.getpid()},
        "nats-servers": nats_pids,
        "collectors": collector_pids,
    }
    split = {
        name: sum(used.get(p, 0.0) for p in pids) / end_to_end_s for name, pids in groups.items()
    }
    split["postgres"] = sum(used.values()) / end_to_end_s - sum(split.values())
    case = "backlog of every gateway at once" if backlog else "live"
    return {
        "case": f"desanet, {case}: journal -> JetStream R3 -> collectors -> PostgreSQL",
        "gateways": gateways,
        "subscribers": subscribers,
        "intervals": rounds,
        "rows": rows,
        "journaled_s": journaled_s,
        "end_to_end_s": end_to_end_s,
        "rows_per_s": rows / end_to_end_s,
        # What the whole run (simulator, nats-servers, collectors, PostgreSQL) took of the
        # machine while it was timed (backlog: the delivery only; live: from the start).
        "cores": sum(used.values()) / end_to_end_s,
        "cores_split": ", ".join(f"{name} {v:.2f}" for name, v in split.items()),
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


def catchup_run(directory: Path, quick: bool) -> dict[str, Any]:
    """A week's compacted backlog (quick: minutes) through the slow link to a hub; timed."""
    from tests.fleet_harness import fleet_hub, read_stream
    from tests.fleet_slowlink import LinkShape, SlowLink
    from tests.fleet_week import EPOCH, compacted_sample, raw_intervals, write_backlog

    subscribers, sample_s, copies, raw_s = CATCHUP_QUICK if quick else CATCHUP_FULL
    sample = compacted_sample(subscribers, sample_s)
    journal = write_backlog(
        directory / "journal", sample, copies, raw_intervals(subscribers, raw_s, seed=1)
    )
    gw = "desa-0001"
    with fleet_hub(directory / "hub", [gw]) as hub:
        link = SlowLink(hub.nats.nodes[0].port, LinkShape())
        port = link.start()
        conn = FleetConnection(
            [f"tls://127.0.0.1:{port}"], hub.files.gateways[gw], gw, gateway_inbox(gw), hub.tls.ca
        )
        forwarder = Forwarder(
            gw, journal, directory / "cursor.json", conn, ForwarderConfig(compact_every_s=None)
        )
        try:
            start = time.monotonic()
            forwarder.start()
            if not forwarder.wait_acked(journal.last_seq, 3600):
                raise RuntimeError(f"the backlog did not reach the hub: {forwarder.status()}")
            catchup_s = time.monotonic() - start
        finally:
            forwarder.stop()
            link.stop()
            journal.close()
        stored = read_stream(hub, timeout_s=600)
    sent = [m for m in stored if b"merged_into" not in m.data]
    if len(sent) != len(stored) or stored[-1].msg_id != f"{gw}:{EPOCH}:{journal.last_seq}":
        raise RuntimeError("the hub's stream does not end with the journal's last message")
    return {
        "case": "catch-up over 2 Mbit/s, 600 ms RTT (slowlink proxy)",
        "subscribers": subscribers,
        "intervals": journal.last_seq,
        "rows": len(stored),
        "end_to_end_s": catchup_s,
        "link_bytes": link.carried_up,
    }


def journal_bytes_7d(per_interval_raw: float, sample: list[tuple[int, bytes]]) -> float:
    """The newest hour as journaled plus the other 167 hours as compacted (see the module doc)."""
    compacted = sum(len(encode_record(seq, data, b"")) for seq, data in sample)
    per_hour = compacted * HOUR_S / len(sample)
    return per_interval_raw * HOUR_S + per_hour * (WEEK_H - 1)


def main() -> None:
    args = parse_args(__doc__.splitlines()[0] if __doc__ else "fleet")
    size = QUICK if args.quick else FULL
    report = Report(
        "fleet",
        [
            "case",
            "gateways",
            "subscribers",
            "intervals",
            "rows",
            "end_to_end_s",
            "rows_per_s",
            "cores",
        ],
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
        sizes = (int(size["gateways"]), int(size["subscribers"]), float(size["seconds"]))
        # Quick: the live run is the unit tier's (tests/unit/test_fleet_sim.py) and the full's.
        live = None if args.quick else fleet_run(Path(tmp) / "live", *sizes)
        backlog = fleet_run(Path(tmp) / "backlog", *sizes, backlog=True)
        per_interval = journal_bytes_per_interval(Path(tmp) / "journal200")
        radius_rate = radius_sql_records_per_s(Path(tmp) / "radius", 200, 5 if args.quick else 50)
        from tests.fleet_week import compacted_sample  # a source checkout (checked above)

        sample = compacted_sample(200, 600 if args.quick else HOUR_S)
        catchup = catchup_run(Path(tmp) / "catchup", args.quick)
    if live is not None:
        report.add(**live)
    report.add(**backlog)
    report.add(**catchup)
    report.headline["gateways"] = float(backlog["gateways"])
    report.headline["records_per_s_to_postgres"] = float(backlog["rows_per_s"])
    report.headline["vs_radius_sql"] = float(backlog["rows_per_s"]) / radius_rate
    report.notes.append(
        f"records_per_s_to_postgres: every gateway's journal delivered at once (the hub back "
        f"after an outage): {backlog['rows']} rows journaled beforehand in "
        f"{backlog['journaled_s']:.0f} s, delivered and stored in {backlog['end_to_end_s']:.1f} s "
        f"using {backlog['cores']:.2f} cores of the machine ({backlog['cores_split']})"
    )
    if live is not None:
        report.headline["records_per_s_live"] = float(live["rows_per_s"])
        report.notes.append(
            f"records_per_s_live: the gateways journal and forward at once, all "
            f"{live['gateways']} in this one process: {live['rows']} rows, using "
            f"{live['cores']:.2f} cores ({live['cores_split']}); they journaled "
            f"{live['rows'] / live['journaled_s']:.0f} rows/s meanwhile (the limit: a real "
            f"gateway has its own machine); the last row was stored "
            f"{live['end_to_end_s'] - live['journaled_s']:.1f} s after the last interval"
        )
    report.notes.append(
        f"vs_radius_sql: records_per_s_to_postgres over the same records as RADIUS "
        f"Interim-Updates (200 sessions) into FreeRADIUS writing radacct to PostgreSQL: "
        f"{radius_rate:.0f} records/s"
    )
    report.headline["journal_bytes_7d_200"] = journal_bytes_7d(per_interval, sample)
    report.headline["catchup_7d_s"] = float(catchup["end_to_end_s"])
    report.notes.append(
        f"journal_bytes_7d_200: the newest hour at {per_interval:.0f} B per 1 s interval of 200 "
        f"subscribers, 167 hours compacted at {len(sample)} compacted records per "
        f"{'10 min' if args.quick else 'hour'} sample, computed from those samples"
    )
    report.notes.append(
        f"catchup_7d_s: {catchup['intervals']} seqs ({catchup['rows']} messages sent, the "
        f"empty ones of merged minutes stay home), {catchup['link_bytes']} B over the link"
        + (" (quick: minutes of backlog of 20 subscribers, not a week)" if args.quick else "")
    )
    report.finish(args)


if __name__ == "__main__":
    main()
