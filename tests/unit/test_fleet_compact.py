"""A week offline loses nothing: the journal's backlog compacted, then delivered exactly.

First on a journal alone: compaction merges the intervals older than an hour
into one message per minute, and every subscriber's delta sums, last totals,
events and the seqs are what they were. Then end to end: a simulated gateway
(the real meter service, journal and forwarder) loses its hub, goes on
journaling while its forwarder compacts the backlog, and when the hub comes
back PostgreSQL holds exactly the simulator's truth.
"""

from __future__ import annotations

import time
from collections import Counter
from pathlib import Path

import msgpack
import numpy as np
import psycopg
import pytest

from desanet.meter.compact import compact_journal
from desanet.meter.fleet_forward import ForwarderConfig
from desanet.meter.journal import Journal, Retention
from desanet.meter.wire import COLUMNS, UsageEvent, decode_usage, encode_usage
from tests.fleet_harness import fleet_hub, hub_totals, start_collector
from tests.fleet_sim import FleetSim, LoopThread, gateway_ids
from tests.pg_harness import postgres_cluster

pytestmark = pytest.mark.unit

HOUR_MS = 3_600_000
START_MS = 1_793_491_200_000  # 2026-11-01 00:00 UTC


def _write_journal(directory: Path, seconds: int) -> Journal:
    """`seconds` one-second intervals of 30 subscribers, with events, drops and snapshots."""
    journal = Journal.create(directory, "e1", Retention(segment_bytes=64 << 10))
    rng = np.random.default_rng(7)
    totals = {f"s{i:02d}": [0, 0] for i in range(30)}
    for seq in range(1, seconds + 1):
        t1 = START_MS + seq * 1000
        if seq % 60 == 0:
            subs = list(totals)
            zeros = [0] * len(subs)
            columns = {n: zeros for n in ("up", "down", "up_pkts", "down_pkts")}
            columns["up_total"] = [totals[s][0] for s in subs]
            columns["down_total"] = [totals[s][1] for s in subs]
            message = encode_usage("gw", seq, t1, t1, subs, columns, epoch="e1", snapshot=True)
        else:
            subs = [s for s in totals if rng.random() < 0.5]
            up = rng.integers(1, 10**6, len(subs)).tolist()
            down = rng.integers(1, 10**7, len(subs)).tolist()
            for s, u, d in zip(subs, up, down, strict=True):
                totals[s][0] += u
                totals[s][1] += d
            events = [UsageEvent(t1, subs[0], "suspend", "now suspended")] if seq % 97 == 0 else []
            columns = {
                "up": up,
                "down": down,
                "up_pkts": [1] * len(subs),
                "down_pkts": [2] * len(subs),
                "up_total": [totals[s][0] for s in subs],
                "down_total": [totals[s][1] for s in subs],
            }
            drops = {"up": seq, "drop_blocked_pkts": seq * 3} if seq % 5 == 0 else None
            message = encode_usage(
                "gw",
                seq,
                t1 - 1000,
                t1,
                subs,
                columns,
                epoch="e1",
                events=events,
                unprovisioned=drops,
            )
        journal.append(seq, message, b"state")
    return journal


def _billing_view(journal: Journal) -> tuple[dict[str, list[int]], Counter[tuple[str, str]], int]:
    """What a billing system summing deltas sees: per subscriber the delta sums and last totals,
    the events, and the unprovisioned bytes up; every seq must be present once."""
    sums: dict[str, list[int]] = {}
    events: Counter[tuple[str, str]] = Counter()
    unprovisioned_up = 0
    records = journal.read(1, 10**9, max_bytes=1 << 40)
    assert [seq for seq, _ in records] == list(range(1, journal.last_seq + 1))
    for _seq, data in records:
        msg = decode_usage(data)
        for rec in msg.records():
            row = sums.setdefault(rec.sub, [0] * 6)
            row[0] += rec.up
            row[1] += rec.down
            row[2] += rec.up_pkts
            row[3] += rec.down_pkts
            row[4], row[5] = rec.up_total, rec.down_total
        events.update((e.sub, e.detail) for e in msg.events)
        unprovisioned_up += (msg.unprovisioned or {}).get("up", 0)
    return sums, events, unprovisioned_up


