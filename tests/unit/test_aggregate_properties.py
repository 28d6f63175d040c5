"""Property tests: the Cython core and the numpy twin agree with each other and with a model.

Long random sequences of polls (with counter restarts, idle slots and values
near 2^63), slot reuse, rollups, restarts from persisted state and reboots run
against both backends side by side; every output must be identical, and the
usage must match a plain-Python model of what billing expects.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from desanet import cython_ext

pytestmark = pytest.mark.unit

MOD = 1 << 64
TOP = MOD - 1
HIGH = 1 << 63

fast, twin = cython_ext.load_backend("cython"), cython_ext.load_backend("python")

counter = st.one_of(
    st.integers(0, 10_000),
    st.integers(HIGH - 10_000, HIGH + 10_000),
    st.integers(TOP - 10_000, TOP),
)
increment = st.one_of(st.just(0), st.integers(1, 5_000), st.integers(HIGH - 10, HIGH + 10))
# What one slot's raw counters do between two polls.
slot_change = st.one_of(
    st.just(("idle",)),
    st.tuples(st.just("add"), st.lists(increment, min_size=4, max_size=4)),
    st.tuples(st.just("set"), st.lists(counter, min_size=4, max_size=4)),
    st.just(("set", [0, 0, 0, 0])),  # counters zeroed under the same map identity
)


@st.composite
def operations(draw: st.DrawFn) -> tuple[int, list[tuple]]:
    n_slots = draw(st.integers(1, 6))
    slot = st.integers(0, n_slots - 1)
    op = st.one_of(
        st.tuples(
            st.just("poll"),
            st.integers(-50, 3_000),
            st.lists(slot_change, min_size=n_slots, max_size=n_slots),
        ),
        st.tuples(st.just("reset_slot"), slot),
        st.tuples(st.just("rollup"), st.integers(0, 3_000)),
        st.tuples(st.just("restart_daemon")),
        st.tuples(st.just("reboot")),
    )
    return n_slots, draw(st.lists(op, min_size=1, max_size=60))


@dataclass
class Model:
    """What billing expects, in Python integers modulo 2^64."""

    n: int
    last: list[list[int]] = field(default_factory=list)
    total: list[list[int]] = field(default_factory=list)
    pending: list[list[int]] = field(default_factory=list)
    moved: list[bool] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.last = [[0] * 4 for _ in range(self.n)]
        self.total = [[0] * 4 for _ in range(self.n)]
        self.pending = [[0] * 4 for _ in range(self.n)]
        self.moved = [False] * self.n

    def poll(self, cum: list[list[int]]) -> int:
        count = 0
        for s in range(self.n):
            restarted = any(c < p for c, p in zip(cum[s], self.last[s], strict=True))
            delta = (
                cum[s] if restarted else [c - p for c, p in zip(cum[s], self.last[s], strict=True)]
            )
            self.last[s] = list(cum[s])
            if any(delta):
                self.total[s] = [(t + d) % MOD for t, d in zip(self.total[s], delta, strict=True)]
                self.pending[s] = [
                    (t + d) % MOD for t, d in zip(self.pending[s], delta, strict=True)
                ]
                self.moved[s] = True
                count += 1
        return count

    def reset_slot(self, s: int) -> None:
        self.total[s] = [0] * 4
        self.pending[s] = [0] * 4
        self.moved[s] = False

    def rollup(self) -> list[tuple[int, ...]]:
        out = []
        for s in range(self.n):
            if self.moved[s]:
                p, t = self.pending[s], self.total[s]
                out.append((s, p[0], p[2], p[1], p[3], t[0], t[2]))
                self.pending[s] = [0] * 4
                self.moved[s] = False
        return out


def columns(usage: object) -> list[tuple[int, ...]]:
    names = ("slots", "up", "down", "up_pkts", "down_pkts", "up_total", "down_total")
    cols = [getattr(usage, name).tolist() for name in names]
    return list(zip(*cols, strict=True))


def assert_same_state(a: dict[str, np.ndarray], b: dict[str, np.ndarray]) -> None:
    assert a.keys() == b.keys()
    for key in a:
        assert a[key].dtype == b[key].dtype, key
        assert a[key].tolist() == b[key].tolist(), key


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(operations())
def test_both_backends_match_each_other_and_the_model(case: tuple[int, list[tuple]]) -> None:
    n, ops = case
    aggs = [fast.Aggregator(n, rate_tau_ms=1_500), twin.Aggregator(n, rate_tau_ms=1_500)]
    model = Model(n)
    raw = [[0] * 4 for _ in range(n)]
    t_ms = 1_700_000_000_000
    boot = 0
    for agg in aggs:
        agg.use_source(b"boot-0")
    for op in ops:
        kind = op[0]
        if kind == "poll":
            t_ms += op[1]
            for s, change in enumerate(op[2]):
                if change[0] == "add":
                    raw[s] = [min(r + inc, TOP) for r, inc in zip(raw[s], change[1], strict=True)]
                elif change[0] == "set":
                    raw[s] = list(change[1])
            cum = np.array(raw, dtype=np.uint64)
            moved = [agg.poll(cum, t_ms) for agg in aggs]
            assert moved[0] == moved[1] == model.poll(raw)
            rates = [agg.rates_bps() for agg in aggs]
            assert rates[0].tobytes() == rates[1].tobytes()
            assert (rates[0] >= 0).all()
        elif kind == "reset_slot":
            for agg in aggs:
                agg.reset_slot(op[1])
            model.reset_slot(op[1])
        elif kind == "rollup":
            t_ms += op[1]
            got = [agg.rollup(t_ms) for agg in aggs]
            assert (got[0].t0_ms, got[0].t1_ms) == (got[1].t0_ms, got[1].t1_ms)
            assert columns(got[0]) == columns(got[1]) == model.rollup()
            assert got[0].slots.dtype == np.uint32 and got[0].up.dtype == np.uint64
        elif kind == "restart_daemon":
            # Each backend continues from the other's persisted state: the format is shared.
            states = [agg.state() for agg in aggs]
            assert_same_state(*states)
            aggs = [fast.Aggregator(n, rate_tau_ms=1_500), twin.Aggregator(n, rate_tau_ms=1_500)]
            aggs[0].restore(states[1])
            aggs[1].restore(states[0])
            assert not any(agg.use_source(f"boot-{boot}".encode()) for agg in aggs)
        elif kind == "reboot":
            boot += 1
            raw = [[0] * 4 for _ in range(n)]
            model.last = [[0] * 4 for _ in range(n)]
            assert all(agg.use_source(f"boot-{boot}".encode()) for agg in aggs)
        totals = [agg.totals() for agg in aggs]
        assert totals[0].tolist() == totals[1].tolist() == model.total
    assert_same_state(aggs[0].state(), aggs[1].state())


@settings(max_examples=100, deadline=None)
@given(
    st.integers(1, 40),
    st.integers(1, 8),
    st.lists(st.integers(0, TOP), min_size=4, max_size=4),
)
def test_sum_cpus_matches_between_backends(n: int, ncpu: int, seed_row: list[int]) -> None:
    rng = np.random.default_rng(seed_row[0] % 1_000)
    percpu = rng.integers(0, TOP, size=(n, ncpu, 4), dtype=np.uint64, endpoint=True)
    percpu[0, 0] = seed_row
    out = [np.empty((n, 4), dtype=np.uint64) for _ in range(2)]
    fast.sum_cpus(percpu, out[0])
    twin.sum_cpus(percpu, out[1])
    expected = [[sum(int(v) for v in percpu[s, :, c]) % MOD for c in range(4)] for s in range(n)]
    assert out[0].tolist() == out[1].tolist() == expected
