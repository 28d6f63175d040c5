# cython: boundscheck=False, wraparound=False, cdivision=True, initializedcheck=False
"""The aggregator core in Cython: per-slot deltas, totals, smoothed rates and rollups.

One pass over the (n_slots, 4) cumulative counters per poll, with no Python
objects touched per slot. cython_ext/twin.py is the numpy twin with the same
API and identical results; tests/unit/test_aggregate*.py runs both.
"""

import numpy as np

from libc.stdint cimport int64_t, uint8_t, uint32_t, uint64_t

from desanet.cython_ext import _state
from desanet.cython_ext.usage import UsageInterval
from desanet.errors import ValidationError

# Bits in a byte delta become bit/s over an interval in ms.
cdef double BITS_PER_MS = 8000.0


def sum_cpus(percpu, out):
    """Sum a (n_slots, n_cpus, 4) uint64 per-CPU read into `out` (n_slots, 4); returns out."""
    cdef const uint64_t[:, :, ::1] src = percpu
    cdef uint64_t[:, ::1] dst = out
    cdef Py_ssize_t n = src.shape[0], ncpu = src.shape[1], s, cpu
    cdef uint64_t a, b, c, d
    if src.shape[2] != 4 or dst.shape[0] != n or dst.shape[1] != 4:
        raise ValidationError(
            f"per-CPU counters {tuple(percpu.shape)} do not fit the output {tuple(out.shape)}"
        )
    with nogil:
        for s in range(n):
            a = 0
            b = 0
            c = 0
            d = 0
            for cpu in range(ncpu):
                a += src[s, cpu, 0]
                b += src[s, cpu, 1]
                c += src[s, cpu, 2]
                d += src[s, cpu, 3]
            dst[s, 0] = a
            dst[s, 1] = b
            dst[s, 2] = c
            dst[s, 3] = d
    return out