def test_compaction_keeps_every_total_and_event_and_merges_old_intervals_by_minute(
    tmp_path: Path,
) -> None:
    seconds = 2 * 3600
    journal = _write_journal(tmp_path / "j", seconds)
    before = _billing_view(journal)
    size_before = journal.size_bytes
    untouched = dict(journal.read(1, 100))
    journal.prune(seconds - 10)  # the checkpoint covers nearly everything
    now_ms = START_MS + seconds * 1000  # the first hour is over an hour old
    finished: set[int] = set()
    result = compact_journal(journal, now_ms, sent_seq=100, finished=finished)

    assert result.groups > 50, result
    assert _billing_view(journal) == before, "compaction changed what billing gets"
    assert dict(journal.read(1, 100)) == untouched, "seqs the hub may hold were rewritten"
    assert journal.size_bytes < size_before
    merged = [msgpack.unpackb(d) for _, d in journal.read(101, 10**9, max_bytes=1 << 40)]
    full = [m for m in merged if "merged" in m]
    assert full and all(m["t1"] <= now_ms - HOUR_MS for m in full)
    assert all(m["t1"] - m["t0"] <= 60_000 for m in full), "a merged message spans one minute"
    assert all(m["merged"][1] == m["seq"] for m in full)
    # The newest hour stays as it was: one-second intervals.
    recent = [m for m in merged if m["t0"] >= now_ms - HOUR_MS]
    assert recent and not any("merged" in m or "merged_into" in m for m in recent)
    # A second pass has nothing left to do; the rewritten journal loads as it is.
    assert compact_journal(journal, now_ms, 100, finished).groups == 0
    journal.close()
    reloaded = Journal(tmp_path / "j")
    assert reloaded.last_seq == seconds and reloaded.torn_tail is None
    assert _billing_view(reloaded) == before
    columns = set(COLUMNS)
    assert all(columns <= set(m) for m in merged)


def test_a_gateway_offline_for_hours_compacts_then_delivers_every_byte(tmp_path: Path) -> None:
    forwarder = ForwarderConfig(
        window=64, ack_timeout_s=3.0, save_interval_s=0.2, compact_every_s=0.3, sent_ahead=16
    )
    with (
        postgres_cluster() as pg,
        fleet_hub(tmp_path / "hub", gateway_ids(1)) as hub,
    ):
        loop = LoopThread()
        # Simulated intervals start on 2026-11-01: the clock says they are long past an hour.
        sim = FleetSim.start(
            tmp_path / "gateways",
            hub,
            loop.loop,
            20,
            forwarder,
            retention=Retention(segment_bytes=32 << 10),
            checkpoint_every=50,
        )
        log = tmp_path / "collector.log"
        collector = start_collector(hub, pg.dsn, log, batch=200)
        (gw,) = sim.gateways
        try:
            for _ in range(20):
                sim.step()
            assert sim.wait_forwarded(30)
            for node in hub.nats.nodes:
                node.kill()  # the hub is away
            for _ in range(900):  # fifteen minutes of intervals journaled meanwhile
                sim.step()
            deadline = time.monotonic() + 20
            while gw.forwarder.status().compacted_groups < 10:
                assert time.monotonic() < deadline, gw.forwarder.status()
                time.sleep(0.1)
            for node in hub.nats.nodes:
                node.start()
            assert sim.wait_forwarded(60), gw.forwarder.status()
            seq = gw.service.last_seq
            # The empty messages of merged minutes stay home: far fewer publishes than seqs.
            assert gw.forwarder.status().published < seq / 2, gw.forwarder.status()
            deadline = time.monotonic() + 60
            while True:
                with psycopg.connect(pg.dsn) as conn:
                    row = conn.execute("SELECT max(seq) FROM hub.progress").fetchone()
                if row is not None and row[0] == seq:
                    break
                assert time.monotonic() < deadline, log.read_text()[-3000:]
                time.sleep(0.2)
        finally:
            sim.close()
            collector.terminate()
            collector.wait(10)
            loop.close()
        report = hub_totals(pg.dsn, "2026-11")
        with psycopg.connect(pg.dsn) as conn:
            usage = conn.execute(
                "SELECT gw, sub, SUM(up), SUM(down) FROM hub.usage GROUP BY gw, sub"
            ).fetchall()
            minutes = conn.execute("SELECT count(*) FROM hub.usage WHERE t1 - t0 > 1000").fetchone()
    truth = sim.truth()
    assert {(g, s): (int(u), int(d)) for g, s, u, d in usage} == truth
    # The monthly report: the same sums, and every subscriber's totals at the end of it.
    assert {k: (u, d) for k, (u, d, _ut, _dt) in report.items()} == truth
    assert {k: (ut, dt) for k, (_u, _d, ut, dt) in report.items()} == truth
    assert minutes is not None and minutes[0] > 0, "no compacted interval reached the hub"


def test_retention_keeps_what_the_hub_has_not_acknowledged_up_to_twice_its_size(
    tmp_path: Path,
) -> None:
    journal = Journal.create(tmp_path / "j", "e1", Retention(max_bytes=40_000, segment_bytes=4_000))
    delivered = 10
    journal.hold(lambda: delivered)
    capped = False
    for seq in range(1, 700):
        journal.append(seq, b"x" * 150, b"")
        size = journal.size_bytes
        journal.prune(seq)  # every record is checkpointed: only the hold keeps them
        capped = capped or size > 2 * 40_000
        if not capped:
            assert journal.first_seq == 1, f"seq {seq}: undelivered records dropped"
    assert capped and journal.first_seq > 1
    assert journal.size_bytes <= 2 * 40_000, "the hold let the journal grow unbounded"
    delivered = journal.last_seq
    journal.prune(journal.last_seq)
    assert journal.size_bytes <= 40_000, "delivered records stayed past the size limit"
