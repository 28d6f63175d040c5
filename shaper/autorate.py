"""The adaptive link rate: a pure controller that follows the uplink's capacity from the WAN RTT.

No I/O: it is fed, once an interval, the time, the link's WAN RTT samples of
that interval (their p50 and count, from the datapath's passive RTT), the
link's throughput per direction, and answers the shaped rate per direction.
The service applies a changed rate through the incremental shaper.

Theory of operation:
1. Baseline: the slow-moving minimum of the interval RTTs. A new lower value
   is taken at once; otherwise it creeps up by `baseline_rise` of the gap
   per interval, so a path that really moved (a new satellite, a new route)
   is learned in minutes while a queue of a few seconds does not lift it.
2. Jitter: an average of how far the idle interval RTTs sit above the
   baseline (a GEO link's tens of ms; a LEO link's few).
3. Threshold: the RTT excess that means "a queue is building in the modem":
   max(`threshold_min_ms`, `threshold_share` x baseline, `jitter_factor` x
   jitter). A GEO link's 600 ms baseline gives 60 ms or more, which its
   jitter never reaches; a LEO link's 40 ms gives `threshold_min_ms`.
4. Per direction, each interval: busy (throughput >= `busy_share` of the
   shaped rate: a link whose capacity fell carries far less than the shaped
   rate, so "loaded" cannot be the test here) and excess above the threshold
   for two intervals running (or above twice it in one), and not shrinking
   (a queue draining under the last cut needs no other): the capacity
   dropped below the shaped rate: lower it to `decrease` x what actually got
   through (what the link carried, a measured capacity: after a big rise
   this interval's, else the median of the last three, so a dip of the
   traffic's own cuts no deeper); loaded (throughput >= `load_share` of the rate) and the RTT
   flat (excess under half the threshold): probe up by `increase` x, up to
   `max`, but by only `increase_near_edge` while within reach of the rate
   that queued last (each step past the edge then builds a small queue, not
   a large one); neither loaded nor queueing: drift back toward the
   configured rate.
   The result is clamped to [min, max]. An RTT that rises with no traffic of
   ours (a route change) moves nothing; one that rises while the link is
   busy is taken for a queue, and the baseline learns it within minutes.
5. Rate limits: at most one change per `hold_ms` per direction (so the
   effect of the last change is seen before the next), and changes smaller
   than `min_step` of the rate are not made.
A steady link never moves the rate: shaped below its capacity, the modem
never queues, the RTT stays on its baseline, and probing stops at `max`,
which defaults to the configured rate. A `max` above it lets the controller
look for capacity beyond what the operator configured, at the price of a
queue each time it finds the edge.
"""

from __future__ import annotations

import statistics
from collections import deque
from dataclasses import dataclass, field

from desanet.errors import ValidationError


@dataclass(frozen=True)
class AutorateConfig:
    """Bounds and tuning of one link's adaptive rate (`[link]` adapt, min/max per direction)."""

    down_bps: int  # the configured rate, where an idle link drifts back to
    up_bps: int
    down_min_bps: int
    down_max_bps: int
    up_min_bps: int
    up_max_bps: int
    hold_ms: int = 2_000
    load_share: float = 0.7
    busy_share: float = 0.1
    decrease: float = 0.9
    increase: float = 1.05
    increase_near_edge: float = 0.02
    idle_drift: float = 0.1
    threshold_min_ms: float = 15.0
    threshold_share: float = 0.1
    jitter_factor: float = 3.0
    baseline_rise: float = 0.002
    min_step: float = 0.01
    min_samples: int = 3

    def __post_init__(self) -> None:
        for direction in ("down", "up"):
            low, high = self.bounds(direction)
            rate = self.configured(direction)
            if not 0 < low <= rate <= high:
                raise ValidationError(
                    f"[link] {direction}: the adaptive rate needs {direction}_min <= "
                    f"{direction} <= {direction}_max (got {low}, {rate}, {high} bit/s)"
                )

    def bounds(self, direction: str) -> tuple[int, int]:
        """(min, max) shaped rate of `direction`, bit/s."""
        if direction == "down":
            return self.down_min_bps, self.down_max_bps
        return self.up_min_bps, self.up_max_bps

    def configured(self, direction: str) -> int:
        """The configured rate of `direction`, bit/s."""
        return self.down_bps if direction == "down" else self.up_bps


@dataclass(frozen=True)
class RateChange:
    """One decision: `direction` from `old_bps` to `new_bps`, and why."""

    t_ms: int
    direction: str
    old_bps: int
    new_bps: int
    reason: str


