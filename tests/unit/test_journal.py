"""The journal and state persistence: crc, torn tails, retention, checkpoint + changes = state."""

from __future__ import annotations

import itertools
import os
import tempfile
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from desanet.errors import StreamError
from desanet.meter.journal import Journal, Retention
from desanet.meter.records import HEADER, encode_record, encode_segment_header, scan_records
from desanet.meter.state import Checkpoint, apply_state_change, encode_state_change

EPOCH = "e1"

pytestmark = pytest.mark.unit


def _fill(journal: Journal, first: int, count: int, size: int = 100) -> None:
    for seq in range(first, first + count):
        journal.append(seq, bytes([seq % 256]) * size, b"state%d" % seq)


def _segment(directory: Path) -> Path:
    return sorted(directory.glob("*.seg"))[-1]


def test_records_read_back_exactly_across_segments(tmp_path: Path) -> None:
    journal = Journal(tmp_path, Retention(segment_bytes=1000), EPOCH)
    _fill(journal, 1, 50)
    assert len(list(tmp_path.glob("*.seg"))) > 5
    assert (journal.first_seq, journal.last_seq) == (1, 50)
    got = journal.read(7, 30)
    assert [s for s, _ in got] == list(range(7, 37))
    assert all(msg == bytes([s % 256]) * 100 for s, msg in got)
    assert [s for s, _, _ in journal.records_after(45)] == [46, 47, 48, 49, 50]
    assert journal.read(51, 10) == []
    journal.close()
    reopened = Journal(tmp_path, Retention(segment_bytes=1000))
    assert reopened.last_seq == 50
    assert [(s, st) for s, _, st in reopened.records_after(48)] == [
        (49, b"state49"),
        (50, b"state50"),
    ]


def test_seq_must_follow(tmp_path: Path) -> None:
    journal = Journal(tmp_path, epoch=EPOCH)
    _fill(journal, 1, 3)
    with pytest.raises(StreamError, match="seq 5 after 3"):
        journal.append(5, b"x", b"")


@pytest.mark.parametrize("cut", [1, HEADER.size - 1, HEADER.size + 10, 50])
def test_torn_last_record_is_dropped_not_misread(tmp_path: Path, cut: int) -> None:
    journal = Journal(tmp_path, epoch=EPOCH)
    _fill(journal, 1, 10)
    journal.close()
    seg = _segment(tmp_path)
    size = seg.stat().st_size
    os.truncate(seg, size - cut)
    reopened = Journal(tmp_path)
    assert reopened.last_seq == 9
    assert [s for s, _ in reopened.read(1, 100)] == list(range(1, 10))
    assert seg.stat().st_size == size - cut, "loading changes nothing"
    with pytest.raises(StreamError, match="torn tail"):
        reopened.append(10, b"fresh", b"")
    reopened.repair()
    # The next record takes the torn record's seq and place: nothing is left in between.
    reopened.append(10, b"fresh", b"")
    assert reopened.read(10, 1) == [(10, b"fresh")]
    reopened.close()
    assert Journal(tmp_path).last_seq == 10


def test_flipped_bit_in_last_record_fails_its_crc(tmp_path: Path) -> None:
    journal = Journal(tmp_path, epoch=EPOCH)
    _fill(journal, 1, 5)
    journal.close()
    seg = _segment(tmp_path)
    data = bytearray(seg.read_bytes())
    data[-3] ^= 0x40
    seg.write_bytes(bytes(data))
    assert Journal(tmp_path).last_seq == 4


def test_garbage_after_last_record_is_dropped(tmp_path: Path) -> None:
    journal = Journal(tmp_path, epoch=EPOCH)
    _fill(journal, 1, 5)
    journal.close()
    with open(_segment(tmp_path), "ab") as f:
        f.write(b"\0" * 7)
    assert Journal(tmp_path).last_seq == 5


def test_damage_inside_an_older_segment_is_refused(tmp_path: Path) -> None:
    journal = Journal(tmp_path, Retention(segment_bytes=1000), EPOCH)
    _fill(journal, 1, 30)
    journal.close()
    oldest = sorted(tmp_path.glob("*.seg"))[0]
    data = bytearray(oldest.read_bytes())
    data[HEADER.size + 5] ^= 1
    oldest.write_bytes(bytes(data))
    with pytest.raises(StreamError, match="damaged"):
        Journal(tmp_path, Retention(segment_bytes=1000))


