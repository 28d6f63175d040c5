"""RTT histograms read back: bucket bounds, percentiles, and windows over wrapping counters."""

from __future__ import annotations

import numpy as np
import numpy.typing as npt
import pytest

from desanet.ebpf import abi
from desanet.meter.latency import (
    LINK_EDGES_MS,
    SLOT_EDGES_MS,
    RttWindow,
    percentile_ms,
    slot_percentiles,
)

pytestmark = pytest.mark.unit


def test_slot_buckets_are_half_octaves_and_agree_with_their_bounds() -> None:
    lows = [abi.rtt_slot_bucket_lower_us(b) for b in range(abi.RTT_SLOT_BUCKETS)]
    assert lows[:6] == [0, 768, 1024, 1536, 2048, 3072]
    assert lows[-1] == 1_572_864
    for b in range(1, abi.RTT_SLOT_BUCKETS):
        assert abi.rtt_slot_bucket(lows[b]) == b
        assert abi.rtt_slot_bucket(lows[b] - 1) == b - 1
    assert abi.rtt_slot_bucket(60_000_000) == abi.RTT_SLOT_BUCKETS - 1


def test_percentiles_of_the_link_histogram() -> None:
    counts = np.zeros(abi.RTT_LINK_BUCKETS, np.uint64)
    counts[40] = 90  # 90 samples in [40, 41) ms
    counts[300] = 10
    assert percentile_ms(counts, LINK_EDGES_MS, 0.5) == pytest.approx(40.56, abs=0.01)
    assert 300 <= (percentile_ms(counts, LINK_EDGES_MS, 0.95) or 0) <= 301
    assert percentile_ms(np.zeros_like(counts), LINK_EDGES_MS, 0.5) is None


def test_slot_percentiles_match_the_one_histogram_function() -> None:
    rng = np.random.default_rng(5)
    rows = rng.integers(0, 50, size=(6, 2, abi.RTT_SLOT_BUCKETS)).astype(np.int64)
    rows[3, 1] = 0
    got = slot_percentiles(rows, 0.95)
    for r in range(6):
        for d in range(2):
            want = percentile_ms(rows[r, d], SLOT_EDGES_MS, 0.95)
            assert (np.isnan(got[r, d]) and want is None) or got[r, d] == pytest.approx(want)


class Counts:
    def __init__(self) -> None:
        self.slots = np.zeros((4, 2, abi.RTT_SLOT_BUCKETS), np.uint32)
        self.link = np.zeros((2, abi.RTT_LINK_BUCKETS), np.uint64)

    def read_slots(self, rows: npt.NDArray[np.intp] | None = None) -> npt.NDArray[np.uint32]:
        return self.slots.copy() if rows is None else self.slots[rows]

    def read_link(self) -> npt.NDArray[np.uint64]:
        return self.link.copy()

    def close(self) -> None:
        pass


def test_window_counts_only_its_samples_across_a_wrap() -> None:
    counts = Counts()
    bucket = abi.rtt_slot_bucket(45_000)
    counts.slots[2, abi.RTT_WAN, bucket] = 2**32 - 3  # about to wrap
    counts.link[abi.RTT_WAN, 45] = 2**64 - 2
    window = RttWindow(counts, window_ms=20_000)
    window.update(0)
    with np.errstate(over="ignore"):
        counts.slots[2, abi.RTT_WAN, bucket] += np.uint32(3)  # wraps to 0 ...
        counts.slots[2, abi.RTT_WAN, bucket] += np.uint32(4)  # ... and on to 4
        counts.link[abi.RTT_WAN, 45] += np.uint64(7)
    interval = window.update(1000)
    assert int(interval[abi.RTT_WAN].sum()) == 7
    link = window.link()
    assert link["wan"].samples == 7 and link["lan"].samples == 0
    slots = window.slots([1, 2, 3])
    assert set(slots) == {2} and slots[2]["wan"].samples == 7
    # Samples older than the window leave it.
    window.update(25_000)
    window.update(26_000)
    assert window.link()["wan"].samples == 0


def test_only_active_slots_are_read_again_until_the_base_moves() -> None:
    counts = Counts()
    bucket = abi.rtt_slot_bucket(45_000)
    window = RttWindow(counts, window_ms=20_000)
    window.update(0)
    counts.slots[1, abi.RTT_WAN, bucket] = 3
    counts.slots[2, abi.RTT_WAN, bucket] = 5
    first = window.slots([1, 2, 3], np.array([], np.intp))  # nothing cached yet: all read
    assert {s: f["wan"].samples for s, f in first.items()} == {1: 3, 2: 5}
    counts.slots[1, abi.RTT_WAN, bucket] = 10
    counts.slots[2, abi.RTT_WAN, bucket] = 9
    window.update(1000)
    # Only slot 1 moved traffic: it is read again, slot 2 keeps its last figures.
    second = window.slots([1, 2, 3], np.array([1], np.intp))
    assert {s: f["wan"].samples for s, f in second.items()} == {1: 10, 2: 5}
    _, cumulative = window.cumulative()[1:]  # what Prometheus gets follows the reads
    assert cumulative[:, abi.RTT_WAN, bucket].tolist() == [10, 5, 0]
    # Half a window on, the base moves and every row is read again.
    window.update(10_000)
    window.update(21_000)
    third = window.slots([1, 2, 3], np.array([], np.intp))
    assert third == {}  # no samples since the new base
    counts.slots[3, abi.RTT_WAN, bucket] = 1
    assert {s: f["wan"].samples for s, f in window.slots([1, 2, 3]).items()} == {3: 1}
