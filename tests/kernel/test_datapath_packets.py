"""The datapath on crafted frames, run inside the kernel with BPF_PROG_TEST_RUN (no NIC).

Each case asserts the exact counter values a frame must leave behind.
"""

from __future__ import annotations

import os
from collections.abc import Iterator

import numpy as np
import pytest

from desanet.ebpf import abi, frames
from desanet.ebpf.bpf_syscall import SkBuff, prog_test_run
from desanet.ebpf.datapath import Datapath
from desanet.gateway.lab import in_netns
from desanet.gateway.lab import run as run_cmd

pytestmark = pytest.mark.kernel

TC_ACT_OK = 0
TC_ACT_SHOT = 2
TC_ACT_UNSPEC = 0xFFFFFFFF  # -1 as the u32 the kernel reports: "on to the next filter"
UP_BYTES, UP_PKTS, DOWN_BYTES, DOWN_PKTS = range(4)

SUB1_V4, SUB2_V4, SUB3_V4 = "10.1.0.7", "10.1.2.3", "10.9.9.9"
SUB_V6 = "2001:db8:77:ab::42"
INTERNET_V4, INTERNET_V6 = "198.51.100.1", "2001:db8:ff::1"


@pytest.fixture
def datapath(netns_pair: tuple[str, str]) -> Iterator[Datapath]:
    netns, dev = netns_pair
    with in_netns(netns):
        dp = Datapath(dev, f"pkt{os.getpid()}", capacity=64)
        dp.attach()
        try:
            dp.provision(1, ["10.1.0.0/16"], down_classid=0x10010, up_classid=0x10020)
            dp.provision(2, ["10.1.2.0/24", "2001:db8:77::/48"], down_classid=0x10011)
            dp.provision(3, ["2001:db8:77:ab::/64"])
            dp.provision(4, ["10.1.2.99", "2001:db8:77:ab::99"])  # hosts inside others' prefixes
            yield dp
        finally:
            dp.detach()


def run(dp: Datapath, prog: str, frame: bytes, skb: SkBuff | None = None) -> tuple[int, int]:
    result = prog_test_run(dp.program_fd(prog), frame, skb=skb)
    return result.retval, result.skb.priority


def counters(dp: Datapath) -> np.ndarray:
    return dp.read_counters()


def test_ipv4_upload_counts_ip_bytes_and_sets_priority(datapath: Datapath) -> None:
    frame, ip_bytes = frames.udp_frame(SUB1_V4, INTERNET_V4, 1500)
    verdict, priority = run(datapath, "desanet_ingress", frame)
    c = counters(datapath)
    assert verdict == TC_ACT_OK
    assert priority == 0x10020
    assert ip_bytes == 1486
    assert c[1].tolist() == [1486, 1, 0, 0]
    assert c.sum() == 1487


def test_ipv4_download_counts_on_destination(datapath: Datapath) -> None:
    frame, ip_bytes = frames.udp_frame(INTERNET_V4, SUB1_V4, 64)
    for _ in range(3):
        verdict, priority = run(datapath, "desanet_egress", frame)
        assert verdict == TC_ACT_OK
        assert priority == 0x10010
    assert counters(datapath)[1].tolist() == [0, 0, 3 * ip_bytes, 3]


def test_longest_prefix_wins(datapath: Datapath) -> None:
    inner, inner_bytes = frames.udp_frame(INTERNET_V4, SUB2_V4, 200)
    outer, outer_bytes = frames.udp_frame(INTERNET_V4, SUB1_V4, 300)
    run(datapath, "desanet_egress", inner)
    run(datapath, "desanet_egress", outer)
    c = counters(datapath)
    assert c[2][DOWN_BYTES] == inner_bytes
    assert c[1][DOWN_BYTES] == outer_bytes


def test_host_addresses_win_over_enclosing_prefixes(datapath: Datapath) -> None:
    v4, b4 = frames.udp_frame(INTERNET_V4, "10.1.2.99", 300)
    v6, b6 = frames.udp_frame(INTERNET_V6, "2001:db8:77:ab::99", 300)
    neighbour, bn = frames.udp_frame(INTERNET_V4, "10.1.2.98", 300)
    for frame in (v4, v6, neighbour):
        run(datapath, "desanet_egress", frame)
    c = counters(datapath)
    assert c[4].tolist() == [0, 0, b4 + b6, 2]
    assert c[2].tolist() == [0, 0, bn, 1]


def test_ipv6_prefix_and_longest_match(datapath: Datapath) -> None:
    in64, b64 = frames.udp_frame(SUB_V6, INTERNET_V6, 700)
    in48, b48 = frames.udp_frame("2001:db8:77:1::9", INTERNET_V6, 900)
    run(datapath, "desanet_ingress", in64)
    run(datapath, "desanet_ingress", in48)
    c = counters(datapath)
    assert c[3].tolist() == [b64, 1, 0, 0]
    assert c[2].tolist() == [b48, 1, 0, 0]
    assert b64 == 700 - 14


def test_vlan_tagged_frame_is_parsed(datapath: Datapath) -> None:
    frame, ip_bytes = frames.udp_frame(SUB1_V4, INTERNET_V4, 400, vlan=42)
    run(datapath, "desanet_ingress", frame)
    assert counters(datapath)[1].tolist() == [ip_bytes, 1, 0, 0]
    assert ip_bytes == 400 - 18


