"""Usage stream throughput: aggregator output to a billing client over TCP loopback.

desanet: MeterService (journal fsync'd per message, msgpack columns, one
message per interval) -> PUB -> a client process decoding with meter.wire.
Peer, same run, alternating: one JSON message per record over the same kind
of socket (the interval journaled the same way, so the difference is the wire
format and the per-message cost). Bytes on the wire count the ZMTP frame
headers too. Headline: records_per_s, speedup_vs_json_per_record,
wire_bytes_per_record.
"""

from __future__ import annotations

import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import zmq

from desanet.benchmarks.common import Report, median, parse_args
from desanet.cython_ext.usage import UsageInterval
from desanet.meter import wire
from desanet.meter.journal import Journal
from desanet.meter.keys import ServerSecurity
from desanet.meter.service import MeterService, StreamConfig

ANY_PORT = "tcp://127.0.0.1:*"


def _frame_bytes(frames: list[bytes]) -> int:
    # ZMTP 3 frame header: flags + 1-byte length below 256 bytes, else flags + 8-byte length.
    return sum(len(f) + (2 if len(f) < 256 else 9) for f in frames)


def client_main(endpoint: str, kind: str, expected_records: int) -> None:
    """Billing side (run in its own process): receive and decode until every record arrived."""
    ctx = zmq.Context()
    sub = ctx.socket(zmq.SUB)
    sub.rcvhwm = 0
    sub.subscribe(b"usage.")
    sub.connect(endpoint)
    print("ready", flush=True)
    records = wire_bytes = 0
    while records < expected_records:
        frames = sub.recv_multipart()
        wire_bytes += _frame_bytes(frames)
        if kind == "msgpack":
            msg = wire.decode_usage(frames[1])
            if msg.snapshot:
                continue
            records += len(msg)
        else:
            json.loads(frames[1])
            records += 1
    print(json.dumps({"t_end": time.time(), "records": records, "wire_bytes": wire_bytes}))
    sub.close()
    ctx.term()


def _intervals(n_msgs: int, n_subs: int) -> list[UsageInterval]:
    rng = np.random.default_rng(1)
    slots = np.arange(1, n_subs + 1, dtype=np.uint32)
    totals = np.zeros((n_subs, 2), dtype=np.uint64)
    out = []
    for i in range(n_msgs):
        up = rng.integers(0, 2_000_000, n_subs, dtype=np.uint64)
        down = rng.integers(0, 20_000_000, n_subs, dtype=np.uint64)
        totals[:, 0] += up
        totals[:, 1] += down
        out.append(
            UsageInterval(
                t0_ms=1_790_000_000_000 + i * 1000,
                t1_ms=1_790_000_001_000 + i * 1000,
                slots=slots,
                up=up,
                down=down,
                up_pkts=up // np.uint64(1000),
                down_pkts=down // np.uint64(1200),
                up_total=totals[:, 0].copy(),
                down_total=totals[:, 1].copy(),
            )
        )
    return out


def _start_client(endpoint: str, kind: str, records: int) -> subprocess.Popen[str]:
    code = (
        "from desanet.benchmarks.stream import client_main; "
        f"client_main({endpoint!r}, {kind!r}, {records})"
    )
    proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    assert proc.stdout is not None
    if proc.stdout.readline().strip() != "ready":
        raise RuntimeError("benchmark client did not start")
    time.sleep(0.5)  # let the subscription reach the publisher
    return proc


def _finish(proc: subprocess.Popen[str], t_start: float) -> tuple[float, int, int]:
    out, _ = proc.communicate(timeout=600)
    result = json.loads(out.strip().splitlines()[-1])
    return result["t_end"] - t_start, result["records"], result["wire_bytes"]


