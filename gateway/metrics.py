"""Prometheus metrics of the gateway, served over HTTP by prometheus_client.

Every metric is computed from the latest status snapshot when scraped, so a
scrape never races the service loop. Names (see docs/operations.md):

  desanet_subscriber_bytes_total{subscriber,direction}    delivered IP bytes since provisioning
  desanet_subscriber_packets_total{subscriber,direction}  IP packets since provisioning
  desanet_subscriber_rate_bps{subscriber,direction}       smoothed current rate
  desanet_subscriber_ceiling_bps{subscriber,direction}    enforced plan ceiling
  desanet_subscriber_period_bytes{subscriber}             usage in the current quota period
  desanet_subscriber_quota_bytes{subscriber}              quota in force (absent without one)
  desanet_subscriber_state{subscriber,state}              1 for the current state
  desanet_link_capacity_bps{direction}, desanet_link_rate_bps{direction}
  desanet_link_utilisation_ratio{direction}               rate / capacity
  desanet_leaf_qdisc_info{wanted,in_use}                  1; wanted != in_use means fallback
  desanet_usage_seq                                       last published usage seq
  desanet_subscribers                                     subscribers provisioned
  desanet_control_requests_total{result}                  control requests by ok / refused
  desanet_loop_failures_total{step}                       failed, retried steps of the service loop
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import replace
from typing import Any

from prometheus_client import start_http_server
from prometheus_client.core import CollectorRegistry, CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector

from desanet.gateway.status import StatusSnapshot, decode_rows


class GatewayCollector(Collector):
    """Yields the metrics of the latest snapshot, the control request and loop failure counts."""

    def __init__(self, failures: Mapping[str, int] | None = None) -> None:
        self.snapshot: StatusSnapshot | None = None
        self._rows: Sequence[bytes] | None = None
        self.control_requests = {"ok": 0, "refused": 0}
        # The service loop's live failure counts by step (read at every scrape).
        self.failures: Mapping[str, int] = failures if failures is not None else {}
        # Builds the RTT histogram families (gateway/latency_view.py) when scraped; replaced
        # with every status.
        self.latency: Callable[[], list[Any]] = list

    def update(self, snapshot: StatusSnapshot, rows: Sequence[bytes] | None = None) -> None:
        """Take a new snapshot; `rows`, its subscriber rows as JSON, are decoded at a scrape."""
        self.snapshot, self._rows = snapshot, rows

    def count_request(self, ok: bool) -> None:
        """Count one control request by its outcome."""
        self.control_requests["ok" if ok else "refused"] += 1

    def collect(self) -> Iterator[Any]:
        requests = CounterMetricFamily(
            "desanet_control_requests", "Control requests by result", labels=["result"]
        )
        for result, count in self.control_requests.items():
            requests.add_metric([result], count)
        yield requests
        failures = CounterMetricFamily(
            "desanet_loop_failures",
            "Failed (and retried) steps of the service loop",
            labels=["step"],
        )
        for step, count in sorted(self.failures.items()):
            failures.add_metric([step], count)
        yield failures
        yield from self.latency()
        snap, rows = self.snapshot, self._rows
        if snap is None:
            return
        if rows is not None:
            # Scrapes are rare beside intervals: rows are decoded here, not kept twice.
            snap = replace(snap, subscribers=decode_rows(rows))
        sub_labels = ["subscriber", "direction"]
        byte_total = CounterMetricFamily(
            "desanet_subscriber_bytes", "Delivered IP bytes since provisioning", labels=sub_labels
        )
        pkt_total = CounterMetricFamily(
            "desanet_subscriber_packets", "IP packets since provisioning", labels=sub_labels
        )
        rate = GaugeMetricFamily(
            "desanet_subscriber_rate_bps", "Smoothed current rate, bit/s", labels=sub_labels
        )
        ceiling = GaugeMetricFamily(
            "desanet_subscriber_ceiling_bps", "Enforced plan ceiling, bit/s", labels=sub_labels
        )
        period = GaugeMetricFamily(
            "desanet_subscriber_period_bytes", "Usage in the quota period", labels=["subscriber"]
        )
        quota = GaugeMetricFamily(
            "desanet_subscriber_quota_bytes", "Quota in force", labels=["subscriber"]
        )
        state = GaugeMetricFamily(
            "desanet_subscriber_state", "1 for the current state", labels=["subscriber", "state"]
        )
        for s in snap.subscribers:
            for direction, total, pkts, bps, cap in (
                ("up", s.up_total, s.up_pkts, s.up_bps, s.up_max_bps),
                ("down", s.down_total, s.down_pkts, s.down_bps, s.down_max_bps),
            ):
                byte_total.add_metric([s.id, direction], total)
                pkt_total.add_metric([s.id, direction], pkts)
                rate.add_metric([s.id, direction], bps)
                ceiling.add_metric([s.id, direction], cap)
            period.add_metric([s.id], s.period_bytes)
            if s.quota_bytes is not None:
                quota.add_metric([s.id], s.quota_bytes)
            state.add_metric([s.id, s.state], 1)
        yield from (byte_total, pkt_total, rate, ceiling, period, quota, state)
        capacity = GaugeMetricFamily(
            "desanet_link_capacity_bps", "Uplink capacity, bit/s", labels=["direction"]
        )
        link_rate = GaugeMetricFamily(
            "desanet_link_rate_bps", "Uplink rate, bit/s", labels=["direction"]
        )
        share = GaugeMetricFamily(
            "desanet_link_utilisation_ratio", "Rate over capacity", labels=["direction"]
        )
        for direction, cap_bps, bps in (
            ("down", snap.link_down_bps, snap.down_bps),
            ("up", snap.link_up_bps, snap.up_bps),
        ):
            capacity.add_metric([direction], cap_bps)
            link_rate.add_metric([direction], bps)
            share.add_metric([direction], bps / cap_bps if cap_bps else 0.0)
        yield from (capacity, link_rate, share)
        leaf = GaugeMetricFamily(
            "desanet_leaf_qdisc_info", "Leaf qdisc wanted and in use", labels=["wanted", "in_use"]
        )
        leaf.add_metric([snap.leaf_wanted, snap.leaf_in_use], 1)
        yield leaf
        yield from _unprovisioned(snap)
        yield GaugeMetricFamily("desanet_usage_seq", "Last published usage seq", value=snap.seq)
        yield GaugeMetricFamily(
            "desanet_subscribers", "Subscribers provisioned", value=len(snap.subscribers)
        )


def _unprovisioned(snap: StatusSnapshot) -> Iterator[Any]:
    u = snap.unprovisioned
    if not u:
        return
    carried = CounterMetricFamily(
        "desanet_unprovisioned_bytes",
        "IP bytes of no subscriber carried (billed to nobody)",
        labels=["direction"],
    )
    carried_pkts = CounterMetricFamily(
        "desanet_unprovisioned_packets", "IP packets of no subscriber carried", labels=["direction"]
    )
    for direction in ("up", "down"):
        carried.add_metric([direction], u[f"{direction}_total"])
        carried_pkts.add_metric([direction], u[f"{direction}_pkts"])
    dropped = CounterMetricFamily(
        "desanet_dropped_packets", "Packets the datapath dropped, by reason", labels=["reason"]
    )
    dropped_bytes = CounterMetricFamily(
        "desanet_dropped_bytes", "IP bytes the datapath dropped, by reason", labels=["reason"]
    )
    for key, value in u.items():
        if key.startswith("drop_") and key.endswith("_pkts"):
            reason = key[5:-5]
            dropped.add_metric([reason], value)
            dropped_bytes.add_metric([reason], u[f"drop_{reason}_bytes"])
    yield from (carried, carried_pkts, dropped, dropped_bytes)


def serve(collector: GatewayCollector, host: str, port: int) -> CollectorRegistry:
    """Serve `collector` on http://host:port/metrics from a daemon thread."""
    registry = CollectorRegistry()
    registry.register(collector)
    start_http_server(port, addr=host, registry=registry)
    return registry
