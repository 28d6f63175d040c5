"""The adaptive link rate against a simulated satellite link: a modem queue in front of a
bottleneck whose capacity the test sets, greedy TCP downloads through desanet's shaper,
and WAN RTT samples of base delay + jitter + the modem's queueing delay."""

from __future__ import annotations

import itertools
import random
from dataclasses import dataclass, field

import pytest

from desanet.errors import ValidationError
from desanet.shaper.autorate import Autorate, AutorateConfig, RateChange

pytestmark = pytest.mark.unit

MBIT = 1_000_000


@dataclass
class SatLink:
    """Per 1 s interval: the shaped rate enters the modem queue, the capacity leaves it."""

    capacity_bps: float
    base_ms: float
    jitter_ms: float
    buffer_ms: float = 1500.0  # the modem's dumb buffer, in time at the capacity
    queue_bits: float = 0.0
    rng: random.Random = field(default_factory=lambda: random.Random(7))

    def interval(self, shaped_bps: float, offered_bps: float) -> tuple[float, float, int]:
        """(WAN RTT p50 of the interval in ms, delivered bit/s, samples)."""
        arriving = min(shaped_bps, offered_bps)
        self.queue_bits = max(0.0, self.queue_bits + arriving - self.capacity_bps)
        self.queue_bits = min(self.queue_bits, self.capacity_bps * self.buffer_ms / 1000)
        delivered = min(arriving, self.capacity_bps) if not self.queue_bits else self.capacity_bps
        queue_ms = 1000 * self.queue_bits / self.capacity_bps
        samples = sorted(
            self.base_ms + self.rng.uniform(0, self.jitter_ms) + queue_ms for _ in range(25)
        )
        return samples[len(samples) // 2], delivered, len(samples)


def config(down: float, low: float, high: float) -> AutorateConfig:
    return AutorateConfig(
        down_bps=int(down * MBIT),
        up_bps=5 * MBIT,
        down_min_bps=int(low * MBIT),
        down_max_bps=int(high * MBIT),
        up_min_bps=1 * MBIT,
        up_max_bps=5 * MBIT,
    )


def run(
    ctl: Autorate, link: SatLink, seconds: int, t0: int = 0, offered: float = 100 * MBIT
) -> tuple[list[RateChange], list[tuple[float, float, float]]]:
    """Drive `seconds` intervals; returns the changes and (rate, delivered, queue ms) per second."""
    changes: list[RateChange] = []
    trace = []
    for s in range(seconds):
        t_ms = (t0 + s + 1) * 1000
        rtt, delivered, n = link.interval(ctl.rates_bps["down"], offered)
        changes += ctl.step(t_ms, rtt, n, {"down": delivered, "up": 0.02 * delivered})
        trace.append((ctl.rates_bps["down"], delivered, 1000 * link.queue_bits / link.capacity_bps))
    return changes, trace


@pytest.mark.parametrize(("base_ms", "jitter_ms"), [(40.0, 8.0), (600.0, 50.0)])
def test_a_steady_link_never_changes_the_rate(base_ms: float, jitter_ms: float) -> None:
    ctl = Autorate(config(18, 4, 18))
    link = SatLink(20 * MBIT, base_ms, jitter_ms)
    changes, _ = run(ctl, link, 300)
    # Idle minutes in between: still nothing to change.
    idle, _ = run(ctl, link, 60, t0=300, offered=0.0)
    loaded, _ = run(ctl, link, 300, t0=360)
    assert changes == idle == loaded == []
    assert ctl.rates_bps == {"down": 18 * MBIT, "up": 5 * MBIT}


def test_geo_jitter_does_not_trigger_but_a_leo_queue_does() -> None:
    # A GEO link whose RTT wanders by tens of ms around 600 ms, shaped under capacity.
    geo = Autorate(config(18, 4, 18))
    changes, _ = run(geo, SatLink(20 * MBIT, 600.0, 60.0), 300)
    assert changes == []
    assert geo.threshold_ms() >= 60
    # A LEO link whose capacity fell under the shaped rate: tens of ms of queue.
    leo = Autorate(config(18, 4, 18))
    link = SatLink(20 * MBIT, 40.0, 5.0)
    run(leo, link, 60)
    link.capacity_bps = 16 * MBIT
    changes, _ = run(leo, link, 20, t0=60)
    assert leo.threshold_ms() < 20
    assert changes and changes[0].new_bps < changes[0].old_bps


@pytest.mark.parametrize(("base_ms", "jitter_ms"), [(40.0, 8.0), (600.0, 50.0)])
def test_capacity_step_20_8_20_is_followed(base_ms: float, jitter_ms: float) -> None:
    ctl = Autorate(config(19, 2, 19))
    link = SatLink(20 * MBIT, base_ms, jitter_ms)
    before, _ = run(ctl, link, 60)
    assert before == []
    link.capacity_bps = 8 * MBIT  # rain fade
    _, low = run(ctl, link, 120, t0=60)
    # Within 20 s the shaped rate is at or under the capacity and stays near it.
    settled = low[20:]
    assert max(rate for rate, _, _ in settled) <= 8 * 1.1 * MBIT
    assert min(rate for rate, _, _ in settled) >= 8 * 0.6 * MBIT
    # The queue moved back from the modem into desanet: little of it left there ...
    mean_queue_ms = sum(q for _, _, q in settled) / len(settled)
    assert mean_queue_ms <= 50
    # ... and the link is still used.
    utilisation = sum(d for _, d, _ in settled) / len(settled) / link.capacity_bps
    assert utilisation >= 0.8
    link.capacity_bps = 20 * MBIT  # the rain stopped
    _, high = run(ctl, link, 120, t0=180)
    assert high[-1][0] >= 0.95 * 19 * MBIT


def test_rates_never_leave_min_and_max() -> None:
    rng = random.Random(3)
    ctl = Autorate(config(15, 5, 18))
    link = SatLink(20 * MBIT, 40.0, 5.0)
    t = 0
    for _ in range(40):
        link.capacity_bps = rng.choice([1, 3, 8, 20, 40]) * MBIT
        offered = rng.choice([0.0, 100.0 * MBIT])
        _, trace = run(ctl, link, 15, t0=t, offered=offered)
        t += 15
        assert all(5 * MBIT <= rate <= 18 * MBIT for rate, _, _ in trace)
    assert 1 * MBIT <= ctl.rates_bps["up"] <= 5 * MBIT


def test_changes_are_rate_limited_and_idle_drifts_back() -> None:
    ctl = Autorate(config(19, 2, 19))
    link = SatLink(20 * MBIT, 40.0, 5.0)
    run(ctl, link, 30)
    link.capacity_bps = 4 * MBIT
    changes, _ = run(ctl, link, 60, t0=30)
    times = [c.t_ms for c in changes if c.direction == "down"]
    assert len(times) >= 2
    assert all(b - a >= ctl.config.hold_ms for a, b in itertools.pairwise(times))
    link.capacity_bps = 20 * MBIT
    drift, _ = run(ctl, link, 120, t0=90, offered=0.0)
    assert drift and all(c.new_bps > c.old_bps for c in drift)
    assert ctl.rates_bps["down"] == 19 * MBIT


def test_bounds_must_hold_the_configured_rate() -> None:
    with pytest.raises(ValidationError, match="down_min <= down <= down_max"):
        config(20, 5, 18)
