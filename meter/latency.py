"""Passive RTT histograms of the datapath: reading them, and percentiles over a recent window.

The datapath (the RTT section of ebpf/datapath.bpf.c) adds every RTT sample
to two cumulative histograms, both mmapable arrays: per slot and direction in
half-octave buckets, and link-wide per direction in 1 ms buckets.
`RttReader` maps them read-only into this process (BPF_OBJ_GET and mmap: no
syscall per read, no BCC). `RttWindow` keeps snapshots of the last seconds
and answers what an operator asks: p50/p95 per subscriber and for the link
over that window, and the link's samples of the last interval (what the
adaptive link rate is fed). Counts are cumulative and wrap: only differences
of snapshots mean anything, taken in the counters' own unsigned arithmetic.
"""

from __future__ import annotations

import mmap
import os
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Protocol

import numpy as np
import numpy.typing as npt

from desanet.ebpf import abi, bpf_syscall
from desanet.errors import DatapathError

BPF_MAP_TYPE_ARRAY = 2
_SLOT_BYTES = 4 * 2 * abi.RTT_SLOT_BUCKETS
# Bucket edges in ms: per slot the half octaves of the header (the last bucket open-ended,
# its upper edge taken as twice its lower for interpolation), link-wide one per ms.
SLOT_EDGES_MS = np.array(
    [abi.rtt_slot_bucket_lower_us(b) / 1000 for b in range(abi.RTT_SLOT_BUCKETS)]
    + [2 * abi.rtt_slot_bucket_lower_us(abi.RTT_SLOT_BUCKETS - 1) / 1000]
)
LINK_EDGES_MS = np.arange(abi.RTT_LINK_BUCKETS + 1, dtype=np.float64)


def percentile_ms(
    counts: npt.NDArray[np.integer], edges_ms: npt.NDArray[np.float64], q: float
) -> float | None:
    """The q-quantile (0..1) of a histogram, linear within its bucket; None without samples."""
    total = int(counts.sum())
    if total == 0:
        return None
    rank = q * total
    cumulative = np.cumsum(counts)
    bucket = int(np.searchsorted(cumulative, rank, side="left"))
    bucket = min(bucket, len(counts) - 1)
    below = int(cumulative[bucket - 1]) if bucket else 0
    inside = int(counts[bucket])
    fraction = (rank - below) / inside if inside else 0.0
    low, high = float(edges_ms[bucket]), float(edges_ms[bucket + 1])
    return low + (high - low) * min(max(fraction, 0.0), 1.0)


@dataclass(frozen=True)
class RttSummary:
    """RTT of one direction over a window: samples, p50 and p95 in ms (None: no samples)."""

    samples: int
    p50_ms: float | None
    p95_ms: float | None

    def as_dict(self) -> dict[str, float | int | None]:
        """As status and the usage stream show it."""
        return {
            "samples": self.samples,
            "p50_ms": _rounded(self.p50_ms),
            "p95_ms": _rounded(self.p95_ms),
        }


def _rounded(value: float | None) -> float | None:
    return None if value is None else round(value, 1)


def summarize(counts: npt.NDArray[np.integer], edges_ms: npt.NDArray[np.float64]) -> RttSummary:
    """Samples, p50 and p95 of one histogram."""
    return RttSummary(
        int(counts.sum()),
        percentile_ms(counts, edges_ms, 0.5),
        percentile_ms(counts, edges_ms, 0.95),
    )


