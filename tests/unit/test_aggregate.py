"""The aggregator, run against both backends: what billing and status read from it."""

from __future__ import annotations

from types import ModuleType

import numpy as np
import pytest

from desanet import cython_ext
from desanet.cython_ext import twin
from desanet.errors import DesanetError, ValidationError

pytestmark = pytest.mark.unit


@pytest.fixture(params=["cython", "python"])
def backend(request: pytest.FixtureRequest) -> ModuleType:
    return cython_ext.load_backend(request.param)


def rows(n: int, **values: list[int]) -> np.ndarray:
    """A (n, 4) cumulative array with the given rows set: rows(3, s1=[...])."""
    arr = np.zeros((n, 4), dtype=np.uint64)
    for key, row in values.items():
        arr[int(key[1:])] = row
    return arr


def test_sum_of_interval_deltas_equals_final_counters(backend: ModuleType) -> None:
    agg = backend.Aggregator(4)
    rng = np.random.default_rng(7)
    cum = np.zeros((4, 4), dtype=np.uint64)
    billed_up = np.zeros(4, dtype=np.uint64)
    billed_down = np.zeros(4, dtype=np.uint64)
    for step in range(1, 50):
        cum += rng.integers(0, 10_000, size=(4, 4), dtype=np.uint64)
        agg.poll(cum, step * 1000)
        if step % 5 == 0:
            usage = agg.rollup(step * 1000)
            np.add.at(billed_up, usage.slots, usage.up)
            np.add.at(billed_down, usage.slots, usage.down)
    usage = agg.rollup(50_000)
    np.add.at(billed_up, usage.slots, usage.up)
    np.add.at(billed_down, usage.slots, usage.down)
    assert billed_up.tolist() == cum[:, 0].tolist()
    assert billed_down.tolist() == cum[:, 2].tolist()
    assert agg.totals().tolist() == cum.tolist()


def test_rollup_lists_only_slots_that_moved(backend: ModuleType) -> None:
    agg = backend.Aggregator(5)
    agg.poll(rows(5, s2=[100, 1, 300, 2]), 1_000)
    usage = agg.rollup(2_000)
    assert (usage.t0_ms, usage.t1_ms) == (1_000, 2_000)
    assert usage.slots.tolist() == [2]
    assert (usage.up[0], usage.up_pkts[0], usage.down[0], usage.down_pkts[0]) == (100, 1, 300, 2)
    agg.poll(rows(5, s2=[100, 1, 300, 2]), 3_000)
    idle = agg.rollup(3_000)
    assert len(idle) == 0 and (idle.t0_ms, idle.t1_ms) == (2_000, 3_000)


def test_counters_that_go_backwards_restarted_and_totals_carry_forward(
    backend: ModuleType,
) -> None:
    agg = backend.Aggregator(2)
    agg.poll(rows(2, s1=[5_000, 5, 9_000, 9]), 1_000)
    agg.poll(rows(2, s1=[700, 1, 200, 1]), 2_000)
    usage = agg.rollup(2_000)
    assert usage.up_total.tolist() == [5_700]
    assert usage.down_total.tolist() == [9_200]
    # Only the packet column restarted, yet the whole row is new: no byte is lost.
    agg.poll(rows(2, s1=[800, 0, 300, 2]), 3_000)
    usage = agg.rollup(3_000)
    assert (usage.up[0], usage.down[0]) == (800, 300)
    assert usage.up_total.tolist() == [6_500]


def test_reused_slot_never_inherits_the_previous_subscribers_bytes(backend: ModuleType) -> None:
    agg = backend.Aggregator(3)
    agg.poll(rows(3, s1=[1_000, 10, 2_000, 20]), 1_000)
    agg.reset_slot(1)
    assert agg.totals()[1].tolist() == [0, 0, 0, 0]
    assert len(agg.rollup(1_500)) == 0
    agg.poll(rows(3, s1=[1_040, 11, 2_000, 20]), 2_000)
    usage = agg.rollup(2_000)
    assert usage.slots.tolist() == [1]
    assert (usage.up_total[0], usage.down_total[0]) == (40, 0)


