"""The bufferbloat comparison, shared by the VM tests and `benchmarks.bufferbloat`.

Two experiments on a lab village behind an emulated satellite (tests.vm.satlink):

1. Latency under load, per leaf kind (fq_codel, cake, pfifo) in one run: the
   median ping RTT of an idle subscriber while idle, then while the others
   download greedily; and, meanwhile, the RTT of pings from one of the
   downloading subscribers, which share a class (and so a leaf) with its own
   downloads.
2. Utilisation and fairness at GEO delay, fq_codel leaves with the AQM times
   derived from the path RTT versus the 5 ms / 100 ms defaults (the settings a
   100 ms path derives): every subscriber downloads, the datapath counts what
   was delivered over a window after TCP's slow start.
"""

from __future__ import annotations

import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

from desanet.gateway.lab import Village
from desanet.shaper.plan import ShapingPlan, classids_for_slot
from tests.vm import satlink
from tests.vm.satlink import Gateway, SatLink

# fq_codel's stock settings are tuned for a 100 ms path: a plan for rtt 100 ms derives them.
DEFAULT_AQM_RTT_MS = 100.0


@dataclass(frozen=True)
class LatencyRun:
    """RTTs (median, ms) of one leaf kind, idle and under load, with the load's utilisation."""

    leaf: str
    leaf_in_use: str
    idle_ms: float
    loaded_ms: float
    busy_ms: float
    utilisation: float
    samples: int

    @property
    def inflation_ms(self) -> float:
        """How much the idle subscriber's RTT grew while the others downloaded."""
        return self.loaded_ms - self.idle_ms

    @property
    def busy_inflation_ms(self) -> float:
        """How much RTT a downloading subscriber's own pings gained over the idle RTT."""
        return self.busy_ms - self.idle_ms


@dataclass(frozen=True)
class ThroughputRun:
    """Delivered download rates per subscriber over a window, under one AQM setting."""

    setting: str
    target_us: int
    interval_us: int
    rates_bps: list[float]
    link_bps: int

    @property
    def utilisation(self) -> float:
        """Delivered IP bits over the modem's rate."""
        return sum(self.rates_bps) / self.link_bps

    @property
    def jain(self) -> float:
        return satlink.jain(self.rates_bps)


def _window_rates(gw: Gateway, slots: list[int], seconds: float) -> list[float]:
    start = gw.down_bytes()
    t0 = time.monotonic()
    time.sleep(seconds)
    end = gw.down_bytes()
    elapsed = time.monotonic() - t0
    return [float(end[s] - start[s]) * 8 / elapsed for s in slots]


def latency_under_load(
    v: Village,
    gw: Gateway,
    link: SatLink,
    leaves: tuple[str, ...] = ("fq_codel", "cake", "pfifo"),
    *,
    idle_s: float = 3.0,
    warmup_s: float = 3.0,
    load_s: float = 6.0,
    streams: int = 4,
) -> list[LatencyRun]:
    """Subscriber 1 stays idle and pings; the others download; once per leaf kind."""
    satlink.emulate(v, link)
    idle, busy = v.subscribers[0], v.subscribers[1:]
    runs = []
    for leaf in leaves:
        applied = gw.apply(gw.plan(link, leaf, link.rtt_ms))
        idle_rtts = satlink.ping_rtts_ms(v, idle, idle_s)
        procs = satlink.start_downloads(v, busy, warmup_s + load_s + 2, streams)
        time.sleep(warmup_s)
        with ThreadPoolExecutor(max_workers=3) as pool:
            loaded = pool.submit(satlink.ping_rtts_ms, v, idle, load_s)
            busy_rtts = pool.submit(satlink.ping_rtts_ms, v, busy[0], load_s)
            rates = pool.submit(_window_rates, gw, [s.index for s in busy], load_s)
            loaded_rtts, busy_samples, rate_values = (
                loaded.result(),
                busy_rtts.result(),
                rates.result(),
            )
        satlink.finish(procs)
        runs.append(
            LatencyRun(
                leaf=leaf,
                leaf_in_use=applied.leaf_in_use,
                idle_ms=satlink.median(idle_rtts),
                loaded_ms=satlink.median(loaded_rtts),
                busy_ms=satlink.median(busy_samples),
                utilisation=sum(rate_values) / link.down_bps,
                samples=len(loaded_rtts),
            )
        )
    return runs


def _codel_times(plan: ShapingPlan, slot: int) -> tuple[int, int]:
    down_classid, _ = classids_for_slot(slot)
    options = dict(plan.tree("down").leaves[down_classid].options)
    return options["target"], options["interval"]


def utilisation_at(
    v: Village,
    gw: Gateway,
    link: SatLink,
    settings: tuple[str, ...] = ("derived", "default"),
    *,
    warmup_s: float = 12.0,
    window_s: float = 20.0,
    streams: int = 4,
) -> list[ThroughputRun]:
    """Every subscriber downloads; delivered rates with derived vs default AQM times."""
    satlink.emulate(v, link)
    slots = [s.index for s in v.subscribers]
    runs = []
    for setting in settings:
        rtt_ms = link.rtt_ms if setting == "derived" else DEFAULT_AQM_RTT_MS
        applied = gw.apply(gw.plan(link, "fq_codel", rtt_ms))
        target, interval = _codel_times(applied.plan, slots[0])
        procs = satlink.start_downloads(v, v.subscribers, warmup_s + window_s + 2, streams)
        time.sleep(warmup_s)
        rates = _window_rates(gw, slots, window_s)
        satlink.finish(procs)
        runs.append(ThroughputRun(setting, target, interval, rates, link.down_bps))
    return runs
