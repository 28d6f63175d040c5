"""Fault suite: byte flips and truncations at many offsets of every durable file the meter writes.

One base state (several journal segments, both checkpoints, the published
mark) is written by the real MeterService and collected by a billing
collector; then, for each file and each of many offsets (a seeded sample plus
every record boundary), one fault is applied to a copy and the service is
started on it. A third kind of fault appends what kill -9 leaves of a record being written
(never published). Whatever the fault, one of these holds:

- the service continues the epoch, every published seq still reads back
  byte for byte, and the next seq follows the last published one;
- it starts a new epoch;
- it refuses to start, naming the damaged file (then, as its message
  advises, the journal is moved aside and it starts a new epoch).

Never is an (epoch, seq) published again with other bytes, and after a few
more intervals the collector's billed bytes equal the counters exactly.
"""

from __future__ import annotations

import os
import random
import shutil
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import pytest

from desanet.errors import StreamError
from desanet.meter.collector import UsageStore
from desanet.meter.records import MAGIC, encode_record, scan_records
from tests.unit.test_stream_epochs import T0, Gateway, billed, collect_all, truth

pytestmark = pytest.mark.unit

CONFIG = {"segment_bytes": 2500, "checkpoint_every": 4, "snapshot_every": 5}
BASE_INTERVALS = 13
SAMPLES_PER_FILE = 10


@pytest.fixture(scope="module")
def base(
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[tuple[Path, dict[tuple[str, int], bytes], int]]:
    """A state_dir and billing database after kill -9, the published messages, the last t."""
    root = tmp_path_factory.mktemp("base")
    gw = Gateway(root / "state", **CONFIG)
    t = gw.run(T0, BASE_INTERVALS)
    store = UsageStore.sqlite(root / "billing.sqlite")
    collect_all(gw, store)
    store.close()
    published = {(gw.svc.epoch, seq): msg for seq, msg in gw.svc.journal.read(1, 10**6)}
    # Records after the newest checkpoint: only the published mark tells they were sent.
    assert gw.svc._checkpoints.latest_seq < gw.svc.last_seq
    gw.kill()
    yield root, published, t


def durable_files(state: Path) -> list[Path]:
    stream = state / "stream"
    return [
        *sorted((stream / "journal").glob("*.seg")),
        *sorted(stream.glob("checkpoint-*.bin")),
        stream / "published.mark",
    ]


def offsets(path: Path, rng: random.Random) -> list[int]:
    """A seeded sample of offsets, plus the first and last byte and every record boundary."""
    data = path.read_bytes()
    chosen = {0, len(data) - 1, *rng.sample(range(len(data)), min(SAMPLES_PER_FILE, len(data)))}
    start = data.find(MAGIC)
    if start >= 0:
        for offset, _seq, _payload in scan_records(data, start):
            chosen.update({offset, offset + 1, max(offset - 1, 0)})
    return sorted(o for o in chosen if 0 <= o < len(data))


def _apply(path: Path, kind: str, offset: int, rng: random.Random) -> None:
    data = bytearray(path.read_bytes())
    if kind == "flip":
        data[offset] ^= rng.randrange(1, 256)
        path.write_bytes(bytes(data))
    elif kind == "truncate":
        os.truncate(path, offset)
    else:
        # What kill -9 leaves of a record being written: its first `offset` bytes (never sent).
        record = encode_record(99, bytes(rng.randrange(256) for _ in range(200)), b"")
        with open(path, "ab") as f:
            f.write(record[: offset % (len(record) - 1) + 1])


def _check_case(
    root: Path,
    case: Path,
    published: dict[tuple[str, int], bytes],
    t: int,
    target: int,
    kind: str,
    offset: int,
) -> str:
    """Apply one fault to a copy of the base and check the outcome; returns which it was."""
    rng = random.Random(f"{target}-{kind}-{offset}")
    shutil.copytree(root / "state", case / "state")
    shutil.copy(root / "billing.sqlite", case / "billing.sqlite")
    path = durable_files(case / "state")[target]
    name = f"{path.name} {kind} at {offset}"
    _apply(path, kind, offset, rng)
    epoch = next(iter(published))[0]
    last = max(seq for _e, seq in published)
    outcome = "new epoch"
    try:
        gw = Gateway(case / "state", **CONFIG)
    except StreamError as err:
        assert str(path) in str(err), f"{name}: the refusal names the file: {err}"
        outcome = "refused"
        os.replace(case / "state" / "stream" / "journal", case / "journal.damaged")
        gw = Gateway(case / "state", **CONFIG)
        assert gw.svc.epoch != epoch, f"{name}: the journal moved aside: a new epoch"
    if gw.svc.epoch == epoch:
        outcome = "continued"
        # Nothing silently dropped: every published seq is still there, byte for byte.
        assert gw.svc.last_seq == last, f"{name}: continues after the last published seq"
        back = dict(gw.svc.journal.read(1, 10**6))
        changed = [s for e, s in published if back.get(s) != published[(e, s)]]
        assert not changed, f"{name}: published seqs {changed} no longer read back as published"
    else:
        assert gw.svc.last_seq == 0, f"{name}: a new epoch starts at seq 1"
    try:
        t = gw.run(t, 3)
        after = {(gw.svc.epoch, seq): msg for seq, msg in gw.svc.journal.read(1, 10**6)}
        reused = [k for k in after if k in published and after[k] != published[k]]
        assert not reused, f"{name}: {reused} published again with other bytes"
        store = UsageStore.sqlite(case / "billing.sqlite")
        collect_all(gw, store)
        assert billed(store) == truth(t), f"{name}: billed equals the counters"
        store.close()
    finally:
        gw.svc.close()
    return outcome


def test_every_fault_is_survived_refused_or_a_new_epoch(
    base: tuple[Path, dict[tuple[str, int], bytes], int], tmp_path: Path
) -> None:
    root, published, t = base
    rng = random.Random(11)
    files = durable_files(root / "state")
    assert sum(1 for p in files if p.suffix == ".seg") >= 3 and len(files) >= 6
    outcomes: Counter[tuple[str, str]] = Counter()
    n = 0
    for target, path in enumerate(files):
        kind_of_file = "journal" if path.suffix == ".seg" else path.stem.split("-")[0]
        cases = [(o, k) for o in offsets(path, rng) for k in ("flip", "truncate")]
        cases += [(rng.randrange(1, 200), "torn") for _ in range(3)]
        for offset, kind in cases:
            n += 1
            case = tmp_path / f"case{n}"
            outcome = _check_case(root, case, published, t, target, kind, offset)
            outcomes[(kind_of_file, outcome)] += 1
            shutil.rmtree(case)
    print("fault outcomes:", dict(sorted(outcomes.items())))
    assert n >= 150
    # Each kind of file saw each outcome the design gives it.
    assert outcomes[("journal", "refused")] and outcomes[("journal", "new epoch")]
    assert outcomes[("journal", "continued")] == 3, "a torn unsent record is cut, nothing else"
    assert outcomes[("checkpoint", "continued")]
    assert outcomes[("published", "new epoch")]