def test_totals_survive_a_daemon_restart_from_persisted_state(backend: ModuleType) -> None:
    first = backend.Aggregator(3)
    first.use_source(b"boot-a/map-7")
    first.poll(rows(3, s2=[100, 1, 1_000, 1]), 1_000)
    first.rollup(1_000)
    saved = first.state()
    # Killed here; the kernel kept counting while the daemon was down.
    second = backend.Aggregator(3)
    second.restore(saved)
    assert second.use_source(b"boot-a/map-7") is False
    second.poll(rows(3, s2=[150, 2, 1_400, 2]), 5_000)
    usage = second.rollup(5_000)
    assert (usage.t0_ms, usage.up[0], usage.down[0]) == (1_000, 50, 400)
    assert (usage.up_total[0], usage.down_total[0]) == (150, 1_400)


def test_totals_survive_a_reboot_even_when_new_counters_overtake_the_old(
    backend: ModuleType,
) -> None:
    first = backend.Aggregator(3)
    first.use_source(b"boot-a/map-7")
    first.poll(rows(3, s1=[100, 1, 100, 1]), 1_000)
    first.rollup(1_000)
    after_reboot = backend.Aggregator(3)
    after_reboot.restore(first.state())
    assert after_reboot.use_source(b"boot-b/map-3") is True
    after_reboot.poll(rows(3, s1=[5_000, 9, 7_000, 9]), 90_000)
    usage = after_reboot.rollup(90_000)
    assert (usage.up[0], usage.down[0]) == (5_000, 7_000)
    assert (usage.up_total[0], usage.down_total[0]) == (5_100, 7_100)


def test_smoothed_rate_converges_to_the_offered_rate(backend: ModuleType) -> None:
    agg = backend.Aggregator(2, rate_tau_ms=2_000)
    cum = np.zeros((2, 4), dtype=np.uint64)
    for step in range(30):
        cum[1] += np.array([125_000, 100, 250_000, 200], dtype=np.uint64)  # 1 and 2 Mbit/s
        agg.poll(cum, step * 1_000)
    up, down = agg.rates_bps()[1]
    assert up == pytest.approx(1_000_000, rel=1e-3)
    assert down == pytest.approx(2_000_000, rel=1e-3)
    assert agg.rates_bps()[0].tolist() == [0.0, 0.0]


def test_sum_cpus_adds_every_cpu(backend: ModuleType) -> None:
    percpu = np.arange(3 * 2 * 4, dtype=np.uint64).reshape(3, 2, 4)
    out = np.empty((3, 4), dtype=np.uint64)
    assert backend.sum_cpus(percpu, out) is out
    assert out.tolist() == percpu.sum(axis=1).tolist()


def test_bad_inputs_are_refused_with_a_reason(backend: ModuleType) -> None:
    agg = backend.Aggregator(3)
    with pytest.raises(ValidationError, match=r"shape \(3, 4\)"):
        agg.poll(np.zeros((2, 4), dtype=np.uint64), 0)
    with pytest.raises(ValidationError, match="non-negative"):
        agg.poll(np.full((3, 4), -1, dtype=np.int64), 0)
    with pytest.raises(ValidationError, match="slot 3"):
        agg.reset_slot(3)
    with pytest.raises(ValidationError):
        backend.Aggregator(0)


def test_state_of_a_larger_gateway_is_refused(backend: ModuleType) -> None:
    big = backend.Aggregator(10)
    big.poll(rows(10, s9=[1, 1, 1, 1]), 0)
    with pytest.raises(DesanetError, match="slot 9"):
        backend.Aggregator(5).restore(big.state())


def test_state_holds_only_busy_slots() -> None:
    agg = cython_ext.load_backend("cython").Aggregator(65_536)
    agg.poll(rows(65_536, s3=[1, 1, 0, 0], s60000=[0, 0, 9, 1]), 0)
    state = agg.state()
    assert state["slots"].tolist() == [3, 60_000]
    assert state["total"].shape == (2, 4)


def test_backend_choice_is_explicit(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(cython_ext.ENV_VAR, "python")
    assert cython_ext.load_backend() is twin
    monkeypatch.setenv(cython_ext.ENV_VAR, "fortran")
    with pytest.raises(DesanetError, match="not an aggregator backend"):
        cython_ext.load_backend()
    monkeypatch.setitem(cython_ext.BACKENDS, "cython", "cython_ext._not_built")
    with pytest.raises(DesanetError, match="make setup"):
        cython_ext.load_backend("cython")
