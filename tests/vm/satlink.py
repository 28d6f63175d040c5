"""A village gateway behind an emulated satellite link, run as the product runs it.

The lab village (gateway.lab) gets netem on both ends of its WAN veth: the
internet side delays and rate-limits the download, the gateway's WAN port the
upload, half the round trip each. The gateway namespace runs the real datapath
(eBPF, attached to the LAN bridge) and the real shaper (HTB trees on the LAN
and on the upload IFB, leaves as planned), with one subscriber per lab host.

Measurements are what a subscriber would see: ping RTTs from a subscriber's
namespace, and delivered download bytes from the datapath's own counters.
"""

from __future__ import annotations

import re
import statistics
import subprocess
import time
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from desanet.ebpf import abi
from desanet.ebpf.datapath import Datapath
from desanet.gateway.lab import INET_V4, SubscriberHost, Village, in_netns, run
from desanet.shaper.apply import ApplyResult, Shaper, upload_ifb_name
from desanet.shaper.plan import Link, ShapingPlan, SubscriberPlan, build_plan, classids_for_slot

GATEWAY_ID = "vm-tier"
IPERF_BASE_PORT = 5201
# netem holds every packet in flight on its half of the path: room for 4 BDPs at 50 Mbit/s.
NETEM_LIMIT_PKTS = 20_000
_RTT = re.compile(r"time=([0-9.]+) ms")
_DOWN_BYTES = abi.COUNTER_FIELDS.index("down_bytes")


@dataclass(frozen=True)
class SatLink:
    """An emulated satellite path: round-trip time and the modem's rates."""

    name: str
    rtt_ms: float
    down_bps: int
    up_bps: int


GEO = SatLink("GEO", 600.0, 20_000_000, 5_000_000)
LEO = SatLink("LEO", 40.0, 50_000_000, 10_000_000)


def emulate(v: Village, link: SatLink) -> None:
    """Put (or replace) the satellite's delay and rates on the WAN veth."""
    half = f"{link.rtt_ms / 2:g}ms"
    for netns, dev, rate in ((v.inet_ns, "uplink", link.down_bps), (v.gw_ns, v.wan, link.up_bps)):
        run(
            [
                "tc", "qdisc", "replace", "dev", dev, "root", "netem",
                "delay", half, "rate", f"{rate}bit", "limit", str(NETEM_LIMIT_PKTS),
            ],
            netns,
        )  # fmt: skip


class Gateway:
    """The datapath and shaper of a lab village's gateway, one subscriber per lab host."""

    def __init__(self, v: Village) -> None:
        self.v = v
        self.shaper = Shaper(v.lan, upload_ifb_name(v.lan))
        self.datapath: Datapath | None = None

    def start(self) -> None:
        """Create the upload IFB, attach the datapath steering upload to it, provision everyone."""
        with in_netns(self.v.gw_ns):
            self.shaper.ensure_ifb()
            datapath = Datapath(
                self.v.lan,
                GATEWAY_ID,
                capacity=64,
                upload_ifb=self.shaper.upload_ifb,
            )
            datapath.attach()
            self.datapath = datapath
            for sub in self.v.subscribers:
                down, up = classids_for_slot(sub.index)
                datapath.provision(sub.index, [sub.ipv4, sub.ipv6], down, up)

    def stop(self) -> None:
        """Detach the datapath and remove both shaping trees (and the IFB)."""
        with in_netns(self.v.gw_ns):
            if self.datapath is not None:
                self.datapath.detach()
                self.datapath = None
            self.shaper.remove()

    def plan(self, link: SatLink, leaf: str, rtt_ms: float) -> ShapingPlan:
        """Equal shares: each subscriber is guaranteed 1/n of the shaped link, ceiling the link."""
        shaped = Link(link.down_bps, link.up_bps)
        n = len(self.v.subscribers)
        subs = [
            SubscriberPlan(
                id=f"s{sub.index:03d}",
                slot=sub.index,
                down_min_bps=shaped.shaped_bps("down") * 9 // (10 * n),
                down_max_bps=link.down_bps,
                up_min_bps=shaped.shaped_bps("up") * 9 // (10 * n),
                up_max_bps=link.up_bps,
            )
            for sub in self.v.subscribers
        ]
        return build_plan(shaped, subs, leaf=leaf, rtt_ms=rtt_ms)

    def apply(self, plan: ShapingPlan) -> ApplyResult:
        """Apply a plan through the shaper (only the operations that differ)."""
        with in_netns(self.v.gw_ns):
            return self.shaper.apply(plan)

    def counters(self) -> np.ndarray:
        """The datapath's cumulative counters, (slots, abi.COUNTER_FIELDS)."""
        if self.datapath is None:
            raise RuntimeError("the gateway is not started")
        with in_netns(self.v.gw_ns):
            return self.datapath.read_counters().astype(np.int64)

    def down_bytes(self) -> np.ndarray:
        """Delivered download IP bytes per slot so far (index = slot)."""
        return self.counters()[:, _DOWN_BYTES]


def start_servers(v: Village) -> None:
    """One iperf3 server per subscriber on the internet side, for the whole lab's life."""
    for sub in v.subscribers:
        v.popen(
            v.inet_ns,
            ["iperf3", "-s", "-p", str(IPERF_BASE_PORT + sub.index)],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
    time.sleep(0.5)


def start_downloads(
    v: Village, subs: Sequence[SubscriberHost], seconds: float, streams: int = 2
) -> list[subprocess.Popen[bytes]]:
    """Greedy TCP downloads (iperf3 -R) into each of `subs` for `seconds`."""
    procs = []
    for sub in subs:
        cmd = ["iperf3", "-c", INET_V4, "-p", str(IPERF_BASE_PORT + sub.index), "-R"]
        cmd += ["-t", f"{seconds:g}", "-P", str(streams), "--connect-timeout", "5000"]
        procs.append(v.popen(sub.netns, cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))
    return procs


def finish(procs: Sequence[subprocess.Popen[bytes]], timeout_s: float = 30.0) -> None:
    """Wait for traffic generators started with `start_downloads`."""
    for proc in procs:
        proc.wait(timeout=timeout_s)


def ping_rtts_ms(
    v: Village, sub: SubscriberHost, seconds: float, interval_s: float = 0.2
) -> list[float]:
    """RTT samples of pings from `sub` to the internet host during `seconds`."""
    count = max(1, int(seconds / interval_s))
    proc = subprocess.run(
        ["ip", "netns", "exec", sub.netns, "ping", "-n", "-i", f"{interval_s:g}", "-c", str(count),
         "-W", "3", INET_V4],
        capture_output=True,
        text=True,
        timeout=seconds + 30,
    )  # fmt: skip
    return [float(m) for m in _RTT.findall(proc.stdout)]


def median(values: Sequence[float]) -> float:
    """Median of the samples; NaN when there are none (every ping lost)."""
    return statistics.median(values) if values else float("nan")


def jain(rates: Sequence[float]) -> float:
    """Jain's fairness index: 1.0 when every share is equal, 1/n when one takes all."""
    total = sum(rates)
    squares = sum(r * r for r in rates)
    return total * total / (len(rates) * squares) if squares else 0.0