def test_retention_keeps_what_the_checkpoint_does_not_cover(tmp_path: Path) -> None:
    journal = Journal(tmp_path, Retention(max_bytes=3000, segment_bytes=1000), EPOCH)
    _fill(journal, 1, 60)
    assert journal.prune(checkpoint_seq=0) == []
    removed = journal.prune(checkpoint_seq=60)
    assert removed
    total = sum(p.stat().st_size for p in tmp_path.glob("*.seg"))
    assert total <= 3000 + 1000
    assert journal.last_seq == 60
    assert journal.first_seq > 1
    assert journal.read(1, 5)[0][0] == journal.first_seq


def test_retention_by_age(tmp_path: Path) -> None:
    journal = Journal(tmp_path, Retention(max_age_s=60, segment_bytes=1000), EPOCH)
    _fill(journal, 1, 30)
    oldest = sorted(tmp_path.glob("*.seg"))[0]
    os.utime(oldest, (1, 1))
    assert journal.prune(checkpoint_seq=30) == [oldest]


def test_state_changes_rebuild_the_state_exactly() -> None:
    rng = np.random.default_rng(5)
    state: dict[str, np.ndarray] = {
        "total": rng.integers(0, 2**63, size=(1000, 4), dtype=np.uint64),
        "clock": np.array([1, 2, 3], dtype=np.int64),
        "empty": np.zeros((0, 3), dtype=np.uint8),
    }
    rebuilt: dict[str, np.ndarray] = {}
    apply_state_change(rebuilt, encode_state_change(None, state))
    prev = {k: v.copy() for k, v in state.items()}
    for step in range(20):
        rows = rng.choice(1000, size=step * 3, replace=False)
        state["total"][rows, rng.integers(0, 4)] += np.uint64(7)
        state["clock"][0] = step
        change = encode_state_change(prev, state)
        assert len(change) < 1000 * 4 * 8 // 2
        apply_state_change(rebuilt, change)
        prev = {k: v.copy() for k, v in state.items()}
    state["new"] = np.ones(3, dtype=np.uint8)
    del state["clock"]
    apply_state_change(rebuilt, encode_state_change(prev, state))
    assert rebuilt.keys() == state.keys()
    for name, arr in state.items():
        assert np.array_equal(rebuilt[name], arr) and rebuilt[name].dtype == arr.dtype
    assert encode_state_change(state, state) == b""


def test_checkpoint_round_trip_and_gateway_check(tmp_path: Path) -> None:
    total = np.arange(12, dtype=np.uint64).reshape(3, 4)
    ckpt = Checkpoint(
        epoch=EPOCH,
        seq=42,
        t1_ms=1_700_000_000_000,
        state={"total": total},
        totals={"s1": [10, 20]},
    )
    path = tmp_path / "checkpoint-a.bin"
    ckpt.save(path, "gw1")
    back = Checkpoint.load(path, "gw1")
    assert back is not None
    assert (back.epoch, back.seq, back.t1_ms, back.totals) == (
        EPOCH,
        42,
        1_700_000_000_000,
        {"s1": [10, 20]},
    )
    assert back.state is not None and np.array_equal(back.state["total"], total)
    with pytest.raises(StreamError, match="belongs to gateway"):
        Checkpoint.load(path, "gw2")
    assert Checkpoint.load(tmp_path / "none", "gw1") is None


def test_reads_are_bounded_in_bytes(tmp_path: Path) -> None:
    journal = Journal(tmp_path, Retention(segment_bytes=10_000), EPOCH)
    _fill(journal, 1, 40, size=1000)
    got = journal.read(3, 100, max_bytes=3500)
    assert [s for s, _ in got] == [3, 4, 5]
    assert [s for s, _ in journal.read(3, 100, max_bytes=10)] == [3]
    assert [s for s, _ in journal.read(1, 100)] == list(range(1, 41))


