"""The adaptive link rate on a lab village, shared by the VM test and `benchmarks.autorate`.

The emulated modem (tests.vm.satlink's village, replaced here) is netem's
half of the round trip, then a tbf at the modem's capacity with its own dumb
buffer: the queue a fixed-rate shaper leaves in the modem when the capacity
drops. The gateway runs the real datapath (passive RTT on), the real shaper,
and the service's own latency step (gateway.link_latency: the RTT window,
the controller, the incremental root-class change), driven once a second as
the service drives it.

One run: the idle subscriber pings; the others download greedily; the
capacity steps from `high` to `low` and the run measures, over the low
phase after `settle_s`, the idle subscriber's ping RTTs and the delivered
download rate; and over the steady phase before, the passive WAN RTT against
the pings, and whether the rate moved at all.
"""

from __future__ import annotations

import re
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np

from desanet.ebpf import abi
from desanet.ebpf.datapath import Provision
from desanet.gateway.applier import Applier
from desanet.gateway.lab import INET_V4, Village, in_netns, run
from desanet.gateway.link_latency import LinkLatency
from desanet.meter.latency import LINK_EDGES_MS, RttReader, percentile_ms
from desanet.shaper.autorate import Autorate, AutorateConfig
from tests.vm import satlink
from tests.vm.satlink import Gateway, SatLink

_UP, _DOWN = abi.COUNTER_FIELDS.index("up_bytes"), abi.COUNTER_FIELDS.index("down_bytes")
_RTT = re.compile(r"time=([0-9.]+) ms")
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


LEO = ModemLink("LEO", 40.0, 10_000_000, 4_000_000, 12_000_000, 5_000_000)
LEO_JITTER = ModemLink("LEO", 40.0, 10_000_000, 4_000_000, 12_000_000, 5_000_000, 5.0)
GEO = ModemLink("GEO", 600.0, 10_000_000, 4_000_000, 12_000_000, 5_000_000)


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
    low_p95_ms: float  # the idle subscriber's p95 ping RTT in the low phase
    low_utilisation: float  # delivered download over the low capacity
    low_rate_bps: int  # the shaped rate at the end

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
        self._last = gw.counters()
        self._t = time.monotonic()
        self.latency.window.update(int(self._t * 1000))

    def step(self) -> np.ndarray:
        """One interval; returns the link's WAN samples of it (1 ms buckets)."""
        now = time.monotonic()
        counters = self.gw.counters()
        elapsed = max(now - self._t, 1e-3)
        delta = (counters - self._last).astype(np.float64) * 8 / elapsed
        rates = np.stack([delta[:, _UP], delta[:, _DOWN]], axis=1)
        self._last, self._t = counters, now
        self.changes += len(self.latency.tick(int(now * 1000), rates))
        with in_netns(self.v.gw_ns):
            self.latency.enforce(self.applier)
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


def capacity_drop(
    v: Village,
    gw: Gateway,
    link: ModemLink,
    adapt: bool,
    *,
    steady_s: float = 6.0,
    low_s: float = 15.0,
    settle_s: float = 6.0,
    streams: int = 2,
) -> AdaptRun:
    """One run: idle, steady load at the high capacity, then load at the low capacity."""
    modem(v, link, link.high_bps)
    try:
        driver = _Driver(v, gw, link, adapt)
        idle, busy = v.subscribers[0], v.subscribers[1:]
        base = satlink.median(pings_ms(v, idle.netns, 2.0))
        procs = satlink.start_downloads(v, busy, steady_s + low_s + 6, streams)
        driver.drive(3.0)  # slow start, and the controller's baseline
        changes_before = driver.changes
        with ThreadPoolExecutor(max_workers=2) as pool:
            pings = pool.submit(pings_ms, v, idle.netns, steady_s - 1)
            # The gateway's own pings cross the WAN path and the modem's queue, no LAN and
            # no desanet queue: what the passive WAN RTT measures.
            own = pool.submit(pings_ms, v, v.gw_ns, steady_s - 1)
            wan = driver.drive(steady_s)
            steady_pings, gateway_pings = pings.result(), own.result()
        steady_changes = driver.changes - changes_before
        modem(v, link, link.low_bps)
        driver.drive(settle_s)
        down0, t0 = gw.down_bytes(), time.monotonic()
        with ThreadPoolExecutor(max_workers=1) as pool:
            pings = pool.submit(pings_ms, v, idle.netns, low_s - settle_s - 1)
            driver.drive(low_s - settle_s)
            low_pings = pings.result()
        delivered = float((gw.down_bytes() - down0)[[s.index for s in busy]].sum()) * 8
        utilisation = delivered / (time.monotonic() - t0) / link.low_bps
        satlink.finish(procs)
        return AdaptRun(
            link=link.name,
            adapt=adapt,
            base_ms=base,
            steady_ping_ms=satlink.median(steady_pings),
            steady_gateway_ping_ms=satlink.median(gateway_pings),
            steady_wan_p50_ms=percentile_ms(wan, LINK_EDGES_MS, 0.5) or float("nan"),
            steady_changes=steady_changes,
            low_p95_ms=_p95(low_pings),
            low_utilisation=utilisation,
            low_rate_bps=driver.rate_bps(),
        )
    finally:
        remove_modem(v)


@dataclass(frozen=True)
class SawtoothRun:
    """What a sawtooth run measured: the idle subscriber's RTT and the link's use."""

    base_ms: float  # idle subscriber's median ping RTT, link idle
    p95_ms: float  # its p95 ping RTT while the capacity moves
    utilisation: float  # delivered download over what the link could carry under max
    changes: int  # rate changes during the sawtooth

    @property
    def inflation_ms(self) -> float:
        """p95 RTT while the capacity moves over the idle link's median."""
        return self.p95_ms - self.base_ms


def sawtooth(
    v: Village, gw: Gateway, link: ModemLink, adapt: bool, seconds: int = 24, streams: int = 2
) -> SawtoothRun:
    """The capacity falls from `high` to `low` and climbs back, a step each second."""
    modem(v, link, link.high_bps)
    try:
        driver = _Driver(v, gw, link, adapt)
        idle, busy = v.subscribers[0], v.subscribers[1:]
        base = satlink.median(pings_ms(v, idle.netns, 2.0))
        procs = satlink.start_downloads(v, busy, seconds + 6, streams)
        driver.drive(3.0)  # slow start
        changes_before = driver.changes
        down0 = gw.down_bytes()
        carried = 0.0  # bits the link could have carried below the shaper's max
        with ThreadPoolExecutor(max_workers=1) as pool:
            pings = pool.submit(pings_ms, v, idle.netns, seconds - 1)
            last = time.monotonic()
            for s in range(seconds):
                fall = abs(2 * s / seconds - 1)  # 1 -> 0 -> 1
                capacity = int(link.low_bps + (link.high_bps - link.low_bps) * fall)
                modem(v, link, capacity)
                driver.drive(1.0)
                now = time.monotonic()
                carried += min(capacity, link.configured_bps) * (now - last)
                last = now
            low_pings = pings.result()
        delivered = float((gw.down_bytes() - down0)[[s.index for s in busy]].sum()) * 8
        satlink.finish(procs)
        return SawtoothRun(
            base_ms=base,
            p95_ms=_p95(low_pings),
            utilisation=delivered / carried if carried else 0.0,
            changes=driver.changes - changes_before,
        )
    finally:
        remove_modem(v)
