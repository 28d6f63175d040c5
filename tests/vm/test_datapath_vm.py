"""The datapath compiles, loads and counts byte-exactly on the stock kernel."""

from __future__ import annotations

import subprocess
import time

import pytest

from desanet.ebpf import abi
from desanet.gateway.lab import INET_V4, Village
from tests.vm.satlink import IPERF_BASE_PORT, LEO, Gateway, emulate

pytestmark = pytest.mark.vm


def test_counts_equal_what_the_subscriber_saw(sat_gateway: tuple[Village, Gateway]) -> None:
    v, gw = sat_gateway
    emulate(v, LEO)
    sub = v.subscribers[1]
    gw.apply(gw.plan(LEO, "fq_codel", LEO.rtt_ms))
    v.reset_truth(sub)
    before = gw.counters()[sub.index]
    port = str(IPERF_BASE_PORT + sub.index)
    # Below the class ceiling no leaf drops a packet: counted then equals delivered.
    # (Packets a leaf drops after the datapath counted them are the shaper's drops,
    # which billing subtracts.)
    for reverse in (["-R"], []):
        subprocess.run(
            ["ip", "netns", "exec", sub.netns, "iperf3", "-c", INET_V4, "-p", port, "-t", "2",
             "-b", "8M", *reverse],
            check=True,
            capture_output=True,
            timeout=60,
        )  # fmt: skip
    # The last ACKs and FINs are still crossing the emulated link when iperf3 exits.
    time.sleep(1.0)
    counted = dict(zip(abi.COUNTER_FIELDS, gw.counters()[sub.index] - before, strict=True))
    truth = v.truth(sub)
    assert counted["down_bytes"] > 1_000_000
    assert counted["up_bytes"] > 1_000_000
    assert counted == {
        "up_bytes": truth.up_bytes,
        "up_pkts": truth.up_pkts,
        "down_bytes": truth.down_bytes,
        "down_pkts": truth.down_pkts,
    }
