"""Journal compaction: a week of backlog in a few hundred MB, every byte and event kept.

While the hub is away the journal is the only copy of the intervals. Intervals
older than `raw_ms` (an hour) are merged, within sealed segments, into one
message per `group_ms` (a minute) of consecutive interval messages:

- the group's **last** seq carries the merged message: `t0` of the first,
  `t1` of the last, every subscriber that moved, its deltas summed (bytes
  and packets), its totals as the last message gave them, every event, the
  `unprovisioned` interval counters summed and its cumulative ones the last;
  key `merged` = [first seq, last seq];
- every other seq of the group stays, as an empty message (no subscriber)
  with its own `t0`/`t1` and key `merged_into` = the group's last seq.

So seq is still +1 per message, nothing is renumbered, and a client summing
deltas over (epoch, seq) still gets exact totals per subscriber; snapshot
messages and messages already compacted are left as they are.

Only what nobody can have partly seen is merged: records up to the journal's
oldest checkpoint (their state changes are never replayed again, so they are
dropped) and above `sent_seq`, the forwarder's mark of everything it ever
published (a group the hub holds a part of is never rewritten).
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import msgpack

from desanet.meter.journal import Journal
from desanet.meter.wire import COLUMNS

_DELTAS = ("up", "down", "up_pkts", "down_pkts")
_TOTALS = ("up_total", "down_total")
_UNPROVISIONED_DELTAS = frozenset(_DELTAS)


@dataclass(frozen=True)
class CompactionPolicy:
    """Intervals older than `raw_ms` are merged into one message per `group_ms`."""

    raw_ms: int = 3_600_000
    group_ms: int = 60_000


@dataclass(frozen=True)
class CompactionResult:
    """What one pass did."""

    segments: int = 0
    groups: int = 0
    bytes_saved: int = 0


def _eligible(body: Any) -> bool:
    return (
        isinstance(body, dict)
        and not body.get("snapshot")
        and "merged" not in body
        and "merged_into" not in body
        and isinstance(body.get("t0"), int)
    )


def _merge(group: list[dict[str, Any]]) -> dict[str, Any]:
    """The merged message of a group (see the module doc), at the group's last seq."""
    last = group[-1]
    rows: dict[str, list[int]] = {}
    events: list[Any] = []
    unprovisioned: dict[str, int] = {}
    for body in group:
        for i, sub in enumerate(body["sub"]):
            row = rows.setdefault(sub, [0] * len(COLUMNS))
            for c, name in enumerate(COLUMNS):
                value = body[name][i]
                row[c] = row[c] + value if name in _DELTAS else value
        events.extend(body.get("ev", ()))
        for key, value in (body.get("unprovisioned") or {}).items():
            base = unprovisioned.get(key, 0) if key in _UNPROVISIONED_DELTAS else 0
            unprovisioned[key] = base + value
    merged = {k: v for k, v in last.items() if k not in ("ev", "unprovisioned")}
    merged["t0"] = group[0]["t0"]
    merged["sub"] = list(rows)
    for c, name in enumerate(COLUMNS):
        merged[name] = [row[c] for row in rows.values()]
    if events:
        merged["ev"] = events
    if unprovisioned:
        merged["unprovisioned"] = unprovisioned
    merged["merged"] = [group[0]["seq"], last["seq"]]
    return merged


def _placeholder(body: dict[str, Any], into: int) -> dict[str, Any]:
    keep = ("v", "gw", "epoch", "seq", "t0", "t1")
    empty: dict[str, Any] = {k: body[k] for k in keep if k in body}
    empty["sub"] = []
    for name in COLUMNS:
        empty[name] = []
    empty["merged_into"] = into
    return empty


def _groups(
    bodies: list[Any], seqs: list[int], older_than_ms: int, first_seq: int, group_ms: int
) -> Iterator[list[int]]:
    """Index lists of the runs to merge: eligible, old enough, one group_ms bucket each."""
    run: list[int] = []
    bucket = None
    for i, body in enumerate(bodies):
        ok = seqs[i] >= first_seq and _eligible(body) and body["t1"] <= older_than_ms
        key = body["t0"] // group_ms if ok else None
        if run and (not ok or key != bucket):
            if len(run) > 1:
                yield run
            run = []
        if ok:
            run.append(i)
            bucket = key
    if len(run) > 1:
        yield run


def compact_records(
    records: list[tuple[int, bytes]],
    older_than_ms: int,
    first_seq: int,
    policy: CompactionPolicy = CompactionPolicy(),
) -> tuple[list[tuple[int, bytes]], int] | None:
    """The records with their groups merged, and how many groups; None when nothing merges.

    Only records from `first_seq` on whose interval ended by `older_than_ms` merge.
    """
    seqs = [seq for seq, _ in records]
    bodies = [msgpack.unpackb(data, raw=False) for _, data in records]
    out = [data for _, data in records]
    groups = 0
    for run in _groups(bodies, seqs, older_than_ms, first_seq, policy.group_ms):
        group = [bodies[i] for i in run]
        into = group[-1]["seq"]
        for i in run[:-1]:
            out[i] = msgpack.packb(_placeholder(bodies[i], into))
        out[run[-1]] = msgpack.packb(_merge(group))
        groups += 1
    if not groups:
        return None
    return list(zip(seqs, out, strict=True)), groups


def compact_journal(
    journal: Journal,
    now_ms: int,
    sent_seq: int,
    finished: set[int],
    policy: CompactionPolicy = CompactionPolicy(),
) -> CompactionResult:
    """One pass over the sealed segments that hold records above `sent_seq` (module doc).

    `finished` holds the first seqs of segments a pass already left final (all of
    it old enough): they are not read again, and this pass adds to it.
    """
    segments = groups = saved = 0
    older_than_ms = now_ms - policy.raw_ms
    for first, last in journal.sealed_segments():
        if last > journal.checkpoint_seq:
            break  # this segment's state changes may still be replayed at a start
        if last <= sent_seq or first in finished:
            continue
        records = journal.read(first, last - first + 1, max_bytes=1 << 40)
        if msgpack.unpackb(records[-1][1], raw=False).get("t1", now_ms) <= older_than_ms:
            finished.add(first)  # sent_seq only grows: nothing in it can merge later
        compacted = compact_records(records, older_than_ms, sent_seq + 1, policy)
        if compacted is None:
            continue
        rewritten, count = compacted
        saved += journal.rewrite_segment(first, [(seq, data, b"") for seq, data in rewritten])
        segments += 1
        groups += count
    return CompactionResult(segments, groups, saved)