def test_unmatched_traffic_counts_in_slot_zero(datapath: Datapath) -> None:
    frame, ip_bytes = frames.udp_frame(SUB3_V4, INTERNET_V4, 128)
    verdict, priority = run(datapath, "desanet_ingress", frame)
    c = counters(datapath)
    assert verdict == TC_ACT_OK
    assert priority == 0
    assert c[0].tolist() == [ip_bytes, 1, 0, 0]
    assert c[1:].sum() == 0


def test_arp_and_truncated_frames_pass_uncounted(datapath: Datapath) -> None:
    full, _ = frames.udp_frame(SUB1_V4, INTERNET_V4, 100)
    tagged, _ = frames.udp_frame(SUB1_V4, INTERNET_V4, 100, vlan=7)
    tagged6, _ = frames.udp_frame(SUB_V6, INTERNET_V6, 100, vlan=7)
    # BPF_PROG_TEST_RUN refuses untagged IP frames shorter than their IP header,
    # so headers cut short are tested behind a VLAN tag, which it does not parse.
    cases = [
        frames.arp_frame(),
        tagged[: 18 + 10],  # IPv4 header cut short
        tagged6[: 18 + 30],  # IPv6 header cut short
        tagged[:16],  # VLAN tag cut short
        full[:-20],  # IP total length beyond the frame
        frames.ethernet(0x88CC, bytes(46)),  # LLDP
    ]
    for frame in cases:
        for prog in ("desanet_ingress", "desanet_egress"):
            verdict, _ = run(datapath, prog, frame)
            assert verdict == TC_ACT_OK
    assert counters(datapath).sum() == 0


def test_ethernet_padding_is_not_counted(datapath: Datapath) -> None:
    packet = frames.ipv4(SUB1_V4, INTERNET_V4, frames.IPPROTO_UDP, 0)  # 28 IP bytes
    frame = frames.ethernet(frames.ETH_P_IP, packet) + bytes(60 - 14 - len(packet))
    run(datapath, "desanet_ingress", frame)
    assert counters(datapath)[1].tolist() == [28, 1, 0, 0]


def test_gso_super_packet_counts_as_its_segments(datapath: Datapath) -> None:
    # 3 x 1000 bytes of TCP payload (test runs take at most a page): on the wire,
    # three packets of 20 + 20 + 1000 bytes.
    packet = frames.ipv4(INTERNET_V4, SUB1_V4, frames.IPPROTO_TCP, 3 * 1000)
    frame = frames.ethernet(frames.ETH_P_IP, packet)
    run(datapath, "desanet_egress", frame, SkBuff(gso_segs=3, gso_size=1000))
    # The same packet from a device that left gso_segs for the stack to compute.
    run(datapath, "desanet_egress", frame, SkBuff(gso_segs=0, gso_size=1000))
    assert counters(datapath)[1].tolist() == [0, 0, 2 * 3 * (40 + 1000), 6]


def test_gso_ipv6_udp_segments(datapath: Datapath) -> None:
    packet = frames.ipv6(INTERNET_V6, SUB_V6, frames.IPPROTO_UDP, 4 * 700)
    # UDP GSO: the 8-byte UDP header is repeated; the payload splits into 700-byte datagrams.
    frame = frames.ethernet(frames.ETH_P_IPV6, packet)
    run(datapath, "desanet_egress", frame, SkBuff(gso_segs=4, gso_size=700))
    assert counters(datapath)[3].tolist() == [0, 0, 4 * (40 + 8 + 700), 4]


def test_blocked_slot_is_dropped_and_not_billed(datapath: Datapath) -> None:
    datapath.set_slot(1, 0x10010, 0x10020, abi.SLOT_BLOCKED)
    frame, _ = frames.udp_frame(SUB1_V4, INTERNET_V4, 500)
    verdict, _ = run(datapath, "desanet_ingress", frame)
    assert verdict == TC_ACT_SHOT
    assert counters(datapath)[1].sum() == 0


def test_upload_is_redirected_to_the_ifb(datapath: Datapath, netns_pair: tuple[str, str]) -> None:
    netns, dev = netns_pair
    with in_netns(netns):
        steering = Datapath(dev, datapath.gateway_id, capacity=64, upload_ifb="dp1")
        steering.attach()  # re-attach with an upload device; same pins, same counters
        frame, ip_bytes = frames.udp_frame(SUB1_V4, INTERNET_V4, 600)
        verdict, priority = run(steering, "desanet_ingress", frame)
        arp_verdict, _ = run(steering, "desanet_ingress", frames.arp_frame())
        c = steering.read_counters()
    assert verdict == TC_ACT_UNSPEC  # the steering filter's mirred action takes it to the IFB
    assert priority == 0x10020
    assert arp_verdict == TC_ACT_OK
    assert c[1].tolist() == [ip_bytes, 1, 0, 0]
    filters = run_cmd(["tc", "filter", "show", "dev", dev, "ingress"], netns)
    assert "desanet_steer" in filters and "Egress Redirect to device dp1" in filters
    with in_netns(netns):
        Datapath(dev, datapath.gateway_id, capacity=64).attach()  # no upload device any more
    assert "desanet_steer" not in run_cmd(["tc", "filter", "show", "dev", dev, "ingress"], netns)


def test_unprovisioned_slot_falls_back_to_unmatched(datapath: Datapath) -> None:
    datapath.unprovision(1)
    frame, ip_bytes = frames.udp_frame(SUB1_V4, INTERNET_V4, 256)
    verdict, priority = run(datapath, "desanet_ingress", frame)
    assert (verdict, priority) == (TC_ACT_OK, 0)
    assert counters(datapath)[0].tolist() == [ip_bytes, 1, 0, 0]
