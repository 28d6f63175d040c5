"""The service's latency step: the RTT window every interval, and the adaptive link rate.

Each interval the service hands this the time and the aggregator's rates;
it snapshots the datapath's RTT histograms (meter/latency.py), feeds the
link's WAN RTT of the interval and the link's throughput to the controller
(shaper/autorate.py) when `[link] adapt` is on, and keeps the running
shaping plan at the controller's rates: a changed rate is one incremental
shaper apply that changes the classes of that direction in place (no tree
rebuild, no leaf replaced, no counters lost), and a plan rebuilt by a reload
or a resync gets the adapted rates back at the next interval.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import numpy as np
import numpy.typing as npt

from desanet.ebpf import abi
from desanet.gateway import latency_view
from desanet.gateway.applier import Applier
from desanet.gateway.config import Config
from desanet.meter.latency import LINK_EDGES_MS, RttSource, RttWindow, percentile_ms
from desanet.shaper.autorate import Autorate, AutorateConfig, RateChange
from desanet.shaper.plan import DIRECTIONS


class LinkLatency:
    """The RTT window of one gateway and, with `[link] adapt`, its link rate controller."""

    def __init__(self, source: RttSource, window_ms: int, autorate: Autorate | None) -> None:
        self.window = RttWindow(source, window_ms)
        self.autorate = autorate
        self._owners: Mapping[int, str] | None = None  # the slot table `_rows` was sorted from
        self._rows = np.zeros(0, np.intp)

    @classmethod
    def from_config(cls, source: RttSource, config: Config, t_ms: int) -> LinkLatency:
        """As `[latency]` and `[link]` ask, the first snapshot taken at `t_ms` (the start)."""
        autorate = None
        if config.adapt is not None:
            a = config.adapt
            autorate = Autorate(
                AutorateConfig(
                    down_bps=config.link.down_bps,
                    up_bps=config.link.up_bps,
                    down_min_bps=a.down_min_bps,
                    down_max_bps=a.down_max_bps,
                    up_min_bps=a.up_min_bps,
                    up_max_bps=a.up_max_bps,
                )
            )
        latency = cls(source, config.latency.window_ms, autorate)
        latency.window.update(t_ms)
        return latency

    def tick(self, t_ms: int, rates_bps: npt.NDArray[np.float64]) -> list[RateChange]:
        """Snapshot the histograms; the rate changes the controller decided (none when off).

        `rates_bps`: the aggregator's per-slot rates, columns up, down (bit/s)."""
        interval = self.window.update(t_ms)
        if self.autorate is None:
            return []
        wan = interval[abi.RTT_WAN]
        throughput = {"up": float(rates_bps[:, 0].sum()), "down": float(rates_bps[:, 1].sum())}
        return self.autorate.step(
            t_ms, percentile_ms(wan, LINK_EDGES_MS, 0.5), int(wan.sum()), throughput
        )

    def enforce(self, applier: Applier) -> int:
        """Bring the running plan to the controller's rates; returns the shaper's requests."""
        if self.autorate is None:
            return 0
        running = plan = applier.running
        for direction in DIRECTIONS:
            rate = self.autorate.rates_bps[direction]
            if running.adapted_bps.get(direction, running.link.rate_bps(direction)) != rate:
                plan = plan.with_link_rate(direction, rate)
        if plan is running:
            return 0
        return applier.apply(plan, [], [])

    def status(
        self, owners: Mapping[int, str], active: npt.NDArray[np.intp] | None = None
    ) -> dict[str, Any]:
        """The status snapshot's `latency` section; `active`: the slots whose traffic moved."""
        adapt = self.autorate.state() if self.autorate is not None else None
        if owners is not self._owners:  # a new slot table: sort its slots once
            self._owners, self._rows = owners, np.array(sorted(owners), np.intp)
        return latency_view.status_section(self.window, owners, adapt, active, self._rows)

    def metrics(self, owners: Mapping[int, str]) -> Callable[[], list[Any]]:
        """Prometheus families of the cumulative histograms (none before the first interval),
        built when a scrape asks: every tick only takes the arrays (copies, never changed
        afterwards), so the cost follows the scrapes, not the subscriber list."""
        cumulative = self.window.cumulative()
        if cumulative is None:
            return list
        return lambda: list(latency_view.prometheus_families(*cumulative, owners))
