# Over 400 lines: one experiment shared by the VM test and the benchmark: the emulated modem,
# the service's latency step driven as the service drives it, and the runs with what they measure.
"""The adaptive link rate on a lab village, shared by the VM test and `benchmarks.autorate`.

The emulated modem (tests.vm.satlink's village, replaced here) is netem's
half of the round trip, then a tbf at the modem's capacity with its own dumb
buffer: the queue a fixed-rate shaper leaves in the modem when the capacity
drops. The gateway runs the real datapath (passive RTT on), the real shaper,
and the service's own latency step (gateway.link_latency: the RTT window,
the controller, the incremental root-class change), driven once a second as
the service drives it.

One run: the idle subscriber pings; the others download greedily; the
capacity steps from `high` to `low` (and, with `back_s`, to `high` again)
and the run measures, over the low phase after `settle_s`, the idle
subscriber's ping RTTs, the delivered download rate, and the passive WAN
RTT against the path's delay plus the modem's queue (its tbf backlog, read
each interval); over the steady phase before, the passive WAN RTT against
the gateway's own pings, and whether the rate moved at all; over the phase
back at `high` after `back_settle_s`, the delivered rate.
"""

from __future__ import annotations

import re
import subprocess
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import numpy as np

from desanet.ebpf import abi
from desanet.ebpf.datapath import Provision
from desanet.gateway.applier import Applier
from desanet.gateway.lab import INET_V4, SubscriberHost, Village, in_netns, run
from desanet.gateway.link_latency import LinkLatency
from desanet.meter.latency import LINK_EDGES_MS, RttReader, percentile_ms
from desanet.shaper.autorate import Autorate, AutorateConfig
from tests.vm import satlink
from tests.vm.satlink import Gateway, SatLink

_UP, _DOWN = abi.COUNTER_FIELDS.index("up_bytes"), abi.COUNTER_FIELDS.index("down_bytes")
_RTT = re.compile(r"time=([0-9.]+) ms")
_TBF_BACKLOG = re.compile(r"qdisc tbf .*?backlog (\d+)b", re.S)
MODEM_BUFFER_MS = 400  # the modem's dumb buffer (tbf latency): what a fixed rate leaves queued


@dataclass(frozen=True)
class ModemLink:
    """A satellite path whose capacity the run changes: RTT and the rates.

    `jitter_ms` goes on the return half only: netem with jitter reorders
    packets (TCP takes that for loss) unless it also paces at a `rate`, which
    that half does (each packet then leaves after the one before it)."""

    name: str
    rtt_ms: float
    configured_bps: int  # [link] down: what the operator set for the good hours
    up_bps: int
    high_bps: int  # the modem's capacity in the good hours (above the configured rate)
    low_bps: int  # in the rain fade
    jitter_ms: float = 0.0


# The steps are 20 -> 8 -> 20 Mbit/s; under TCG (no KVM on the development machines)
# the VM carries about 12 Mbit/s through the datapath, so the same ratio 2.5 is scaled to
# 12 -> 4.8 -> 12, under a configured 10 Mbit/s.
LEO = ModemLink("LEO", 40.0, 10_000_000, 4_000_000, 12_000_000, 4_800_000)
LEO_JITTER = ModemLink("LEO", 40.0, 10_000_000, 4_000_000, 12_000_000, 4_800_000, 5.0)
GEO = ModemLink("GEO", 600.0, 10_000_000, 4_000_000, 12_000_000, 4_800_000)


def modem(v: Village, link: ModemLink, capacity_bps: int) -> None:
    """Half the RTT each way; download through a tbf at `capacity_bps` with the modem's buffer."""
    half = f"{link.rtt_ms / 2:g}ms"
    limit = str(satlink.NETEM_LIMIT_PKTS)
    run(["tc", "qdisc", "replace", "dev", "uplink", "root", "handle", "1:", "netem",
         "delay", half, "limit", limit], v.inet_ns)  # fmt: skip
    run(["tc", "qdisc", "replace", "dev", "uplink", "parent", "1:1", "handle", "2:", "tbf",
         "rate", f"{capacity_bps}bit", "burst", "16kb", "latency", f"{MODEM_BUFFER_MS}ms"],
        v.inet_ns)  # fmt: skip
    jitter = [f"{link.jitter_ms:g}ms"] if link.jitter_ms else []
    run(["tc", "qdisc", "replace", "dev", v.wan, "root", "netem", "delay", half, *jitter,
         "rate", f"{link.up_bps}bit", "limit", limit], v.gw_ns)  # fmt: skip


