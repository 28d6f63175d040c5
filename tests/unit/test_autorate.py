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
    # GEO: the senders follow a new shaped rate one interval late (their RTT is most of
    # one), and the RTT samples of an interval echo the queue of the one before.
    lagged: bool = False
    queue_bits: float = 0.0
    rng: random.Random = field(default_factory=lambda: random.Random(7))
    _previous: tuple[float | None, float] = (None, 0.0)  # (shaped bit/s, queue ms)

    def interval(self, shaped_bps: float, offered_bps: float) -> tuple[float, float, int]:
        """(WAN RTT p50 of the interval in ms, delivered bit/s, samples)."""
        seen_queue_ms = 0.0
        if self.lagged:
            previous, seen_queue_ms = self._previous
            self._previous = (shaped_bps, 1000 * self.queue_bits / self.capacity_bps)
            shaped_bps = shaped_bps if previous is None else previous
        arriving = min(shaped_bps, offered_bps)
        self.queue_bits = max(0.0, self.queue_bits + arriving - self.capacity_bps)
        self.queue_bits = min(self.queue_bits, self.capacity_bps * self.buffer_ms / 1000)
        delivered = min(arriving, self.capacity_bps) if not self.queue_bits else self.capacity_bps
        queue_ms = 1000 * self.queue_bits / self.capacity_bps
        if self.lagged:
            queue_ms = seen_queue_ms
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
    down = [c for c in changes if c.direction == "down"]
    assert len(down) >= 2
    # A hold between changes; half of one when a cut answers the probe up before it.
    for a, b in itertools.pairwise(down):
        answer = a.new_bps > a.old_bps and b.new_bps < b.old_bps
        assert b.t_ms - a.t_ms >= ctl.config.hold_ms // (2 if answer else 1)
    link.capacity_bps = 20 * MBIT
    drift, _ = run(ctl, link, 120, t0=90, offered=0.0)
    assert drift and all(c.new_bps > c.old_bps for c in drift)
    assert ctl.rates_bps["down"] == 19 * MBIT


def test_bounds_must_hold_the_configured_rate() -> None:
    with pytest.raises(ValidationError, match="down_min <= down <= down_max"):
        config(20, 5, 18)


def _phase(trace: list[tuple[float, float, float]], capacity_bps: float) -> tuple[float, float]:
    """(utilisation, p95 modem queue ms) of a phase's trace."""
    queues = sorted(q for _, _, q in trace)
    utilisation = sum(d for _, d, _ in trace) / len(trace) / capacity_bps
    return utilisation, queues[int(0.95 * (len(queues) - 1))]


def test_geo_step_20_8_20_keeps_the_queue_short_and_finds_the_capacity_again() -> None:
    # 600 ms: the senders follow a change an interval late, its RTT shows one more later.
    ctl = Autorate(config(19, 2, 19))
    link = SatLink(20 * MBIT, 600.0, 40.0, buffer_ms=400.0, lagged=True)
    steady, _ = run(ctl, link, 60)
    assert steady == []
    link.capacity_bps = 8 * MBIT
    _, low = run(ctl, link, 120, t0=60)
    utilisation, queue_p95 = _phase(low[20:], link.capacity_bps)
    assert utilisation >= 0.8
    assert queue_p95 <= 100
    link.capacity_bps = 20 * MBIT
    _, back = run(ctl, link, 120, t0=180)
    assert back[-1][0] == 19 * MBIT
    assert _phase(back[-30:], 19 * MBIT)[0] >= 0.95


def test_a_queue_still_draining_after_a_cut_is_not_cut_again() -> None:
    # The RTT samples trail the modem's queue by an interval and the senders by one more:
    # the full buffer is still seen for two intervals after the cut that answered it.
    ctl = Autorate(config(10, 2, 10))
    link = SatLink(12 * MBIT, 600.0, 20.0, buffer_ms=400.0, lagged=True)
    run(ctl, link, 30)
    link.capacity_bps = 5 * MBIT
    changes, trace = run(ctl, link, 15, t0=30)
    cuts = [c for c in changes if c.new_bps < c.old_bps]
    assert len(cuts) == 1
    assert cuts[0].new_bps >= 0.85 * link.capacity_bps
    assert trace[-1][2] == 0.0  # and the queue is gone