cdef class Aggregator:
    """Turns cumulative per-slot counters into deltas, running totals, rates and usage intervals."""

    cdef readonly Py_ssize_t n_slots
    cdef readonly double rate_tau_ms
    cdef object _last_raw, _total, _billed, _moved, _rate, _clock, _source
    cdef uint64_t[:, ::1] last_raw
    cdef uint64_t[:, ::1] total
    cdef uint64_t[:, ::1] billed  # totals at the last rollup: pending usage = total - billed
    cdef uint8_t[::1] moved
    cdef double[:, ::1] rate
    cdef int64_t[::1] clock

    def __init__(self, n_slots, rate_tau_ms=5000.0):
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

    def _adopt(self, last_raw, total, billed, moved, clock, source):
        self._last_raw = last_raw
        self._total = total
        self._billed = billed
        self._moved = moved
        self._clock = clock
        self._source = source
        self._rate = np.zeros((self.n_slots, 2), dtype=np.float64)
        self.last_raw = last_raw
        self.total = total
        self.billed = billed
        self.moved = moved
        self.clock = clock
        self.rate = self._rate

    def poll(self, cumulative, t_ms):
        """Account the cumulative counters read at `t_ms`; returns how many slots moved.

        A row where any counter went backwards restarted (map recreated,
        reboot): its new raw values are the delta, so no byte is lost and no
        delta is negative.
        """
        cdef const uint64_t[:, ::1] cum = _state.as_cumulative(cumulative, self.n_slots)
        cdef int64_t now = t_ms
        cdef bint do_rate = (self.clock[2] & _state.CLOCK_POLLED) and now > self.clock[0]
        cdef double scale = BITS_PER_MS / <double>(now - self.clock[0]) if do_rate else 0.0
        cdef double alpha = _state.smoothing(now - self.clock[0], self.rate_tau_ms) if do_rate else 0.0
        cdef Py_ssize_t s, n = self.n_slots, count = 0
        cdef uint64_t c0, c1, c2, c3, d0, d1, d2, d3
        cdef bint restarted
        with nogil:
            for s in range(n):
                c0 = cum[s, 0]
                c1 = cum[s, 1]
                c2 = cum[s, 2]
                c3 = cum[s, 3]
                restarted = (
                    c0 < self.last_raw[s, 0] or c1 < self.last_raw[s, 1]
                    or c2 < self.last_raw[s, 2] or c3 < self.last_raw[s, 3]
                )
                if restarted:
                    d0 = c0
                    d1 = c1
                    d2 = c2
                    d3 = c3
                else:
                    d0 = c0 - self.last_raw[s, 0]
                    d1 = c1 - self.last_raw[s, 1]
                    d2 = c2 - self.last_raw[s, 2]
                    d3 = c3 - self.last_raw[s, 3]
                # An idle row is only read: most slots of a village are idle in most polls.
                if restarted or d0 | d1 | d2 | d3:
                    self.last_raw[s, 0] = c0
                    self.last_raw[s, 1] = c1
                    self.last_raw[s, 2] = c2
                    self.last_raw[s, 3] = c3
                if d0 | d1 | d2 | d3:
                    self.total[s, 0] += d0
                    self.total[s, 1] += d1
                    self.total[s, 2] += d2
                    self.total[s, 3] += d3
                    self.moved[s] = 1
                    count += 1
                # An idle slot at rate zero stays at zero: skipping it is exact, not approximate.
                if do_rate and (d0 or self.rate[s, 0] != 0.0):
                    self.rate[s, 0] += alpha * (<double>d0 * scale - self.rate[s, 0])
                if do_rate and (d2 or self.rate[s, 1] != 0.0):
                    self.rate[s, 1] += alpha * (<double>d2 * scale - self.rate[s, 1])
        if not self.clock[2] & _state.CLOCK_OPEN:
            self.clock[1] = now
        self.clock[0] = now
        self.clock[2] |= _state.CLOCK_POLLED | _state.CLOCK_OPEN
        return count

    def reset_slot(self, slot):
        """Give `slot` to a new subscriber: totals, pending usage and rates restart from zero.

        The next delta is measured from the raw counters of the last poll, so
        poll (and roll up) right before reassigning a slot.
        """
        cdef Py_ssize_t s = _state.check_slot(slot, self.n_slots)
        cdef int c
        for c in range(4):
            self.total[s, c] = 0
            self.billed[s, c] = 0
        self.moved[s] = 0
        self.rate[s, 0] = 0.0
        self.rate[s, 1] = 0.0

    def rebase(self):
        """Kernel counters restarted at zero (new map, reboot): count the next raw values whole."""
        self._last_raw.fill(0)

    def use_source(self, identity):
        """Declare which counter source the next polls read; a new one rebases. True if it did."""
        new = np.frombuffer(bytes(identity), dtype=np.uint8).copy()
        if np.array_equal(new, self._source):
            return False
        self.rebase()
        self._source = new
        return True

    def rates_bps(self):
        """Smoothed rates in bit/s, (n_slots, 2) float64: columns up, down."""
        return self._rate.copy()

    def totals(self):
        """Cumulative counters since each slot was provisioned, (n_slots, 4) uint64."""
        return self._total.copy()

    def rollup(self, t_ms):
        """Close the billing interval at `t_ms`: the slots that moved since the last rollup."""
        cdef Py_ssize_t s, i = 0, n = self.n_slots, k = 0
        cdef int64_t now = t_ms
        cdef int64_t t0 = self.clock[1] if self.clock[2] & _state.CLOCK_OPEN else now
        for s in range(n):
            k += self.moved[s]
        # One block for the six columns: one allocation that malloc keeps reusing.
        slots = np.empty(k, dtype=np.uint32)
        columns = np.empty((6, k), dtype=np.uint64)
        up, down, up_pkts, down_pkts, up_total, down_total = columns
        cdef uint32_t[::1] o_slot = slots
        cdef uint64_t[::1] o_up = up, o_down = down, o_up_pkts = up_pkts, o_down_pkts = down_pkts
        cdef uint64_t[::1] o_up_total = up_total, o_down_total = down_total
        with nogil:
            for s in range(n):
                if self.moved[s]:
                    o_slot[i] = <uint32_t>s
                    o_up[i] = self.total[s, 0] - self.billed[s, 0]
                    o_up_pkts[i] = self.total[s, 1] - self.billed[s, 1]
                    o_down[i] = self.total[s, 2] - self.billed[s, 2]
                    o_down_pkts[i] = self.total[s, 3] - self.billed[s, 3]
                    o_up_total[i] = self.total[s, 0]
                    o_down_total[i] = self.total[s, 2]
                    self.billed[s, 0] = self.total[s, 0]
                    self.billed[s, 1] = self.total[s, 1]
                    self.billed[s, 2] = self.total[s, 2]
                    self.billed[s, 3] = self.total[s, 3]
                    self.moved[s] = 0
                    i += 1
        self.clock[1] = now
        self.clock[2] |= _state.CLOCK_OPEN
        return UsageInterval(
            t0_ms=int(t0),
            t1_ms=int(now),
            slots=slots,
            up=up,
            down=down,
            up_pkts=up_pkts,
            down_pkts=down_pkts,
            up_total=up_total,
            down_total=down_total,
        )

    def state(self):
        """The arrays to persist with each journal record so totals survive restarts and reboots."""
        return _state.pack_state(
            self._last_raw, self._total, self._billed, self._moved, self._clock, self._source
        )

    def restore(self, state):
        """Continue from a persisted `state()`; rates restart from zero."""
        self._adopt(*_state.unpack_state(state, self.n_slots))
