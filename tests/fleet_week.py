"""A week of a gateway's journal without its hub, built in seconds: raw and compacted intervals.

For the fleet benchmark's `journal_bytes_7d_200` and `catchup_7d_s`
(benchmarks/fleet.py): one gateway whose subscribers all move every 1 s
interval, its intervals compacted by meter.compact as the forwarder would,
and a journal of many copies of a compacted hour written as segment files
straight away (one write per segment, not an fsync per record).
"""

from __future__ import annotations

from pathlib import Path

import msgpack
import numpy as np

from desanet.meter.compact import compact_records
from desanet.meter.journal import SUFFIX, Journal
from desanet.meter.records import encode_record, encode_segment_header
from desanet.meter.wire import encode_usage

HOUR_S = 3600
EPOCH = "0000000000bench00000000000000000"
T0_MS = 1_793_491_200_000  # 2026-11-01 00:00 UTC


def raw_intervals(subscribers: int, seconds: int, seed: int = 0) -> list[tuple[int, bytes]]:
    """`seconds` 1 s usage messages of a gateway whose `subscribers` all move every interval."""
    rng = np.random.default_rng(seed)
    subs = [f"s{i:04d}" for i in range(1, subscribers + 1)]
    totals = np.full((2, subscribers), 10**10, dtype=np.uint64)  # a few months in
    out = []
    for seq in range(1, seconds + 1):
        up = rng.integers(1, 50_000, subscribers, dtype=np.uint64)
        down = rng.integers(1, 500_000, subscribers, dtype=np.uint64)
        totals += np.stack([up, down])
        ones = [1] * subscribers
        columns = {
            "up": up.tolist(),
            "down": down.tolist(),
            "up_pkts": ones,
            "down_pkts": ones,
            "up_total": totals[0].tolist(),
            "down_total": totals[1].tolist(),
        }
        t1 = T0_MS + seq * 1000
        out.append((seq, encode_usage("desa-0001", seq, t1 - 1000, t1, subs, columns, epoch=EPOCH)))
    return out


def compacted_sample(subscribers: int, seconds: int) -> list[tuple[int, bytes]]:
    """`seconds` of raw intervals compacted by meter.compact (all of it older than an hour)."""
    raw = raw_intervals(subscribers, seconds)
    compacted = compact_records(raw, older_than_ms=T0_MS + (seconds + HOUR_S) * 1000, first_seq=1)
    if compacted is None:
        raise RuntimeError("the compaction merged nothing")
    return compacted[0]


def shifted(data: bytes, seqs: int, ms: int) -> bytes:
    body = msgpack.unpackb(data, raw=False)
    body["seq"] += seqs
    body["t0"] += ms
    body["t1"] += ms
    if "merged" in body:
        body["merged"] = [body["merged"][0] + seqs, body["merged"][1] + seqs]
    if "merged_into" in body:
        body["merged_into"] += seqs
    return bytes(msgpack.packb(body))


def write_backlog(
    directory: Path, sample: list[tuple[int, bytes]], copies: int, raw: list[tuple[int, bytes]]
) -> Journal:
    """A journal of `copies` of the compacted `sample` in a row, then the `raw` intervals.

    Written as segment files straight away (one fsync per segment, not per record,
    so a week is built in seconds); the forwarder reads it through Journal as usual.
    """
    directory.mkdir(parents=True)
    span = len(sample)
    segment_bytes = 16 << 20
    chunks: list[bytes] = []
    first, size, seq = 1, 0, 0

    def flush() -> None:
        if chunks:
            path = directory / f"{first:020d}{SUFFIX}"
            path.write_bytes(encode_segment_header(EPOCH) + b"".join(chunks))
            chunks.clear()

    def add(data: bytes) -> None:
        nonlocal first, size, seq
        seq += 1
        record = encode_record(seq, data, b"")
        if size + len(record) > segment_bytes:
            flush()
            first, size = seq, 0
        chunks.append(record)
        size += len(record)

    for copy in range(copies):
        for _seq, data in sample:
            add(shifted(data, copy * span, copy * span * 1000))
    for _seq, data in raw:
        add(shifted(data, copies * span, copies * span * 1000))
    flush()
    return Journal(directory)
