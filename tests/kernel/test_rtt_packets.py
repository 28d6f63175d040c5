"""Passive RTT in the datapath on crafted TCP frames, run inside the kernel (BPF_PROG_TEST_RUN).

A TSval, then its echo a known time later, must leave exactly one sample in
the right slot, direction and bucket; nothing else may.
"""

from __future__ import annotations

import os
import time
from collections.abc import Iterator

import numpy as np
import pytest

from desanet.ebpf import abi, frames
from desanet.ebpf.bpf_syscall import prog_test_run
from desanet.ebpf.datapath import Datapath
from desanet.gateway.lab import in_netns
from desanet.meter.latency import RttReader

pytestmark = pytest.mark.kernel

SUB, SUB_V6 = "10.1.0.7", "2001:db8:77:ab::42"
INTERNET, INTERNET_V6 = "198.51.100.1", "2001:db8:ff::1"
WAN, LAN = abi.RTT_WAN, abi.RTT_LAN
DELAY_S = 0.03


@pytest.fixture
def datapath(netns_pair: tuple[str, str]) -> Iterator[Datapath]:
    netns, dev = netns_pair
    with in_netns(netns):
        dp = Datapath(dev, f"rtt{os.getpid()}", capacity=8)
        dp.attach()
        try:
            dp.provision(3, ["10.1.0.0/16", "2001:db8:77::/48"])
            yield dp
        finally:
            dp.detach()


def send(dp: Datapath, prog: str, frame: bytes) -> None:
    assert prog_test_run(dp.program_fd(prog), frame).retval == 0


def samples(dp: Datapath) -> tuple[np.ndarray, np.ndarray]:
    with RttReader(dp.pin_dir) as reader:
        return reader.read_slots(), reader.read_link()


def test_upload_tsval_echoed_from_the_internet_is_one_wan_sample(datapath: Datapath) -> None:
    send(datapath, "desanet_ingress", frames.tcp_frame(SUB, INTERNET, tsval=1000, tsecr=0))
    time.sleep(DELAY_S)
    echo = frames.tcp_frame(INTERNET, SUB, tsval=5000, tsecr=1000, sport=443, dport=40000)
    send(datapath, "desanet_egress", echo)
    send(datapath, "desanet_egress", echo)  # a second echo of the same TSval: no sample
    slots, link = samples(datapath)
    assert slots[3, WAN].sum() == 1 and slots.sum() == 1
    ms = int(np.flatnonzero(link[WAN])[0])
    assert link.sum() == 1
    assert DELAY_S * 1000 <= ms < DELAY_S * 1000 + 20
    bucket = int(np.flatnonzero(slots[3, WAN])[0])
    assert abi.rtt_slot_bucket_lower_us(bucket) <= ms * 1000 + 999
    assert bucket == abi.rtt_slot_bucket(ms * 1000) or bucket == abi.rtt_slot_bucket(
        ms * 1000 + 999
    )


def test_download_tsval_echoed_by_the_subscriber_is_one_lan_sample_ipv6(
    datapath: Datapath,
) -> None:
    data = frames.tcp_frame(
        INTERNET_V6, SUB_V6, tsval=77, tsecr=0, sport=443, dport=50000, payload_len=1000
    )
    send(datapath, "desanet_egress", data)
    send(datapath, "desanet_egress", data)  # a retransmission: its first sighting counts
    time.sleep(DELAY_S)
    ack = frames.tcp_frame(SUB_V6, INTERNET_V6, tsval=9, tsecr=77, sport=50000, dport=443)
    send(datapath, "desanet_ingress", ack)
    send(datapath, "desanet_ingress", ack)
    slots, link = samples(datapath)
    assert slots[3, LAN].sum() == 1 and slots.sum() == 1
    assert link[LAN].sum() == 1 and link.sum() == 1
    assert int(np.flatnonzero(link[LAN])[0]) >= DELAY_S * 1000


def test_one_outstanding_timestamp_per_direction(datapath: Datapath) -> None:
    # Three TSvals while the first is outstanding: only the first is timed; echoes
    # of the others find nothing, and an echo past the first drops it untimed.
    for tsval in (10, 11, 12):
        send(datapath, "desanet_ingress", frames.tcp_frame(SUB, INTERNET, tsval=tsval))
    for tsecr in (12, 11, 10):
        send(
            datapath,
            "desanet_egress",
            frames.tcp_frame(INTERNET, SUB, tsval=1, tsecr=tsecr, sport=443, dport=40000),
        )
    slots, link = samples(datapath)
    assert slots.sum() == 0 and link.sum() == 0
    # A new TSval is recorded again once none is outstanding, and timed once.
    send(datapath, "desanet_ingress", frames.tcp_frame(SUB, INTERNET, tsval=13))
    send(
        datapath,
        "desanet_egress",
        frames.tcp_frame(INTERNET, SUB, tsval=2, tsecr=13, sport=443, dport=40000),
    )
    slots, link = samples(datapath)
    assert slots[3, WAN].sum() == 1 and link[WAN].sum() == 1 and link.sum() == 1


def test_flows_without_timestamps_and_other_flows_give_no_sample(datapath: Datapath) -> None:
    send(datapath, "desanet_ingress", frames.tcp_frame(SUB, INTERNET))
    send(datapath, "desanet_egress", frames.tcp_frame(INTERNET, SUB, sport=443, dport=40000))
    send(datapath, "desanet_ingress", frames.tcp_frame(SUB, INTERNET, tsval=500))
    # The same TSecr on another flow (other port) is not this flow's echo.
    send(
        datapath,
        "desanet_egress",
        frames.tcp_frame(INTERNET, SUB, tsval=1, tsecr=500, sport=80, dport=40000),
    )
    slots, link = samples(datapath)
    assert slots.sum() == 0 and link.sum() == 0