def run_desanet(
    intervals: list[UsageInterval], state: dict[str, np.ndarray]
) -> tuple[float, int, int]:
    n_records = sum(len(iv) for iv in intervals)
    with tempfile.TemporaryDirectory(prefix="desanet-bench-") as tmp:
        svc = MeterService(
            "bench",
            Path(tmp),
            StreamConfig(
                ANY_PORT, ANY_PORT, ServerSecurity(plaintext=True), snapshot_every=10**9, send_hwm=0
            ),
            {int(s): f"s{int(s):05d}" for s in intervals[0].slots},
        )
        try:
            proc = _start_client(svc.usage_endpoint, "msgpack", n_records)
            t_start = time.time()
            for iv in intervals:
                # What the aggregator's state holds per slot: raw counters and totals.
                state["last_raw"][iv.slots, 0] += iv.up
                state["last_raw"][iv.slots, 2] += iv.down
                state["total"][iv.slots, 0] = iv.up_total
                state["total"][iv.slots, 2] = iv.down_total
                svc.publish(iv, state)
            return _finish(proc, t_start)
        finally:
            svc.close()


def run_json_peer(intervals: list[UsageInterval]) -> tuple[float, int, int]:
    n_records = sum(len(iv) for iv in intervals)
    names = {int(s): f"s{int(s):05d}" for s in intervals[0].slots}
    ctx = zmq.Context()
    pub = ctx.socket(zmq.PUB)
    pub.sndhwm = 0
    pub.bind(ANY_PORT)
    endpoint = pub.getsockopt_string(zmq.LAST_ENDPOINT)
    topic = wire.topic("bench")
    try:
        with tempfile.TemporaryDirectory(prefix="desanet-bench-") as tmp:
            journal = Journal(Path(tmp), epoch="peer")
            proc = _start_client(endpoint, "json", n_records)
            t_start = time.time()
            for seq, iv in enumerate(intervals, 1):
                cols = {name: getattr(iv, name).tolist() for name in wire.COLUMNS}
                slots = iv.slots.tolist()
                lines = []
                for i, slot in enumerate(slots):
                    record = {"v": 1, "gw": "bench", "seq": seq, "t0": iv.t0_ms, "t1": iv.t1_ms}
                    record["sub"] = names[slot]
                    for name in wire.COLUMNS:
                        record[name] = cols[name][i]
                    lines.append(json.dumps(record).encode())
                journal.append(seq, b"\n".join(lines), b"")
                for line in lines:
                    pub.send_multipart([topic, line])
            result = _finish(proc, t_start)
            journal.close()
            return result
    finally:
        pub.close(linger=1000)
        ctx.term()


def main() -> None:
    args = parse_args(__doc__ or "usage stream benchmark")
    n_subs = 10_000
    n_msgs, rounds = (5, 1) if args.quick else (60, 3)
    intervals = _intervals(n_msgs, n_subs)
    state = {name: np.zeros((n_subs + 1, 4), dtype=np.uint64) for name in ("last_raw", "total")}
    ours: list[tuple[float, int, int]] = []
    peer: list[tuple[float, int, int]] = []
    for _ in range(rounds):
        ours.append(run_desanet(intervals, state))
        peer.append(run_json_peer(intervals))
    report = Report(
        name="stream",
        columns=["case", "records", "seconds", "records_per_s", "wire_bytes_per_record"],
        quick=args.quick,
    )
    figures = {}
    for case, runs in (("desanet msgpack batch + journal", ours), ("JSON per record", peer)):
        seconds = median([r[0] for r in runs])
        records = runs[0][1]
        per_record = runs[0][2] / records
        figures[case] = (records / seconds, per_record)
        report.add(
            case=case,
            records=records,
            seconds=seconds,
            records_per_s=records / seconds,
            wire_bytes_per_record=per_record,
        )
    ours_rate, ours_bytes = figures["desanet msgpack batch + journal"]
    peer_rate, _ = figures["JSON per record"]
    report.headline = {
        "records_per_s": ours_rate,
        "speedup_vs_json_per_record": ours_rate / peer_rate,
        "wire_bytes_per_record": ours_bytes,
    }
    report.notes.append(
        f"{n_msgs} intervals x {n_subs} subscribers, median of {rounds} alternating rounds; "
        "client in its own process decoding every message; journal fsync'd per interval in both"
    )
    report.finish(args)


if __name__ == "__main__":
    main()
