# Over 400 lines: the controller is one state machine whose rules read each other's state;
# its theory of operation, a third of the file, stands beside the code it explains.
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
   for two intervals running (or above twice it in one), not shrinking
   (a queue draining under the last cut needs no other), and not a burst
   the rate drains on its own (throughput above the rate: the modem's
   capacity is above it too, and a queue that drains at the gap within a
   settle time, a slow start's, needs no cut): the capacity
   dropped below the shaped rate: lower it to `decrease` x what actually got
   through (what the link carried, a measured capacity: after a big rise
   this interval's, else the median of the last three, so a dip of the
   traffic's own cuts no deeper); loaded (throughput >= `load_share` of the
   rate) and the RTT flat (excess under half the threshold): probe up, to
   `max` at most. What got through when it queued is the edge (and while
   that queue drains, what gets through is the modem's whole capacity: the
   edge takes the largest). Probing goes straight back to `edge_share` of
   the edge and stays there for `edge_hold_rtts` baselines since the last
   cut (a minute on GEO, 4 s on LEO): on a long path a TCP sender's own
   surplus spills into the modem before the shaped rate reaches the
   capacity, each spill hundreds of ms of queue for seconds, so what an
   overshoot costs grows with the round trip, and the wait does. Then it
   creeps: up to the edge in one step, across it by `increase_near_edge`
   at a time (what gets through and the shaped rate differ by a few %: the
   headroom, the framing); once twice that past it with no queue (the
   capacity is rising) by twice that, each creep that found no queue
   doubling the next, up to `increase`. A probe that meets a queue is cut
   for at the first interval over the threshold, half a hold after it: it
   found the edge, it is not noise. Well past the edge (a cut
   by `decrease` would not reach back to it) the capacity came back:
   `increase` x, doubled by each probe in a row that found no queue, up to
   `increase_max`. Idle (under `busy_share` of the rate) with
   the RTT flat: drift back toward the configured rate; busy but not loaded,
   the rate stays (the traffic does not use what it has).
   The result is clamped to [min, max]. An RTT that rises with no traffic of
   ours (a route change) moves nothing; one that rises while the link is
   busy is taken for a queue, and the baseline learns it within minutes.
5. Rate limits: at most one change per `hold_ms` per direction (half
   that for a cut answering a probe up), and changes smaller than
   `min_step` of the rate are not made. Waits end on an interval: a tenth
   of one is forgiven, so a timer a few ms early costs no interval. A
   change shows in the RTT a round trip after it, seen an interval later: a
   probe waits the settle time, `hold_ms` plus two baselines, since the
   last change (on a GEO link 3.2 s: a second probe made before the first
   one's queue shows would stack on it). Within the settle time of the last cut plus the time
   its queue takes to drain (the excess it answered over 1 - `decrease`),
   another cut is made only for an excess grown by more than the threshold
   past the one that cut answered (the capacity still falling): the RTT
   samples trail the modem's queue, and on a long path a queue already
   draining would otherwise be cut for twice.
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
    increase_max: float = 1.25
    increase_near_edge: float = 0.02
    edge_share: float = 0.95
    edge_hold_rtts: float = 100.0
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
    # Per direction: the last cut (time, the excess it answered); when creeping past the
    # edge may start; probes in a row that found no queue (0: the last change was no
    # probe); creeps in a row made past the edge; the time of the last probe up.
    _last_cut: dict[str, tuple[int, float]] = field(default_factory=dict)
    _creep_at_ms: dict[str, int] = field(default_factory=dict)
    _probes: dict[str, int] = field(default_factory=dict)
    _creeps: dict[str, int] = field(default_factory=dict)
    _raised_ms: dict[str, int] = field(default_factory=dict)
    # The last step's time and the interval before it.
    _t_ms: int | None = None
    _interval_ms: int = 0

    def __post_init__(self) -> None:
        if not self.rates_bps:
            self.rates_bps = {d: self.config.configured(d) for d in ("down", "up")}

    def settle_ms(self) -> float:
        """How long a change takes to show in the RTT: `hold_ms` plus two baselines."""
        return self.config.hold_ms + 2 * (self.baseline_ms or 0.0)

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
        if self._t_ms is not None:
            self._interval_ms = max(0, t_ms - self._t_ms)
        self._t_ms = t_ms
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
        threshold = self.threshold_ms()
        if excess is not None and excess > threshold:
            self._learn_edge(t_ms, direction, throughput)
        last = self._last_change_ms.get(direction)
        # Just after a probe up a queue is the edge found again: answered at its first
        # interval over the threshold, and sooner than the hold.
        probed = (
            last is not None
            and self._raised_ms.get(direction) == last
            and t_ms - last <= 2 * self.settle_ms()
        )
        hold = c.hold_ms // 2 if probed else c.hold_ms
        if last is not None and not self._waited(t_ms, last, hold):
            return None
        settled = last is None or self._waited(t_ms, last, self.settle_ms())
        loaded = self._loaded(direction, throughput)
        # A link whose capacity fell carries less than the shaped rate: busy, not loaded.
        busy = throughput >= c.busy_share * rate
        flat = excess is None or excess < threshold / 2
        # A queue shows in two intervals running, a big one at once: one noisy interval
        # (a host busy elsewhere, a burst of cross traffic) moves nothing.
        big = excess is not None and excess > 2 * threshold
        queueing = excess is not None and (
            big or (excess > threshold and (self._over >= 2 or probed))
        )
        if (
            busy
            and queueing
            and excess is not None
            and self._cut_due(t_ms, direction, excess, throughput)
        ):
            return self._cut(t_ms, direction, excess, throughput, big)
        if last is not None and not self._waited(t_ms, last, c.hold_ms):
            return None
        if loaded and excess is not None and flat:
            if not settled:
                return None
            return self._probe(t_ms, direction)
        if not busy and flat:
            configured = c.configured(direction)
            gap = configured - rate
            # A share of the gap, but at least a min_step: the last stretch is not crawled.
            step = max(abs(gap) * c.idle_drift, c.min_step * configured)
            target = rate + min(step, abs(gap)) * (1 if gap > 0 else -1)
            return self._change(t_ms, direction, target, "idle: back toward the configured rate")
        return None

    def _waited(self, t_ms: int, since_ms: int, wait_ms: float) -> bool:
        """Whether `wait_ms` has passed since `since_ms`: waits end on an interval, so a
        tenth of one is forgiven (a timer a few ms early does not cost a whole interval)."""
        return t_ms - since_ms >= wait_ms - self._interval_ms / 10

    def _drain_ms(self, answered_ms: float) -> float:
        """How long a cut's queue of `answered_ms` takes to show it stopped and drain."""
        # It takes a round trip to stop growing, then drains at the gap between the
        # capacity and the cut rate.
        return self.settle_ms() + answered_ms / (1 - self.config.decrease)

    def _learn_edge(self, t_ms: int, direction: str, throughput: float) -> None:
        """While the queue the last cut answered still shows, the modem sends all it can:
        what gets through is its capacity, a better measure than the cut's own interval
        (which may have begun before the queue did)."""
        cut, edge = self._last_cut.get(direction), self._edge_bps.get(direction)
        if cut is None or edge is None or t_ms - cut[0] >= self._drain_ms(cut[1]):
            return
        self._edge_bps[direction] = max(edge, min(throughput, self.config.bounds(direction)[1]))

    def _cut_due(self, t_ms: int, direction: str, excess: float, throughput: float) -> bool:
        """Whether a queue of `excess` ms calls for a cut, given the last cut's."""
        # A queue that shrinks is draining under the last cut: another would overshoot.
        if self._last_excess is not None and excess < 0.95 * self._last_excess:
            return False
        # The modem sent more than the shaped rate: its capacity is above it, and the
        # queue is a burst of the senders' (a slow start) that the rate drains on its own,
        # at the gap between the two. One that drains before a cut would show needs none.
        rate = self.rates_bps[direction]
        if throughput > rate and excess * throughput / (throughput - rate) < self.settle_ms():
            return False
        cut = self._last_cut.get(direction)
        if cut is None:
            return True
        cut_ms, answered = cut
        # Until the last cut's queue has drained, only a queue grown by more than the
        # threshold is a new one (the capacity still falling).
        if t_ms - cut_ms >= self._drain_ms(answered):
            return True
        return excess > answered + self.threshold_ms()

    def _cut(
        self, t_ms: int, direction: str, excess: float, throughput: float, big: bool
    ) -> RateChange | None:
        c = self.config
        rate = self.rates_bps[direction]
        # What got through is what the link carries now: go below it. After a small rise
        # the median of the last intervals, so a dip of the traffic's own (a loss, a
        # pause) cuts no deeper; after a big one this interval's, the capacity of now.
        recent = self._recent_bps.get(direction, [throughput])
        carried = min(rate, throughput if big else statistics.median(recent))
        self._edge_bps[direction] = carried
        # The wait before creeping past the edge again: what an overshoot costs grows with
        # the round trip (the senders' surplus, the time to see it), so the wait does too.
        wait = max(self.settle_ms(), c.edge_hold_rtts * (self.baseline_ms or 0.0))
        self._creep_at_ms[direction] = t_ms + int(wait)
        self._creeps[direction] = 0
        self._last_cut[direction] = (t_ms, excess)
        return self._change(t_ms, direction, carried * c.decrease, f"wan rtt +{excess:.0f} ms")

    def _probe(self, t_ms: int, direction: str) -> RateChange | None:
        c = self.config
        rate = self.rates_bps[direction]
        if rate >= c.bounds(direction)[1]:
            return None
        probes = self._probes.get(direction, 0)
        edge = self._edge_bps.get(direction)
        if edge is not None and rate >= edge * (1 + c.increase_near_edge) / c.decrease:
            # Well past where it queued: the capacity came back.
            del self._edge_bps[direction]
            edge = None
        # Each probe that found no queue doubles the next: capacity that came back is found
        # in a few round trips, not tens.
        step = min(c.increase_max - 1, (c.increase - 1) * 2**probes)
        creeps = self._creeps.get(direction, 0)
        creep = False
        if edge is not None:
            below = c.edge_share * edge / rate - 1
            if below > c.min_step:
                step = min(step, below)  # straight back to just under the edge
            elif not self._waited(t_ms, self._creep_at_ms.get(direction, 0), 0):
                return None  # at the edge: past it only once the wait is over
            elif rate < edge * (1 - c.min_step):
                step, creep = min(step, edge / rate - 1), True  # up to the edge itself
            else:
                # A creep: a small queue if the edge is still there. The edge is crossed
                # by `increase_near_edge` (what got through and the shaped rate differ by
                # a few %: the headroom, the framing); past it each creep that found no
                # queue doubles the next, up to a far probe's first step.
                past = rate >= edge * (1 + 2 * c.increase_near_edge)
                near = c.increase_near_edge * (2 ** (creeps + 1) if past else 1)
                step, creep = min(step, c.increase - 1, near), True
                creeps += past
        change = self._change(t_ms, direction, rate * (1 + step), "loaded, rtt flat: probing")
        if change is not None:
            self._probes[direction] = probes + 1
            self._creeps[direction] = creeps if creep else 0
            self._raised_ms[direction] = t_ms
        return change

    def _change(self, t_ms: int, direction: str, target: float, reason: str) -> RateChange | None:
        c = self.config
        rate = self.rates_bps[direction]
        low, high = c.bounds(direction)
        new = int(min(max(target, low), high))
        if new == rate or (abs(new - rate) < c.min_step * rate and new != c.configured(direction)):
            return None
        if not reason.startswith("loaded"):
            self._probes[direction] = 0
            if reason.startswith("idle"):
                self._creeps[direction] = 0
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
