"""Latency under load and utilisation at satellite delay, with the real datapath and shaper."""

from __future__ import annotations

import pytest

from desanet.gateway.lab import Village
from tests.vm import bloat
from tests.vm.satlink import GEO, LEO, Gateway

pytestmark = pytest.mark.vm


@pytest.fixture(scope="module")
def leo_runs(sat_gateway: tuple[Village, Gateway]) -> dict[str, bloat.LatencyRun]:
    v, gw = sat_gateway
    runs = bloat.latency_under_load(v, gw, LEO)
    for r in runs:
        print(
            f"LEO {r.leaf}: idle {r.idle_ms:.1f} ms, under load {r.loaded_ms:.1f} ms, "
            f"downloader's own {r.busy_ms:.1f} ms, utilisation {r.utilisation:.2f}"
        )
    return {r.leaf: r for r in runs}


@pytest.fixture(scope="module")
def geo_runs(sat_gateway: tuple[Village, Gateway]) -> dict[str, bloat.ThroughputRun]:
    v, gw = sat_gateway
    runs = bloat.utilisation_at(v, gw, GEO)
    for r in runs:
        print(
            f"GEO {r.setting} (target {r.target_us} us, interval {r.interval_us} us): "
            f"utilisation {r.utilisation:.3f}, Jain {r.jain:.3f}, "
            f"rates {[round(x / 1e6, 2) for x in r.rates_bps]} Mbit/s"
        )
    return {r.setting: r for r in runs}


def test_every_leaf_kind_is_the_one_asked_for(leo_runs: dict[str, bloat.LatencyRun]) -> None:
    assert {leaf: r.leaf_in_use for leaf, r in leo_runs.items()} == {
        "fq_codel": "fq_codel",
        "cake": "cake",
        "pfifo": "pfifo",
    }


def test_fq_codel_keeps_the_idle_rtt_under_load(leo_runs: dict[str, bloat.LatencyRun]) -> None:
    run = leo_runs["fq_codel"]
    assert run.samples >= 10
    assert run.inflation_ms <= 30.0


def test_pfifo_leaves_bloat_where_fq_codel_does_not(leo_runs: dict[str, bloat.LatencyRun]) -> None:
    # A downloading subscriber's own pings share its class with its downloads:
    # behind a pfifo they wait for the whole queue, fq_codel gives them a flow of their own.
    assert leo_runs["pfifo"].busy_inflation_ms >= 100.0
    assert leo_runs["fq_codel"].busy_inflation_ms <= 30.0


def test_fair_shares_at_geo_delay(geo_runs: dict[str, bloat.ThroughputRun]) -> None:
    assert geo_runs["derived"].jain >= 0.95


def test_rtt_derived_aqm_uses_the_geo_link_better_than_the_defaults(
    geo_runs: dict[str, bloat.ThroughputRun],
) -> None:
    # The absolute figure (target: 85 % of the link) is the benchmark's headline
    # `utilisation_geo_derived`; under emulation it varies from run to run
    # (0.80-0.93 across runs here), while derived > default held in every run.
    assert geo_runs["derived"].utilisation > geo_runs["default"].utilisation
