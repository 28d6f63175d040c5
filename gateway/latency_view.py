"""Latency where operators look: the status section, its lines in `desanet status`, Prometheus.

The service reads the datapath's RTT histograms through `RttWindow`
(meter/latency.py) every interval; this module turns a window into the
`latency` part of the status snapshot (p50/p95 per subscriber and for the
link, WAN and LAN, and the adaptive link rate's state when it runs) and the
cumulative histograms into Prometheus histogram families.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from typing import Any

import numpy as np
import numpy.typing as npt
from prometheus_client.core import HistogramMetricFamily

from desanet.ebpf import abi
from desanet.meter.latency import RttSummary, RttWindow
from desanet.units import format_rate

# Prometheus bucket bounds (le, seconds). The link's 1 ms histogram is summed into these;
# per subscriber the datapath's half-octave buckets are summed into octaves.
LINK_BOUNDS_MS = (5, 10, 20, 40, 60, 80, 100, 150, 200, 300, 400, 500, 600, 700, 800, 1000, 1500)
SUB_EDGE_BUCKETS = tuple(range(2, abi.RTT_SLOT_BUCKETS, 2))  # upper edges: 1.024 ms .. 1.05 s


def status_section(
    window: RttWindow,
    owners: Mapping[int, str],
    adapt: Mapping[str, Any] | None,
    active: npt.NDArray[np.intp] | None = None,
    rows: npt.NDArray[np.intp] | None = None,
) -> dict[str, Any]:
    """The snapshot's `latency`: the window, the link's and each subscriber's p50/p95 (ms).

    `active`: the slots whose traffic moved (RttWindow.slots reads only those again);
    `rows`: the owners' slots, ascending, when the caller keeps them."""

    def shown(summaries: Mapping[str, RttSummary]) -> dict[str, Any]:
        return {d: s.as_dict() for d, s in summaries.items() if s.samples}

    subscribers = {
        owners[slot]: shown(summaries)
        for slot, summaries in window.slots(
            sorted(owners) if rows is None else rows, active
        ).items()
    }
    section: dict[str, Any] = {
        "window_s": window.window_ms // 1000,
        "link": shown(window.link()),
        "subscribers": subscribers,
    }
    if adapt is not None:
        section["adapt"] = dict(adapt)
    return section


def _pair(entry: Mapping[str, Any]) -> str:
    return f"{entry['p50_ms']:.0f}/{entry['p95_ms']:.0f} ms ({entry['samples']})"


def render_lines(latency: Mapping[str, Any]) -> list[str]:
    """`desanet status` lines for the snapshot's `latency` (none when it has no samples)."""
    if not latency:
        return []
    lines = []
    link = latency.get("link", {})
    window = latency.get("window_s", 0)
    parts = [f"{d} {_pair(link[d])}" for d in abi.RTT_DIRECTIONS if d in link]
    lines.append(
        f"rtt p50/p95 (samples), last {window}s: link "
        + (", ".join(parts) if parts else "no TCP timestamps seen")
    )
    for sub_id, dirs in sorted(latency.get("subscribers", {}).items()):
        parts = [f"{d} {_pair(dirs[d])}" for d in abi.RTT_DIRECTIONS if d in dirs]
        lines.append(f"rtt {sub_id}: " + ", ".join(parts))
    adapt = latency.get("adapt")
    if adapt:
        lines.append(
            f"adaptive link rate: down {format_rate(adapt['down_bps'])}, "
            f"up {format_rate(adapt['up_bps'])}; wan baseline {adapt['baseline_ms']:.0f} ms, "
            f"{adapt['changes']} changes"
        )
    return lines


def prometheus_families(
    link: npt.NDArray[np.uint64],
    rows: npt.NDArray[np.intp],
    slots: npt.NDArray[np.uint32],
    owners: Mapping[int, str],
) -> Iterator[Any]:
    """Histograms of the cumulative RTT samples: the link's, and each subscriber's by
    direction (`slots[k]` holds the counts of slot `rows[k]`)."""
    link_family = HistogramMetricFamily(
        "desanet_link_rtt_seconds",
        "Passive RTT of the link from TCP timestamps (wan: via the internet, lan: to devices)",
        labels=["direction"],
    )
    for i, direction in enumerate(abi.RTT_DIRECTIONS):
        running = np.cumsum(link[i].astype(np.float64))
        buckets = [(f"{ms / 1000:g}", float(running[ms - 1])) for ms in LINK_BOUNDS_MS]
        buckets.append(("+Inf", float(running[-1])))
        link_family.add_metric([direction], buckets, None)
    yield link_family
    sub_family = HistogramMetricFamily(
        "desanet_subscriber_rtt_seconds",
        "Passive RTT of a subscriber's TCP flows (wan: via the internet, lan: to its devices)",
        labels=["subscriber", "direction"],
    )
    for k, slot in enumerate(rows.tolist()):
        sub_id = owners.get(slot)
        if sub_id is None:
            continue
        for i, direction in enumerate(abi.RTT_DIRECTIONS):
            running = np.cumsum(slots[k, i].astype(np.float64))
            if not running[-1]:
                continue
            buckets = [
                (f"{abi.rtt_slot_bucket_lower_us(b) / 1e6:g}", float(running[b - 1]))
                for b in SUB_EDGE_BUCKETS
            ]
            buckets.append(("+Inf", float(running[-1])))
            sub_family.add_metric([sub_id, direction], buckets, None)
    yield sub_family
