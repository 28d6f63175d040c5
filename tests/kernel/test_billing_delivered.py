"""Billed = delivered under overload: a UDP flood into capped subscribers, both directions.

The datapath counts before the HTB queue, so during the flood it sees far
more than the shaper lets through; the DeliveredReader bills what left each
subscriber's class. Download is compared with the nftables counter in the
subscriber's own namespace, upload with a counter by source address on the
internet side: billed must equal delivered within 0.1% while the shaper
drops >= 5%. Both ways of reading the leaves are held to it: every leaf
each poll (a dump), and only the leaves that can have moved (by handle, what
the service does).
"""

from __future__ import annotations

import json
import os
import subprocess
import time

import numpy as np
import pytest

from desanet.cython_ext import load_backend
from desanet.ebpf.datapath import Datapath
from desanet.gateway.lab import INET_V4, in_netns, run, village
from desanet.meter.delivered import DeliveredReader
from desanet.meter.poll import CounterReader
from desanet.shaper.apply import Shaper
from desanet.shaper.plan import Link, SubscriberPlan, build_plan, classids_for_slot

pytestmark = pytest.mark.kernel

M = 1_000_000
FLOOD_S = 4


def _upload_truth(inet_ns: str) -> int:
    data = json.loads(run(["nft", "-j", "list", "counters", "table", "inet", "billtest"], inet_ns))
    return sum(i["counter"]["bytes"] for i in data["nftables"] if "counter" in i)


@pytest.mark.parametrize("leaves", ["moved", "dump"])
def test_udp_flood_billed_equals_delivered(leaves: str) -> None:
    gateway_id = f"bill{os.getpid()}"
    with village(2) as v:
        down_sub, up_sub = v.subscribers
        subprocess.run(
            ["ip", "netns", "exec", v.inet_ns, "nft", "-f", "-"],
            input=(
                "table inet billtest { counter up { }\n"
                "chain input { type filter hook input priority 0; policy accept;\n"
                f'ip saddr {up_sub.ipv4} counter name "up"\n}}\n}}\n'
            ),
            text=True,
            check=True,
        )
        with in_netns(v.gw_ns):
            shaper = Shaper(v.lan)
            shaper.ensure_ifb()
            datapath = Datapath(v.lan, gateway_id, capacity=16, upload_ifb=shaper.upload_ifb)
            datapath.attach()
        try:
            with in_netns(v.gw_ns):
                plans = [
                    SubscriberPlan("s1", 1, M // 2, 2 * M, M // 2, 10 * M),
                    SubscriberPlan("s2", 2, M // 2, 10 * M, M // 2, 1 * M),
                ]
                shaper.apply(build_plan(Link(20 * M, 10 * M), plans, leaf="fq_codel"))
                for sub in v.subscribers:
                    down, up = classids_for_slot(sub.index)
                    datapath.provision(sub.index, [sub.ipv4, sub.ipv6], down, up)
                raw = CounterReader.for_datapath(gateway_id, v.lan)
                by_handle = shaper.class_stats_of if leaves == "moved" else None
                reader = DeliveredReader(raw, shaper.class_stats, by_handle)
                aggregator = load_backend().Aggregator(raw.n_slots)

            def poll() -> None:
                with in_netns(v.gw_ns):
                    aggregator.poll(reader.read(), time.time_ns() // 1_000_000)

            servers = [
                v.popen(v.inet_ns, ["iperf3", "-s", "-1", "-p", str(port)],
                        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
                for port in (5301, 5302)
            ]  # fmt: skip
            time.sleep(0.5)
            base = ["iperf3", "-c", INET_V4, "-u", "-b", "8M", "-l", "1200", "-t", str(FLOOD_S)]
            clients = [
                v.popen(down_sub.netns, [*base, "-p", "5301", "-R"], stdout=subprocess.DEVNULL),
                v.popen(up_sub.netns, [*base, "-p", "5302"], stdout=subprocess.DEVNULL),
            ]
            deadline = time.monotonic() + FLOOD_S + 10
            while any(c.poll() is None for c in clients) and time.monotonic() < deadline:
                poll()
                time.sleep(0.3)
            for proc in (*clients, *servers):
                proc.wait(timeout=10)
            time.sleep(1.0)  # the queues drain: every packet is delivered or dropped by now
            poll()
            totals = aggregator.totals()
            with in_netns(v.gw_ns):
                counted = raw.read().copy()
            delivered_down = v.truth(down_sub).down_bytes
            delivered_up = _upload_truth(v.inet_ns)
        finally:
            with in_netns(v.gw_ns):
                datapath.detach()
                shaper.remove()

    billed_down, billed_up = int(totals[1, 2]), int(totals[2, 0])
    # The flood really overloaded the classes: the datapath saw >= 5% more than was delivered.
    assert counted[1, 2] >= 1.05 * delivered_down
    assert counted[2, 0] >= 1.05 * delivered_up
    assert billed_down == pytest.approx(delivered_down, rel=1e-3)
    assert billed_up == pytest.approx(delivered_up, rel=1e-3)
    assert np.all(totals >= 0)
