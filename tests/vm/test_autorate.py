"""The adaptive link rate on the stock kernel: a LEO modem whose capacity drops under load.

One fixed-rate run (what sqm and LibreQoS do) and one adaptive run of the same
experiment (tests.vm.autorate), about 25 s each; GEO runs in
`benchmarks.autorate`, which takes longer.
"""

from __future__ import annotations

import pytest

from desanet.gateway.lab import Village
from tests.vm import autorate
from tests.vm.satlink import Gateway

pytestmark = pytest.mark.vm


@pytest.fixture(scope="module")
def leo(sat_gateway: tuple[Village, Gateway]) -> dict[bool, autorate.AdaptRun]:
    v, gw = sat_gateway
    runs = {adapt: autorate.capacity_drop(v, gw, autorate.LEO, adapt) for adapt in (False, True)}
    for r in runs.values():
        print(
            f"LEO adapt={r.adapt}: base {r.base_ms:.1f} ms, steady ping {r.steady_ping_ms:.1f} ms,"
            f" gateway's ping {r.steady_gateway_ping_ms:.1f} ms,"
            f" passive wan p50 {r.steady_wan_p50_ms:.1f} ms, steady changes {r.steady_changes},"
            f" low p95 {r.low_p95_ms:.1f} ms (inflation {r.inflation_ms:.1f}),"
            f" utilisation {r.low_utilisation:.2f}, rate {r.low_rate_bps / 1e6:.2f} Mbit/s"
        )
    return runs


def test_passive_rtt_matches_the_path(leo: dict[bool, autorate.AdaptRun]) -> None:
    # The gateway's own pings cross the WAN path and whatever queues in the modem; the
    # datapath's WAN RTT of the downloads, taken from their TCP timestamps, the same.
    for run in leo.values():
        assert abs(run.steady_wan_p50_ms - run.steady_gateway_ping_ms) <= 5.0
        assert run.steady_wan_p50_ms >= autorate.LEO.rtt_ms - 1.0


def test_no_rate_change_on_a_steady_link(leo: dict[bool, autorate.AdaptRun]) -> None:
    assert leo[True].steady_changes == 0


def test_adaptive_rate_keeps_the_queue_out_of_the_modem(
    leo: dict[bool, autorate.AdaptRun],
) -> None:
    fixed, adaptive = leo[False], leo[True]
    assert fixed.inflation_ms >= 150.0  # the modem's buffer fills behind a fixed rate
    assert adaptive.inflation_ms <= 50.0
    assert adaptive.low_rate_bps < 0.8 * fixed.low_rate_bps
    assert adaptive.low_utilisation >= 0.8