@dataclass
class Autorate:
    """The controller's state: the rates, the baseline and jitter, the last change's time."""

    config: AutorateConfig
    rates_bps: dict[str, int] = field(default_factory=dict)
    baseline_ms: float | None = None
    jitter_ms: float = 0.0
    changes: int = 0
    _last_change_ms: dict[str, int] = field(default_factory=dict)
    # Per direction, what got through when it last queued: probing slows down near it.
    _edge_bps: dict[str, float] = field(default_factory=dict)
    # Per direction, the throughput of the last intervals; how many intervals in a row the
    # RTT was above the threshold.
    _recent_bps: dict[str, deque[float]] = field(default_factory=dict)
    _over: int = 0
    _last_excess: float | None = None

    def __post_init__(self) -> None:
        if not self.rates_bps:
            self.rates_bps = {d: self.config.configured(d) for d in ("down", "up")}

    def threshold_ms(self) -> float:
        """The RTT excess over the baseline taken as a queue in the modem."""
        c = self.config
        base = self.baseline_ms or 0.0
        return max(c.threshold_min_ms, c.threshold_share * base, c.jitter_factor * self.jitter_ms)

    def step(
        self,
        t_ms: int,
        wan_rtt_ms: float | None,
        samples: int,
        throughput_bps: dict[str, float],
    ) -> list[RateChange]:
        """Feed one interval; returns the rate changes it decided (often none)."""
        c = self.config
        excess = None
        if wan_rtt_ms is not None and samples >= c.min_samples:
            excess = self._observe(wan_rtt_ms, throughput_bps)
        self._over = self._over + 1 if excess is not None and excess > self.threshold_ms() else 0
        for direction in ("down", "up"):
            recent = self._recent_bps.setdefault(direction, deque(maxlen=3))
            recent.append(throughput_bps.get(direction, 0.0))
        changes = []
        for direction in ("down", "up"):
            change = self._decide(t_ms, direction, excess, throughput_bps.get(direction, 0.0))
            if change is not None:
                changes.append(change)
        self._last_excess = excess
        return changes

    def _loaded(self, direction: str, throughput: float) -> bool:
        return throughput >= self.config.load_share * self.rates_bps[direction]

    def _observe(self, rtt_ms: float, throughput: dict[str, float]) -> float:
        c = self.config
        if self.baseline_ms is None or rtt_ms < self.baseline_ms:
            self.baseline_ms = rtt_ms
        else:
            self.baseline_ms += c.baseline_rise * (rtt_ms - self.baseline_ms)
        excess = rtt_ms - self.baseline_ms
        busy = any(
            throughput.get(d, 0.0) >= c.busy_share * self.rates_bps[d] for d in ("down", "up")
        )
        if not busy:
            # Jitter is learned idle: on a busy link the excess may be a queue, not the path.
            self.jitter_ms += 0.05 * (excess - self.jitter_ms)
        return excess

    def _decide(
        self, t_ms: int, direction: str, excess: float | None, throughput: float
    ) -> RateChange | None:
        c = self.config
        rate = self.rates_bps[direction]
        low, high = c.bounds(direction)
        last = self._last_change_ms.get(direction)
        if last is not None and t_ms - last < c.hold_ms:
            return None
        loaded = self._loaded(direction, throughput)
        # A link whose capacity fell carries less than the shaped rate: busy, not loaded.
        busy = throughput >= c.busy_share * rate
        threshold = self.threshold_ms()
        flat = excess is None or excess < threshold / 2
        # A queue shows in two intervals running, a big one at once: one noisy interval
        # (a host busy elsewhere, a burst of cross traffic) moves nothing.
        big = excess is not None and excess > 2 * threshold
        queueing = excess is not None and (big or (excess > threshold and self._over >= 2))
        # A queue that shrinks is draining under the last cut: another would overshoot.
        draining = (
            excess is not None
            and self._last_excess is not None
            and excess < 0.95 * self._last_excess
        )
        if busy and queueing and not draining:
            # What got through is what the link carries now: go below it. After a small rise
            # the median of the last intervals, so a dip of the traffic's own (a loss, a
            # pause) cuts no deeper; after a big one this interval's, the capacity of now.
            recent = self._recent_bps.get(direction, [throughput])
            carried = min(rate, throughput if big else statistics.median(recent))
            target, reason = carried * c.decrease, f"wan rtt +{excess:.0f} ms"
            self._edge_bps[direction] = carried
        elif loaded and excess is not None and flat:
            if rate >= high:
                return None
            edge = self._edge_bps.get(direction)
            if edge is not None and rate >= edge * (1 + c.increase_near_edge) / c.decrease:
                edge = None  # well past where it queued: the capacity came back
                del self._edge_bps[direction]
            # Near the rate that queued last, creep: each step over the edge is a small queue.
            step = c.increase_near_edge if edge is not None else c.increase - 1
            target, reason = rate * (1 + step), "loaded, rtt flat: probing"
        elif not loaded and flat:
            configured = c.configured(direction)
            gap = configured - rate
            # A share of the gap, but at least a min_step: the last stretch is not crawled.
            step = max(abs(gap) * c.idle_drift, c.min_step * configured)
            target = rate + min(step, abs(gap)) * (1 if gap > 0 else -1)
            reason = "idle: back toward the configured rate"
        else:
            return None
        new = int(min(max(target, low), high))
        if new == rate or (abs(new - rate) < c.min_step * rate and new != c.configured(direction)):
            return None
        self.rates_bps[direction] = new
        self._last_change_ms[direction] = t_ms
        self.changes += 1
        return RateChange(t_ms, direction, rate, new, reason)

    def state(self) -> dict[str, float | int]:
        """What status shows: the rates, the baseline and threshold, how many changes."""
        return {
            "down_bps": self.rates_bps["down"],
            "up_bps": self.rates_bps["up"],
            "baseline_ms": round(self.baseline_ms or 0.0, 1),
            "jitter_ms": round(self.jitter_ms, 1),
            "threshold_ms": round(self.threshold_ms(), 1),
            "changes": self.changes,
        }