class RttReader:
    """The datapath's cumulative RTT histograms, mapped read-only from their pins."""

    def __init__(self, pin_dir: Path) -> None:
        """Map the `rtt_slots` and `rtt_link` arrays pinned in `pin_dir`."""
        self.pin_dir = pin_dir
        self._maps: list[mmap.mmap] = []
        try:
            slots = self._map(abi.MAP_RTT_SLOTS, _SLOT_BYTES, None)
            self.n_slots = len(slots) // _SLOT_BYTES
            self._slots = np.frombuffer(
                slots, dtype=np.uint32, count=self.n_slots * 2 * abi.RTT_SLOT_BUCKETS
            ).reshape(self.n_slots, 2, abi.RTT_SLOT_BUCKETS)
            link = self._map(abi.MAP_RTT_LINK, 8, 2 * abi.RTT_LINK_BUCKETS)
            self._link = np.frombuffer(
                link, dtype=np.uint64, count=2 * abi.RTT_LINK_BUCKETS
            ).reshape(2, abi.RTT_LINK_BUCKETS)
        except BaseException:
            self.close()
            raise

    @classmethod
    def for_datapath(cls, gateway_id: str, lan: str, bpffs: Path = abi.BPFFS) -> RttReader:
        """The histograms of the datapath attached to `lan` on gateway `gateway_id`."""
        return cls(abi.pin_dir(gateway_id, lan, bpffs))

    def _map(self, name: str, value_size: int, entries: int | None) -> memoryview:
        path = self.pin_dir / name
        if not path.exists():
            raise DatapathError(
                f"no RTT histogram pinned at {path}: is a datapath of this version attached?"
            )
        fd = bpf_syscall.obj_get(str(path))
        try:
            shape = bpf_syscall.map_shape(fd)
            if (
                shape.type != BPF_MAP_TYPE_ARRAY
                or shape.value_size != value_size
                or (entries is not None and shape.max_entries != entries)
                or not shape.flags & bpf_syscall.BPF_F_MMAPABLE
            ):
                raise DatapathError(
                    f"{path} is not the mmapable RTT histogram this version reads: "
                    "is a datapath of this version attached?"
                )
            length = -(-shape.max_entries * value_size // mmap.PAGESIZE) * mmap.PAGESIZE
            mapping = mmap.mmap(fd, length, mmap.MAP_SHARED, mmap.PROT_READ)
        finally:
            os.close(fd)
        self._maps.append(mapping)
        return memoryview(mapping)[: shape.max_entries * value_size]

    def read_slots(self, rows: npt.NDArray[np.intp] | None = None) -> npt.NDArray[np.uint32]:
        """Cumulative per-slot counts, (slots, 2 directions, RTT_SLOT_BUCKETS), a copy: of
        every slot, or of the slots in `rows` only (a village's few hundred of 65,536)."""
        return self._slots.copy() if rows is None else self._slots[rows]

    def read_link(self) -> npt.NDArray[np.uint64]:
        """Cumulative link-wide counts, (2 directions, RTT_LINK_BUCKETS ms), a copy."""
        return self._link.copy()

    def close(self) -> None:
        """Unmap the histograms."""
        self._slots = np.zeros((0, 2, abi.RTT_SLOT_BUCKETS), np.uint32)
        self._link = np.zeros((2, abi.RTT_LINK_BUCKETS), np.uint64)
        for mapping in self._maps:
            mapping.close()
        self._maps.clear()

    def __enter__(self) -> RttReader:
        return self

    def __exit__(
        self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()


def slot_percentiles(delta: npt.NDArray[np.integer], q: float) -> npt.NDArray[np.float64]:
    """The q-quantile in ms of every row of per-slot histograms (..., RTT_SLOT_BUCKETS);
    NaN where a row has no samples. Vectorized: a village's slots at once."""
    counts = delta.astype(np.float64)
    cumulative = np.cumsum(counts, axis=-1)
    total = cumulative[..., -1]
    rank = q * total
    bucket = np.minimum((cumulative < rank[..., None]).sum(axis=-1), counts.shape[-1] - 1)
    below = np.where(
        bucket > 0,
        np.take_along_axis(cumulative, np.maximum(bucket - 1, 0)[..., None], -1)[..., 0],
        0.0,
    )
    inside = np.take_along_axis(counts, bucket[..., None], -1)[..., 0]
    with np.errstate(invalid="ignore", divide="ignore"):
        fraction = np.clip(np.where(inside > 0, (rank - below) / inside, 0.0), 0.0, 1.0)
    low, high = SLOT_EDGES_MS[bucket], SLOT_EDGES_MS[bucket + 1]
    return np.where(total > 0, low + (high - low) * fraction, np.nan)


class RttSource(Protocol):
    """What the window reads: RttReader, or a test's fake."""

    def read_slots(self, rows: npt.NDArray[np.intp] | None = None) -> npt.NDArray[np.uint32]: ...

    def read_link(self) -> npt.NDArray[np.uint64]: ...

    def close(self) -> None: ...


@dataclass
class _SlotCache:
    """The per-slot figures of the last `RttWindow.slots()`: for which rows and base."""

    base_t: int
    rows: npt.NDArray[np.intp]
    summaries: dict[int, dict[str, RttSummary]]
    counts: npt.NDArray[np.uint32]  # the rows' cumulative counts as last read


class RttWindow:
    """Percentiles over the last `window_ms`, from snapshots of the cumulative histograms.

    The link's histograms are small: a snapshot per interval. A village's
    per-slot histograms are 12 MB: two snapshots, taken every half window, so
    the per-subscriber figures cover between half a window and a whole one.
    """

    def __init__(self, source: RttSource, window_ms: int = 60_000) -> None:
        self.source = source
        self.window_ms = window_ms
        self._link: deque[tuple[int, npt.NDArray[np.uint64]]] = deque()
        self._slot_bases: deque[tuple[int, npt.NDArray[np.uint32]]] = deque(maxlen=2)
        # The rows `slots()` read last and their counts: what Prometheus is given.
        self._latest: tuple[npt.NDArray[np.intp], npt.NDArray[np.uint32]] | None = None
        self._cache: _SlotCache | None = None  # what `slots()` computed, kept between calls
        self.last_interval: npt.NDArray[np.uint64] = np.zeros((2, abi.RTT_LINK_BUCKETS), np.uint64)

    def update(self, t_ms: int) -> npt.NDArray[np.uint64]:
        """Take this interval's snapshot; returns the link's samples since the previous one,
        (2 directions, RTT_LINK_BUCKETS ms)."""
        link = self.source.read_link()
        previous = self._link[-1][1] if self._link else link
        self.last_interval = link - previous  # unsigned: a wrap still gives the difference
        self._link.append((t_ms, link))
        while len(self._link) > 1 and t_ms - self._link[0][0] > self.window_ms:
            self._link.popleft()
        if not self._slot_bases or t_ms - self._slot_bases[-1][0] >= self.window_ms // 2:
            self._slot_bases.append((t_ms, self.source.read_slots()))
        return self.last_interval

    def link(self) -> dict[str, RttSummary]:
        """The link's RTT per direction ("wan", "lan") over the window."""
        if not self._link:
            return {}
        delta = self._link[-1][1] - self._link[0][1]
        return {
            name: summarize(delta[i], LINK_EDGES_MS) for i, name in enumerate(abi.RTT_DIRECTIONS)
        }

    def slots(
        self, rows: Sequence[int] | npt.NDArray[np.intp], active: npt.NDArray[np.intp] | None = None
    ) -> dict[int, dict[str, RttSummary]]:
        """Slot -> its RTT per direction over the window, for those of `rows` (ascending)
        with samples.

        `active`, when given, names the slots that can have new samples since the last
        call (their traffic moved): only they are read again, the others keep the figures
        of the last call. Everything is read again when the rows or the window's base
        change (every half window), so a quiet village costs a bounded sweep, not a read
        of every subscriber each interval."""
        if not self._slot_bases or len(rows) == 0:
            return {}
        index = np.asarray(rows, dtype=np.intp)
        base_t, base = self._slot_bases[0]
        cached = self._cache
        if (
            active is None
            or cached is None
            or cached.base_t != base_t
            or not np.array_equal(cached.rows, index)
        ):
            current = self.source.read_slots(index)
            self._latest = (index, current)
            self._cache = _SlotCache(base_t, index, self._summaries(index, current, base), current)
            return dict(self._cache.summaries)
        read = np.intersect1d(index, active)
        if len(read):
            current = self.source.read_slots(read)
            fresh = self._summaries(read, current, base)
            for slot in read.tolist():
                if slot in fresh:
                    cached.summaries[slot] = fresh[slot]
                else:
                    cached.summaries.pop(slot, None)
            counts = cached.counts.copy()  # a scrape may hold the previous one: not changed
            counts[np.searchsorted(index, read)] = current
            cached.counts = counts
            self._latest = (index, counts)
        return dict(cached.summaries)

    @staticmethod
    def _summaries(
        index: npt.NDArray[np.intp], current: npt.NDArray[np.uint32], base: npt.NDArray[np.uint32]
    ) -> dict[int, dict[str, RttSummary]]:
        # Unsigned differences first (counts wrap), then signed for the sums.
        delta = (current - base[index]).astype(np.int64)
        totals = delta.sum(axis=-1)
        moved = np.flatnonzero(totals.sum(axis=-1))
        if not len(moved):
            return {}
        p50, p95 = slot_percentiles(delta[moved], 0.5), slot_percentiles(delta[moved], 0.95)
        result: dict[int, dict[str, RttSummary]] = {}
        for k, row in enumerate(moved.tolist()):
            result[int(index[row])] = {
                name: RttSummary(
                    int(totals[row, i]),
                    None if np.isnan(p50[k, i]) else float(p50[k, i]),
                    None if np.isnan(p95[k, i]) else float(p95[k, i]),
                )
                for i, name in enumerate(abi.RTT_DIRECTIONS)
            }
        return result

    def cumulative(
        self,
    ) -> tuple[npt.NDArray[np.uint64], npt.NDArray[np.intp], npt.NDArray[np.uint32]] | None:
        """The latest link snapshot, and the rows and counts `slots()` read last: what
        Prometheus's cumulative histograms are made of."""
        if not self._link or self._latest is None:
            return None
        return self._link[-1][1], *self._latest