def set_capacity(v: Village, capacity_bps: int) -> None:
    """Change the modem's capacity in place: its queue and the path's delay stay."""
    run(["tc", "qdisc", "change", "dev", "uplink", "parent", "1:1", "handle", "2:", "tbf",
         "rate", f"{capacity_bps}bit", "burst", "16kb", "latency", f"{MODEM_BUFFER_MS}ms"],
        v.inet_ns)  # fmt: skip


def modem_queue_ms(v: Village, capacity_bps: int) -> float:
    """The modem's queue now: its tbf's backlog at `capacity_bps`, in ms."""
    out = run(["tc", "-s", "qdisc", "show", "dev", "uplink"], v.inet_ns, check=False)
    found = _TBF_BACKLOG.search(out)
    return 8000 * int(found.group(1)) / capacity_bps if found else float("nan")


def remove_modem(v: Village) -> None:
    """Take the modem off, so the next `satlink.emulate` builds its netem afresh."""
    run(["tc", "qdisc", "del", "dev", "uplink", "root"], v.inet_ns, check=False)
    run(["tc", "qdisc", "del", "dev", v.wan, "root"], v.gw_ns, check=False)


@dataclass(frozen=True)
class AdaptRun:
    """What one run measured (ms, bit/s)."""

    link: str
    adapt: bool
    base_ms: float  # idle subscriber's median ping RTT, link idle
    steady_ping_ms: float  # ... during the steady loaded phase
    steady_gateway_ping_ms: float  # the gateway's own pings to the internet host meanwhile
    steady_wan_p50_ms: float  # the passive WAN RTT of that phase, from the datapath
    steady_changes: int  # rate changes during the steady phase
    steady_utilisation: float  # delivered download over min(high, configured) meanwhile
    low_p95_ms: float  # the idle subscriber's p95 ping RTT in the low phase
    low_utilisation: float  # delivered download over the low capacity
    low_rate_bps: int  # the shaped rate at the end of the low phase
    low_wan_p50_ms: float  # the passive WAN RTT of the low phase
    low_gateway_ping_ms: float  # the gateway's own pings meanwhile
    low_modem_queue_ms: float  # the modem's queue meanwhile (median of one read a second)
    back_utilisation: float  # back at high: delivered over min(high, configured); NaN: no phase
    back_rate_bps: int  # the shaped rate at the end
    trace: tuple[str, ...] = field(default=(), repr=False)  # _Driver.trace

    @property
    def inflation_ms(self) -> float:
        """p95 RTT in the low-capacity phase over the idle link's median."""
        return self.low_p95_ms - self.base_ms


def pings_ms(v: Village, netns: str, seconds: float, interval_s: float = 0.2) -> list[float]:
    """RTTs of pings from `netns` to the internet host for `seconds` (a deadline: under
    emulation a count of pings can take far longer than count x interval)."""
    count = str(max(1, int(seconds / interval_s)))
    out = run(["ping", "-n", "-i", f"{interval_s:g}", "-c", count, "-w", f"{seconds + 3:g}",
               "-W", "3", INET_V4], netns, check=False)  # fmt: skip
    return [float(m) for m in _RTT.findall(out)]


def _downloads(
    v: Village, busy: list[SubscriberHost], seconds: float, streams: int
) -> list[subprocess.Popen[bytes]]:
    """Greedy downloads for `seconds` and a margin: under TCG every tc and ping call
    stretches the phases, so the run stops them itself (`_stop`) once measured."""
    return satlink.start_downloads(v, busy, seconds + 20, streams)


