"""The aggregator on the real datapath under live traffic: billed deltas add up to the counters.

Polls the pinned counters (by path, no BCC, CPUs summed in the kernel by the
summing program pinned beside them) while iperf3 runs, rolls the polls up
into intervals, restarts from the journaled state halfway as after a kill -9,
and checks that the deltas of every interval sum to the final kernel counters
exactly, and that those equal the IP bytes each subscriber's own namespace
saw (nftables).
"""

from __future__ import annotations

import os
import subprocess
import time

import numpy as np
import pytest

from desanet import cython_ext
from desanet.benchmarks.aggregate import BatchRead
from desanet.ebpf import abi, bpf_syscall
from desanet.ebpf.datapath import Datapath
from desanet.gateway.lab import INET_V4, INET_V6, Village, in_netns
from desanet.meter.poll import CounterReader

pytestmark = pytest.mark.kernel

CAPACITY = 64
# (subscriber, iperf3 client options): both directions, TCP and UDP, IPv4 and IPv6.
TRAFFIC = [
    (0, ["-u", "-b", "20M"]),
    (1, ["-6", "-R"]),
    (2, ["-u", "-b", "20M", "-R"]),
    (3, ["-6"]),
]


def start_traffic(v: Village, seconds: int) -> list[subprocess.Popen[bytes]]:
    for i in range(len(TRAFFIC)):
        v.popen(v.inet_ns, ["iperf3", "-s", "-1", "-p", str(5400 + i)], stdout=subprocess.DEVNULL)
    time.sleep(0.3)
    clients = []
    for i, (sub_index, options) in enumerate(TRAFFIC):
        target = INET_V6 if "-6" in options else INET_V4
        cmd = ["iperf3", "-c", target, "-p", str(5400 + i), "-t", str(seconds), *options]
        clients.append(v.popen(v.subscribers[sub_index].netns, cmd, stdout=subprocess.PIPE))
    return clients


def test_interval_deltas_sum_to_the_final_counters_across_a_restart(village4: Village) -> None:
    v = village4
    with in_netns(v.gw_ns):
        datapath = Datapath(v.lan, f"agg{os.getpid()}", capacity=CAPACITY)
        datapath.attach()
    try:
        with in_netns(v.gw_ns):
            for i, sub in enumerate(v.subscribers):
                datapath.provision(i + 1, [sub.ipv4, sub.ipv6])
        backends = {name: cython_ext.load_backend(name) for name in cython_ext.BACKENDS}
        aggregators = {name: b.Aggregator(CAPACITY + 1) for name, b in backends.items()}
        billed = {name: np.zeros((CAPACITY + 1, 4), dtype=np.uint64) for name in backends}
        intervals_with_traffic = 0

        def roll_up(t_ms: int) -> None:
            nonlocal intervals_with_traffic
            usages = {name: agg.rollup(t_ms) for name, agg in aggregators.items()}
            for name, usage in usages.items():
                columns = [usage.up, usage.up_pkts, usage.down, usage.down_pkts]
                for col, values in enumerate(columns):
                    np.add.at(billed[name][:, col], usage.slots, values)
            intervals_with_traffic += int(usages["cython"].up.sum() > 0)

        pinned = datapath.pin_dir
        reader = CounterReader.open(pinned)
        clients = start_traffic(v, seconds=2)
        polls = 0
        restarted = False
        while any(c.poll() is None for c in clients) or polls < 8:
            cumulative = reader.read()
            polls += 1
            for agg in aggregators.values():
                agg.use_source(reader.identity)
                agg.poll(cumulative, 1_000 * polls)
            if polls % 3 == 0:
                roll_up(1_000 * polls)
                saved = {name: agg.state() for name, agg in aggregators.items()}
            if polls == 7 and not restarted:
                # kill -9 after a poll that was never rolled up: the daemon comes back
                # from the state journaled at the last rollup, with a fresh reader.
                restarted = True
                reader.close()
                reader = CounterReader.open(pinned)
                aggregators = {name: b.Aggregator(CAPACITY + 1) for name, b in backends.items()}
                for name, agg in aggregators.items():
                    agg.restore(saved[name])
            time.sleep(0.1)
        for client in clients:
            assert client.wait(timeout=30) == 0
        time.sleep(0.5)  # the last ACKs and FINs
        polls += 1
        for agg in aggregators.values():
            agg.poll(reader.read(), 1_000 * polls)
        roll_up(1_000 * polls)
        # An independent read of the same map: one batch lookup, summed in userspace.
        counters_fd = bpf_syscall.obj_get(str(pinned / abi.MAP_COUNTERS))
        try:
            batch = BatchRead(counters_fd, CAPACITY + 1, backends["cython"])
            assert batch.read().tolist() == reader.read().tolist()
        finally:
            os.close(counters_fd)
        reader.close()

        with in_netns(v.gw_ns):
            final = datapath.read_counters()
        assert final.tolist() == batch.sums.tolist()
        assert intervals_with_traffic >= 3, "the polls should have seen traffic in flight"
        for name in backends:
            assert billed[name].tolist() == final.tolist(), name
            assert aggregators[name].totals().tolist() == final.tolist(), name
        for i, sub in enumerate(v.subscribers):
            truth = v.truth(sub)
            expected = [truth.up_bytes, truth.up_pkts, truth.down_bytes, truth.down_pkts]
            assert billed["cython"][i + 1].tolist() == expected, f"subscriber {i}"
            assert truth.up_bytes > 0 and truth.down_bytes > 0
    finally:
        with in_netns(v.gw_ns):
            datapath.detach()