def test_after_a_cut_probing_goes_back_under_the_edge_and_waits_there() -> None:
    ctl = Autorate(config(10, 2, 10))
    link = SatLink(12 * MBIT, 600.0, 20.0, buffer_ms=400.0, lagged=True)
    run(ctl, link, 30)
    link.capacity_bps = 5 * MBIT
    changes, trace = run(ctl, link, 60, t0=30)
    cut, *rest = changes
    assert cut.new_bps < 0.95 * link.capacity_bps
    # Straight back to edge_share of what got through, in one probe ...
    assert len(rest) == 1 and rest[0].new_bps > rest[0].old_bps
    assert rest[0].new_bps == pytest.approx(ctl.config.edge_share * link.capacity_bps, rel=0.01)
    # ... and no creep past it for 100 round trips (60 s here) since the cut.
    assert (rest[0].t_ms - cut.t_ms) < 10_000
    assert all(rate == rest[0].new_bps for rate, _, _ in trace[(rest[0].t_ms // 1000) - 30 :])
    later, _ = run(ctl, link, 10, t0=90)
    assert later and later[0].t_ms - cut.t_ms >= 100 * 600


def test_a_busy_link_that_is_not_loaded_keeps_its_rate() -> None:
    # Traffic that does not use what it has (a few slow flows) says nothing about the
    # capacity: the rate neither probes nor drifts back up to the configured one.
    ctl = Autorate(config(19, 2, 19))
    link = SatLink(20 * MBIT, 40.0, 5.0, buffer_ms=400.0)
    run(ctl, link, 30)
    link.capacity_bps = 8 * MBIT
    run(ctl, link, 30, t0=30)
    rate = ctl.rates_bps["down"]
    changes, _ = run(ctl, link, 60, t0=60, offered=0.4 * rate)
    assert changes == []
    idle, _ = run(ctl, link, 60, t0=120, offered=0.0)
    assert idle and ctl.rates_bps["down"] == 19 * MBIT


def test_a_slow_starts_burst_above_the_rate_is_no_capacity_drop() -> None:
    # Senders in slow start push more than the shaped rate through the modem for an
    # interval: its queue is theirs and the rate drains it within a settle time.
    ctl = Autorate(config(10, 2, 10))
    rate = ctl.rates_bps["down"]
    for s in range(30):
        ctl.step((s + 1) * 1000, 600.0, 10, {"down": 0.9 * rate, "up": 0.0})
    burst = ctl.step(31_000, 840.0, 10, {"down": 1.19 * rate, "up": 0.0})
    after = ctl.step(32_000, 604.0, 10, {"down": 0.95 * rate, "up": 0.0})
    assert burst == after == []
    # The same queue with the modem sending barely more than the rate drains for seconds:
    # a spill near the edge, cut.
    spill = ctl.step(33_000, 840.0, 10, {"down": 1.02 * rate, "up": 0.0})
    assert spill and spill[0].new_bps < rate


def test_leo_crosses_the_edge_in_small_creeps_and_answers_the_first_queue_at_once() -> None:
    ctl = Autorate(config(10, 2, 10))
    link = SatLink(12 * MBIT, 40.0, 5.0, buffer_ms=400.0)
    run(ctl, link, 20)
    link.capacity_bps = 4.8 * MBIT
    run(ctl, link, 3, t0=20)
    edge = ctl._edge_bps["down"]
    assert edge == pytest.approx(4.8 * MBIT, rel=0.01)
    link.capacity_bps = 5.3 * MBIT  # the fade eases: the edge learned is 10 % low
    changes, trace = run(ctl, link, 60, t0=23)
    first_cut = next(c for c in changes if c.new_bps < c.old_bps)
    ups = [c for c in changes if c.new_bps > c.old_bps and c.t_ms < first_cut.t_ms]
    # The edge is crossed in creeps of increase_near_edge; only past it do they grow ...
    near = ctl.config.increase_near_edge
    for c in ups:
        if 0.95 * edge <= c.old_bps < edge:
            assert c.new_bps <= c.old_bps * (1 + near) + 1, ups
    assert any(c.new_bps > c.old_bps * (1 + 1.5 * near) for c in ups if c.old_bps >= edge), ups
    # ... and the queue the last probe finds is cut for at its first interval over the
    # threshold, half a hold after it: one interval's worth, under LEO's 50 ms goal.
    probe = ups[-1]
    assert first_cut.t_ms - probe.t_ms <= ctl.config.hold_ms // 2
    queue_at_cut_ms = trace[first_cut.t_ms // 1000 - 24][2]
    assert queue_at_cut_ms < 50