def _stop(procs: list[subprocess.Popen[bytes]]) -> None:
    """Stop the downloads; one that had already ended ended inside a measured phase."""
    ended = [p.args for p in procs if p.poll() is not None]
    for proc in procs:
        if proc.poll() is None:
            proc.terminate()
        proc.wait(timeout=30)
    if ended:
        raise RuntimeError(f"downloads ended before the run did: {ended}")


def _p95(values: list[float]) -> float:
    return float(np.percentile(values, 95)) if values else float("nan")


class _Driver:
    """The service's latency step, once a second: rates from the counters, then tick+enforce."""

    def __init__(self, v: Village, gw: Gateway, link: ModemLink, adapt: bool) -> None:
        if gw.datapath is None:
            raise RuntimeError("the gateway is not started")
        self.v, self.gw = v, gw
        plan = gw.plan(SatLink(link.name, link.rtt_ms, link.configured_bps, link.up_bps),
                       "fq_codel", link.rtt_ms)  # fmt: skip
        self.applier = Applier(
            gw.shaper, gw.datapath, lambda: None, lambda s: None, lambda s: _no_entry()
        )
        with in_netns(v.gw_ns):
            self.applier.apply(plan, [], [])
        autorate = None
        if adapt:
            autorate = Autorate(
                AutorateConfig(
                    down_bps=link.configured_bps,
                    up_bps=link.up_bps,
                    down_min_bps=link.configured_bps // 5,
                    down_max_bps=link.configured_bps,
                    up_min_bps=link.up_bps // 4,
                    up_max_bps=link.up_bps,
                )
            )
        with in_netns(v.gw_ns):
            reader = RttReader(gw.datapath.pin_dir)
        self.latency = LinkLatency(reader, 60_000, autorate)
        self.changes = 0
        self.queue_of: int | None = None  # the capacity whose queue each step reads
        self.queues_ms: list[float] = []
        # One line per interval: seconds since the start, the shaped rate and the delivered
        # download (Mbit/s), the interval's WAN RTT p50 and samples, the changes decided.
        self.trace: list[str] = []
        self._start = time.monotonic()
        self._last = gw.counters()
        self._t = time.monotonic()
        self.latency.window.update(int(self._t * 1000))

    def step(self) -> np.ndarray:
        """One interval; returns the link's WAN samples of it (1 ms buckets).

        With `queue_of` set to the modem's capacity, the modem's queue is read too."""
        now = time.monotonic()
        counters = self.gw.counters()
        elapsed = max(now - self._t, 1e-3)
        delta = (counters - self._last).astype(np.float64) * 8 / elapsed
        rates = np.stack([delta[:, _UP], delta[:, _DOWN]], axis=1)
        self._last, self._t = counters, now
        decided = self.latency.tick(int(now * 1000), rates)
        self.changes += len(decided)
        wan = self.latency.window.last_interval[abi.RTT_WAN]
        p50 = percentile_ms(wan, LINK_EDGES_MS, 0.5)
        self.trace.append(
            f"{now - self._start:6.1f} s  rate {self.rate_bps() / 1e6:5.2f}  "
            f"got {rates[:, 1].sum() / 1e6:5.2f}  wan p50 {p50 or 0:6.1f} ms "
            f"({int(wan.sum())})  "
            + "; ".join(f"{c.direction} {c.new_bps / 1e6:.2f} {c.reason}" for c in decided)
        )
        with in_netns(self.v.gw_ns):
            self.latency.enforce(self.applier)
        if self.queue_of is not None:
            self.queues_ms.append(modem_queue_ms(self.v, self.queue_of))
        return self.latency.window.last_interval[abi.RTT_WAN].copy()

    def drive(self, seconds: float) -> np.ndarray:
        """Step once a second for `seconds`; the WAN samples of all those intervals."""
        total = np.zeros(abi.RTT_LINK_BUCKETS, np.uint64)
        end = time.monotonic() + seconds
        while time.monotonic() < end:
            time.sleep(max(0.0, min(1.0, end - time.monotonic())))
            total += self.step()
        return total

    def rate_bps(self) -> int:
        return self.applier.running.root_rate_bps("down")


