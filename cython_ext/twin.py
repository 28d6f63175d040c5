"""The numpy twin of the Cython aggregator core: same API, identical results.

Chosen with DESANET_AGGREGATOR=python (see cython_ext.load_backend); the
tests run every aggregator property against both backends.
"""

from __future__ import annotations

import numpy as np
import numpy.typing as npt

from desanet.cython_ext import _state
from desanet.cython_ext.usage import UsageInterval
from desanet.errors import ValidationError

BITS_PER_MS = 8000.0
# Bytes columns of a counter row, whose deltas drive the up and down rates.
_BYTE_COLUMNS = [0, 2]


def sum_cpus(percpu: npt.NDArray[np.uint64], out: npt.NDArray[np.uint64]) -> npt.NDArray[np.uint64]:
    """Sum a (n_slots, n_cpus, 4) uint64 per-CPU read into `out` (n_slots, 4); returns out."""
    if percpu.ndim != 3 or percpu.shape[2] != 4 or out.shape != (percpu.shape[0], 4):
        raise ValidationError(
            f"per-CPU counters {tuple(percpu.shape)} do not fit the output {tuple(out.shape)}"
        )
    np.sum(percpu, axis=1, dtype=np.uint64, out=out)
    return out


class Aggregator:
    """Turns cumulative per-slot counters into deltas, running totals, rates and usage intervals."""

    def __init__(self, n_slots: int, rate_tau_ms: float = 5000.0) -> None:
        self.n_slots = _state.check_n_slots(n_slots)
        self.rate_tau_ms = _state.check_rate_tau(rate_tau_ms)
        n = self.n_slots
        self._adopt(
            np.zeros((n, 4), dtype=np.uint64),
            np.zeros((n, 4), dtype=np.uint64),
            np.zeros((n, 4), dtype=np.uint64),
            np.zeros(n, dtype=np.uint8),
            np.zeros(3, dtype=np.int64),
            np.zeros(0, dtype=np.uint8),
        )

    def _adopt(
        self,
        last_raw: npt.NDArray[np.uint64],
        total: npt.NDArray[np.uint64],
        billed: npt.NDArray[np.uint64],
        moved: npt.NDArray[np.uint8],
        clock: npt.NDArray[np.int64],
        source: npt.NDArray[np.uint8],
    ) -> None:
        self._last_raw = last_raw
        self._total = total
        # Totals at the last rollup: the usage pending since then is total - billed.
        self._billed = billed
        self._moved = moved
        self._clock = clock
        self._source = source
        self._rate = np.zeros((self.n_slots, 2), dtype=np.float64)

    def poll(self, cumulative: npt.ArrayLike, t_ms: int) -> int:
        """Account the cumulative counters read at `t_ms`; returns how many slots moved.

        A row where any counter went backwards restarted (map recreated,
        reboot): its new raw values are the delta, so no byte is lost and no
        delta is negative.
        """
        cum = _state.as_cumulative(cumulative, self.n_slots)
        now = int(t_ms)
        restarted = (cum < self._last_raw).any(axis=1)
        delta = cum - self._last_raw
        delta[restarted] = cum[restarted]
        self._last_raw[:] = cum
        moving = delta.any(axis=1)
        self._total += delta
        self._moved[moving] = 1
        clock = self._clock
        if clock[2] & _state.CLOCK_POLLED and now > clock[0]:
            scale = BITS_PER_MS / float(now - int(clock[0]))
            alpha = _state.smoothing(now - int(clock[0]), self.rate_tau_ms)
            inst = delta[:, _BYTE_COLUMNS].astype(np.float64) * scale
            self._rate += alpha * (inst - self._rate)
        if not clock[2] & _state.CLOCK_OPEN:
            clock[1] = now
        clock[0] = now
        clock[2] |= _state.CLOCK_POLLED | _state.CLOCK_OPEN
        return int(np.count_nonzero(moving))

    def reset_slot(self, slot: int) -> None:
        """Give `slot` to a new subscriber: totals, pending usage and rates restart from zero.

        The next delta is measured from the raw counters of the last poll, so
        poll (and roll up) right before reassigning a slot.
        """
        s = _state.check_slot(slot, self.n_slots)
        self._total[s] = 0
        self._billed[s] = 0
        self._moved[s] = 0
        self._rate[s] = 0.0

    def rebase(self) -> None:
        """Kernel counters restarted at zero (new map, reboot): count the next raw values whole."""
        self._last_raw.fill(0)

    def use_source(self, identity: bytes) -> bool:
        """Declare which counter source the next polls read; a new one rebases. True if it did."""
        new = np.frombuffer(bytes(identity), dtype=np.uint8).copy()
        if np.array_equal(new, self._source):
            return False
        self.rebase()
        self._source = new
        return True

    def rates_bps(self) -> npt.NDArray[np.float64]:
        """Smoothed rates in bit/s, (n_slots, 2) float64: columns up, down."""
        return self._rate.copy()

    def totals(self) -> npt.NDArray[np.uint64]:
        """Cumulative counters since each slot was provisioned, (n_slots, 4) uint64."""
        return self._total.copy()

    def rollup(self, t_ms: int) -> UsageInterval:
        """Close the billing interval at `t_ms`: the slots that moved since the last rollup."""
        now = int(t_ms)
        clock = self._clock
        t0 = int(clock[1]) if clock[2] & _state.CLOCK_OPEN else now
        idx = np.flatnonzero(self._moved)
        total = self._total[idx]
        pending = total - self._billed[idx]
        self._billed[idx] = total
        self._moved[idx] = 0
        clock[1] = now
        clock[2] |= _state.CLOCK_OPEN
        return UsageInterval(
            t0_ms=t0,
            t1_ms=now,
            slots=idx.astype(np.uint32),
            up=np.ascontiguousarray(pending[:, 0]),
            down=np.ascontiguousarray(pending[:, 2]),
            up_pkts=np.ascontiguousarray(pending[:, 1]),
            down_pkts=np.ascontiguousarray(pending[:, 3]),
            up_total=np.ascontiguousarray(total[:, 0]),
            down_total=np.ascontiguousarray(total[:, 2]),
        )

    def state(self) -> dict[str, np.ndarray]:
        """The arrays to persist with each journal record so totals survive restarts and reboots."""
        return _state.pack_state(
            self._last_raw, self._total, self._billed, self._moved, self._clock, self._source
        )

    def restore(self, state: dict[str, np.ndarray]) -> None:
        """Continue from a persisted `state()`; rates restart from zero."""
        self._adopt(*_state.unpack_state(state, self.n_slots))