@settings(max_examples=60, deadline=None)
@given(cut=st.integers(min_value=0, max_value=10_000), junk=st.binary(max_size=64))
def test_any_torn_tail_reads_back_as_a_prefix(cut: int, junk: bytes) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        directory = Path(tmp)
        journal = Journal(directory, epoch=EPOCH)
        written = [(seq, bytes([seq]) * (seq * 7 % 300), b"s" * seq) for seq in range(1, 31)]
        for seq, message, state in written:
            journal.append(seq, message, state)
        journal.close()
        seg = _segment(directory)
        data = seg.read_bytes()
        kept = max(0, len(data) - cut)
        seg.write_bytes(data[:kept] + junk)
        back = list(Journal(directory).records_after(0))
        # Exactly the records whose bytes are all still there, never a misread one.
        ends = itertools.accumulate(
            (len(encode_record(*rec)) for rec in written), initial=len(encode_segment_header(EPOCH))
        )
        next(ends)  # the header's end: no record yet
        assert back == written[: sum(1 for end in ends if end <= kept)]


def _offsets(seg: Path) -> list[int]:
    data = seg.read_bytes()
    return [o for o, _s, _p in scan_records(data, len(encode_segment_header(EPOCH)))]


@pytest.mark.parametrize("where", ["payload", "length", "magic"])
def test_damage_followed_by_a_valid_record_is_refused_and_nothing_is_cut(
    tmp_path: Path, where: str
) -> None:
    journal = Journal(tmp_path, epoch=EPOCH)
    _fill(journal, 1, 10)
    journal.close()
    seg = _segment(tmp_path)
    offsets = _offsets(seg)
    data = bytearray(seg.read_bytes())
    at = {"payload": offsets[4] + HEADER.size + 3, "length": offsets[4] + 6, "magic": offsets[4]}
    data[at[where]] ^= 0x01
    seg.write_bytes(bytes(data))
    with pytest.raises(StreamError) as refused:
        Journal(tmp_path)
    text = str(refused.value)
    assert str(seg) in text and f"damaged at byte {offsets[4]}" in text
    assert f"valid record (seq 6) follows at byte {offsets[5]}" in text
    assert seg.read_bytes() == bytes(data)


def test_a_torn_tail_is_damage_reaching_the_end_with_no_valid_record_after(
    tmp_path: Path,
) -> None:
    journal = Journal(tmp_path, epoch=EPOCH)
    _fill(journal, 1, 10)
    journal.close()
    seg = _segment(tmp_path)
    whole = seg.read_bytes()
    last = _offsets(seg)[-1]
    # Half of record 10, then junk that holds no valid record: a torn tail.
    seg.write_bytes(whole[: last + 40] + b"\0DNJ1garbage")
    torn = Journal(tmp_path)
    assert torn.torn_tail is not None
    assert (torn.torn_tail.path, torn.torn_tail.offset) == (seg, last)
    assert torn.last_seq == 9
    # The same damage followed by a whole valid record is not a tail: refused.
    seg.write_bytes(whole[: last + 40] + encode_record(10, b"x", b""))
    with pytest.raises(StreamError, match=r"valid record \(seq 10\) follows"):
        Journal(tmp_path)


def test_segments_name_their_epoch(tmp_path: Path) -> None:
    created = Journal.create(tmp_path / "j", "e7", Retention(segment_bytes=400))
    created.close()
    reopened = Journal(tmp_path / "j", Retention(segment_bytes=400))
    assert (reopened.epoch, reopened.first_seq, reopened.last_seq) == ("e7", 0, 0)
    _fill(reopened, 1, 12)
    reopened.close()
    assert len(list((tmp_path / "j").glob("*.seg"))) > 2
    with pytest.raises(StreamError, match="belongs to epoch 'e7', not 'e8'"):
        Journal(tmp_path / "j", epoch="e8")
    # A segment of another journal among these ones is refused.
    other = Journal(tmp_path / "k", epoch="e9")
    other.append(13, b"m", b"")
    other.close()
    os.replace(_segment(tmp_path / "k"), tmp_path / "j" / "00000000000000000013.seg")
    with pytest.raises(StreamError, match="of epoch 'e9'"):
        Journal(tmp_path / "j")
    # Segments written before epochs existed: readable, of no epoch, never appended to.
    legacy = tmp_path / "legacy"
    legacy.mkdir()
    (legacy / "00000000000000000001.seg").write_bytes(encode_record(1, b"old", b""))
    old = Journal(legacy)
    assert (old.epoch, [m for _s, m in old.read(1, 5)]) == (None, [b"old"])
    with pytest.raises(StreamError, match="no epoch"):
        old.append(2, b"new", b"")