def _no_entry() -> Provision:
    raise RuntimeError("the autorate run provisions nothing")


@dataclass(frozen=True)
class Phases:
    """How long a run's phases last, seconds; each is measured after its settle time."""

    steady_s: float
    low_s: float
    settle_s: float
    back_s: float = 0.0  # 0: no phase back at the high capacity
    back_settle_s: float = 0.0
    warmup_s: float = 3.0  # slow start before the steady phase: GEO's takes longer


def capacity_drop(
    v: Village, gw: Gateway, link: ModemLink, adapt: bool, phases: Phases, streams: int = 2
) -> AdaptRun:
    """One run: idle, steady load at the high capacity, load at the low capacity, and with
    `back_s` load at the high capacity again."""
    steady_s, low_s, settle_s = phases.steady_s, phases.low_s, phases.settle_s
    back_s, back_settle_s = phases.back_s, phases.back_settle_s
    modem(v, link, link.high_bps)
    try:
        driver = _Driver(v, gw, link, adapt)
        idle, busy = v.subscribers[0], v.subscribers[1:]
        base = satlink.median(pings_ms(v, idle.netns, 2.0))
        length = phases.warmup_s + steady_s + low_s + back_s
        procs = _downloads(v, busy, length, streams)
        driver.drive(phases.warmup_s)  # slow start, and the controller's baseline
        changes_before = driver.changes
        available = min(link.high_bps, link.configured_bps)
        down0, t0 = gw.down_bytes(), time.monotonic()
        with ThreadPoolExecutor(max_workers=2) as pool:
            pings = pool.submit(pings_ms, v, idle.netns, steady_s - 1)
            # The gateway's own pings cross the WAN path and the modem's queue, no LAN and
            # no desanet queue: what the passive WAN RTT measures.
            own = pool.submit(pings_ms, v, v.gw_ns, steady_s - 1)
            wan = driver.drive(steady_s)
            steady_pings, gateway_pings = pings.result(), own.result()
        steady_changes = driver.changes - changes_before
        steady = _share(gw, busy, down0, t0, available)
        set_capacity(v, link.low_bps)
        driver.drive(settle_s)
        low = _window(gw, busy, link.low_bps, driver, low_s - settle_s, idle)
        low_rate = driver.rate_bps()
        back = float("nan")
        if back_s:
            set_capacity(v, link.high_bps)
            driver.drive(back_settle_s)
            back = _window(gw, busy, available, driver, back_s - back_settle_s).share
        _stop(procs)
        return AdaptRun(
            link=link.name,
            adapt=adapt,
            base_ms=base,
            steady_ping_ms=satlink.median(steady_pings),
            steady_gateway_ping_ms=satlink.median(gateway_pings),
            steady_wan_p50_ms=percentile_ms(wan, LINK_EDGES_MS, 0.5) or float("nan"),
            steady_changes=steady_changes,
            steady_utilisation=steady,
            low_p95_ms=_p95(low.pings),
            low_utilisation=low.share,
            low_rate_bps=low_rate,
            low_wan_p50_ms=percentile_ms(low.wan, LINK_EDGES_MS, 0.5) or float("nan"),
            low_gateway_ping_ms=satlink.median(low.gateway_pings),
            low_modem_queue_ms=satlink.median(driver.queues_ms),
            back_utilisation=back,
            back_rate_bps=driver.rate_bps(),
            trace=tuple(driver.trace),
        )
    finally:
        remove_modem(v)


@dataclass(frozen=True)
class _Window:
    share: float  # delivered download over the capacity it could use
    pings: list[float]  # the idle subscriber's ping RTTs meanwhile (when asked)
    gateway_pings: list[float]  # the gateway's own meanwhile (when asked)
    wan: np.ndarray  # the link's WAN samples of the window


