"""The adaptive link rate on the stock kernel: LEO and GEO modems whose capacity drops under load.

Per link, one fixed-rate run (what sqm and LibreQoS do: it only has to show the
modem's queue, so it is short) and one adaptive run of the same experiment
(tests.vm.autorate), the capacity 12 -> 4.8 Mbit/s under a configured 10 (the
issue's 20 -> 8 scaled to what TCG carries). LEO, with 5 ms of jitter, also
steps back to 12, where the controller finds the capacity again within
seconds; GEO waits 100 round trips (a minute) before it looks past the rate
that queued, so its way back runs in `benchmarks.autorate`. About 200 s under TCG,
the village and the datapath's compile included.
"""

from __future__ import annotations

import math

import pytest

from desanet.gateway.lab import Village
from tests.vm import autorate
from tests.vm.satlink import Gateway

pytestmark = pytest.mark.vm

# (link, adaptive) -> the phases' lengths, seconds. The fixed runs only show the modem's
# queue: on LEO after the seconds its flows take to fill it as far as their losses let them
# (the passive RTT climbs for about 6 s after the drop); GEO's slow start takes a few round
# trips of 600 ms before its steady phase.
PHASES = {
    ("LEO", False): autorate.Phases(steady_s=3.0, low_s=12.0, settle_s=7.0),
    ("LEO", True): autorate.Phases(6.0, 12.0, 5.0, back_s=24.0, back_settle_s=17.0),
    ("GEO", False): autorate.Phases(steady_s=3.0, low_s=8.0, settle_s=2.0),
    ("GEO", True): autorate.Phases(steady_s=6.0, low_s=24.0, settle_s=12.0, warmup_s=8.0),
}
LINKS = {"LEO": autorate.LEO_JITTER, "GEO": autorate.GEO}
GOAL_MS = {"LEO": 50.0, "GEO": 100.0}


@pytest.fixture(scope="module")
def runs(sat_gateway: tuple[Village, Gateway]) -> dict[tuple[str, bool], autorate.AdaptRun]:
    v, gw = sat_gateway
    done = {}
    for (name, adapt), phases in PHASES.items():
        r = autorate.capacity_drop(v, gw, LINKS[name], adapt, phases)
        print(f"{name} adapt={adapt}: {r}")
        print("\n".join(r.trace))  # shown when a test fails: the controller's every step
        done[name, adapt] = r
    return done


@pytest.mark.parametrize("name", ["LEO", "GEO"])
def test_passive_rtt_on_the_steady_link_is_the_path(
    runs: dict[tuple[str, bool], autorate.AdaptRun], name: str
) -> None:
    # The gateway's own pings cross the WAN path and whatever queues in the modem; the
    # datapath's WAN RTT of the downloads, taken from their TCP timestamps, the same.
    adaptive = runs[name, True]
    assert abs(adaptive.steady_wan_p50_ms - adaptive.steady_gateway_ping_ms) <= 5.0
    assert adaptive.steady_wan_p50_ms >= LINKS[name].rtt_ms - 1.0


def test_passive_rtt_behind_a_fixed_rate_is_the_path_plus_the_modem_queue(
    runs: dict[tuple[str, bool], autorate.AdaptRun],
) -> None:
    # LEO behind the fixed rate: the configured delay plus hundreds of ms of modem queue
    # (read from its tbf), as the pings see it. Once the flows have filled the modem, its
    # queue swings fast; a sample a round trip per flow and a ping every 0.2 s see the
    # swings in nearly the same shares (the benchmark's 16 s window: 0.0 ms from the delay
    # plus the queue, 1.4 ms from the pings), a few seconds' window in less so: 10 % of the
    # queue allowed beside the 5 ms.
    # GEO's swings are slower (its flows' losses and recoveries take round trips of up to
    # a second): a window this short catches part of one, seen 26 and 41 ms apart at 381
    # and 359 ms of queue, so GEO's queued RTT is measured in benchmarks.autorate only
    # (25 s after 20 s: 3.4 ms from the delay plus the queue, 2.3 ms from the pings).
    fixed = runs["LEO", False]
    assert fixed.low_modem_queue_ms >= 200.0
    gap_ms = abs(fixed.low_wan_p50_ms - fixed.low_gateway_ping_ms)
    assert gap_ms <= 5.0 + 0.1 * fixed.low_modem_queue_ms


@pytest.mark.parametrize("name", ["LEO", "GEO"])
def test_no_rate_change_on_a_steady_link(
    runs: dict[tuple[str, bool], autorate.AdaptRun], name: str
) -> None:
    assert runs[name, True].steady_changes == 0
    assert runs[name, True].steady_utilisation >= 0.8


@pytest.mark.parametrize("name", ["LEO", "GEO"])
def test_adaptive_rate_keeps_the_queue_out_of_the_modem(
    runs: dict[tuple[str, bool], autorate.AdaptRun], name: str
) -> None:
    fixed, adaptive = runs[name, False], runs[name, True]
    assert fixed.inflation_ms >= 200.0  # the modem's buffer fills behind a fixed rate
    assert adaptive.inflation_ms <= GOAL_MS[name]
    assert adaptive.low_rate_bps < 0.8 * fixed.low_rate_bps
    assert adaptive.low_utilisation >= 0.8


def test_leo_finds_the_capacity_again(runs: dict[tuple[str, bool], autorate.AdaptRun]) -> None:
    adaptive = runs["LEO", True]
    assert not math.isnan(adaptive.back_utilisation)
    assert adaptive.back_utilisation >= 0.8