def _window(
    gw: Gateway,
    busy: list[SubscriberHost],
    capacity_bps: int,
    driver: _Driver,
    seconds: float,
    pinger: SubscriberHost | None = None,
) -> _Window:
    """Drive `seconds` measuring the downloads' share of `capacity_bps`; with `pinger`,
    its pings, the gateway's and the modem's queue (into `driver.queues_ms`) too."""
    down0, t0 = gw.down_bytes(), time.monotonic()
    driver.queue_of = capacity_bps if pinger is not None else None
    netns = [pinger.netns, driver.v.gw_ns] if pinger is not None else []
    try:
        with ThreadPoolExecutor(max_workers=2) as pool:
            pings = [pool.submit(pings_ms, driver.v, n, seconds - 1) for n in netns]
            wan = driver.drive(seconds)
            rtts = [p.result() for p in pings] or [[], []]
    finally:
        driver.queue_of = None
    return _Window(_share(gw, busy, down0, t0, capacity_bps), rtts[0], rtts[1], wan)


def _share(
    gw: Gateway, busy: list[SubscriberHost], down0: np.ndarray, t0: float, capacity_bps: int
) -> float:
    """The downloads' delivered rate since (`down0`, `t0`) over `capacity_bps`."""
    delivered = float((gw.down_bytes() - down0)[[s.index for s in busy]].sum()) * 8
    return delivered / (time.monotonic() - t0) / capacity_bps


@dataclass(frozen=True)
class SawtoothRun:
    """What a sawtooth run measured: the idle subscriber's RTT and the link's use."""

    base_ms: float  # idle subscriber's median ping RTT, link idle
    p95_ms: float  # its p95 ping RTT while the capacity moves
    utilisation: float  # delivered download over what the link could carry under max
    changes: int  # rate changes during the sawtooth
    trace: tuple[str, ...] = field(default=(), repr=False)  # _Driver.trace, the capacities

    @property
    def inflation_ms(self) -> float:
        """p95 RTT while the capacity moves over the idle link's median."""
        return self.p95_ms - self.base_ms


def sawtooth(
    v: Village,
    gw: Gateway,
    link: ModemLink,
    adapt: bool,
    period_s: float = 120.0,
    streams: int = 2,
) -> SawtoothRun:
    """The capacity falls from `high` to `low` and climbs back over `period_s`, set anew
    each second from the time since the start."""
    modem(v, link, link.high_bps)
    try:
        driver = _Driver(v, gw, link, adapt)
        idle, busy = v.subscribers[0], v.subscribers[1:]
        base = satlink.median(pings_ms(v, idle.netns, 2.0))
        procs = _downloads(v, busy, 3.0 + period_s, streams)
        driver.drive(3.0)  # slow start
        changes_before = driver.changes
        down0 = gw.down_bytes()
        carried = 0.0  # bits the link could have carried below the shaper's max
        capacity = link.high_bps
        with ThreadPoolExecutor(max_workers=1) as pool:
            pings = pool.submit(pings_ms, v, idle.netns, period_s - 1)
            start = since = time.monotonic()
            while (elapsed := time.monotonic() - start) < period_s:
                # The old capacity holds until the new one is set (a tc call: slow here).
                fall = abs(2 * elapsed / period_s - 1)  # 1 -> 0 -> 1
                new = int(link.low_bps + (link.high_bps - link.low_bps) * fall)
                set_capacity(v, new)
                now = time.monotonic()
                carried += min(capacity, link.configured_bps) * (now - since)
                capacity, since = new, now
                driver.trace.append(f"capacity {capacity / 1e6:.2f}")
                driver.drive(min(1.0, period_s - elapsed))
            carried += min(capacity, link.configured_bps) * (time.monotonic() - since)
            low_pings = pings.result()
        delivered = float((gw.down_bytes() - down0)[[s.index for s in busy]].sum()) * 8
        _stop(procs)
        return SawtoothRun(
            base_ms=base,
            p95_ms=_p95(low_pings),
            utilisation=delivered / carried if carried else 0.0,
            changes=driver.changes - changes_before,
            trace=tuple(driver.trace),
        )
    finally:
        remove_modem(v)
