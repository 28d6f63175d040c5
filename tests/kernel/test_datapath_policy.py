"""The datapath's rules for traffic of no subscriber and MAC binding, on crafted frames.

Run inside the kernel with BPF_PROG_TEST_RUN (no NIC); each case asserts the
verdict, the slot the bytes were counted in and the drop counted.
"""

from __future__ import annotations

import os
from collections.abc import Iterator

import numpy as np
import pytest

from desanet.ebpf import abi, frames
from desanet.ebpf.bpf_syscall import prog_test_run
from desanet.ebpf.datapath import Datapath, Provision
from desanet.gateway.lab import in_netns
from desanet.gateway.lab import run as run_cmd

pytestmark = pytest.mark.kernel

TC_ACT_OK = 0
TC_ACT_SHOT = 2

GATEWAY_V4 = "192.0.2.1"  # an address of the gateway's own LAN interface
GATEWAY_V6 = "2001:db8:1::1"
SUB_V4, SUB_V6, SUB_V6_PREFIX = "10.1.0.7", "2001:db8:77:ab::42", "2001:db8:77:ab::/64"
SUB_MAC = "02:00:00:00:10:01"
MOBILE_MAC = "02:00:00:00:50:05"  # a subscriber given by MAC alone
STRANGER_MAC = "02:00:00:00:99:99"
NOBODY_V4, NOBODY_V6 = "10.200.0.9", "2001:db8:99::9"
INTERNET_V4, INTERNET_V6 = "198.51.100.1", "2001:db8:ff::1"
SLOT0_DOWN, SLOT0_UP = 0x1000F, 0x2000F


def attach(netns: str, dev: str, gateway_id: str, block: bool) -> Datapath:
    with in_netns(netns):
        dp = Datapath(dev, gateway_id, capacity=64, block_unprovisioned=block)
        dp.attach()
    return dp


@pytest.fixture
def lan(netns_pair: tuple[str, str]) -> tuple[str, str]:
    netns, dev = netns_pair
    run_cmd(["ip", "addr", "add", f"{GATEWAY_V4}/24", "dev", dev], netns)
    return netns, dev


@pytest.fixture
def blocking(lan: tuple[str, str]) -> Iterator[Datapath]:
    netns, dev = lan
    dp = attach(netns, dev, f"pol{os.getpid()}", block=True)
    try:
        dp.provision_many(
            [
                Provision(1, ("10.1.0.0/16", SUB_V6_PREFIX), 0x10010, 0x20010, 0, (SUB_MAC,)),
                Provision(5, (), 0x10014, 0x20014, 0, (MOBILE_MAC,)),
            ]
        )
        dp.set_slot(0, SLOT0_DOWN, SLOT0_UP)
        yield dp
    finally:
        dp.detach()


def up(dp: Datapath, src: str, dst: str, mac: str, dst_mac: str = frames.DST_MAC) -> int:
    frame, _ = frames.udp_frame(src, dst, 300, src_mac=mac, dst_mac=dst_mac)
    return prog_test_run(dp.program_fd("desanet_ingress"), frame).retval


def down(dp: Datapath, src: str, dst: str, mac: str) -> int:
    frame, _ = frames.udp_frame(src, dst, 300, src_mac=frames.DST_MAC, dst_mac=mac)
    return prog_test_run(dp.program_fd("desanet_egress"), frame).retval


IP_BYTES = 300 - 14  # every frame here is 300 bytes of Ethernet


def counters(dp: Datapath) -> np.ndarray:
    return dp.read_counters()


def test_unprovisioned_traffic_is_dropped_and_counted_as_such(blocking: Datapath) -> None:
    assert up(blocking, NOBODY_V4, INTERNET_V4, STRANGER_MAC) == TC_ACT_SHOT
    assert up(blocking, NOBODY_V6, INTERNET_V6, STRANGER_MAC) == TC_ACT_SHOT
    assert down(blocking, INTERNET_V4, NOBODY_V4, STRANGER_MAC) == TC_ACT_SHOT
    assert counters(blocking).sum() == 0  # billed to no one, not even slot 0
    drops = blocking.read_drops()
    assert drops["unprovisioned"] == (3, 3 * IP_BYTES)
    assert drops["blocked"] == drops["mac_mismatch"] == (0, 0)


def test_traffic_with_the_gateway_itself_always_passes(blocking: Datapath) -> None:
    # DHCP discover: from 0.0.0.0 to the broadcast address and MAC.
    discover = up(blocking, "0.0.0.0", "255.255.255.255", STRANGER_MAC, frames.BROADCAST_MAC)
    dns = up(blocking, NOBODY_V4, GATEWAY_V4, STRANGER_MAC)  # unicast to the gateway
    offer = down(blocking, GATEWAY_V4, NOBODY_V4, STRANGER_MAC)  # the gateway's reply
    solicit = up(blocking, "fe80::99", "ff02::1:ff00:1", STRANGER_MAC, "33:33:ff:00:00:01")
    link_local = down(blocking, "fe80::1", "fe80::99", STRANGER_MAC)
    assert [discover, dns, offer, solicit, link_local] == [TC_ACT_OK] * 5
    c = counters(blocking)
    assert c[0].tolist() == [3 * IP_BYTES, 3, 2 * IP_BYTES, 2]
    assert c[1:].sum() == 0
    assert blocking.read_drops()["unprovisioned"] == (0, 0)


def test_gateway_traffic_of_a_blocked_subscriber_passes_unbilled(blocking: Datapath) -> None:
    blocking.set_slot(1, 0x10010, 0x20010, abi.SLOT_BLOCKED | abi.SLOT_MAC_BOUND)
    assert up(blocking, SUB_V4, INTERNET_V4, SUB_MAC) == TC_ACT_SHOT
    assert up(blocking, SUB_V4, GATEWAY_V4, SUB_MAC) == TC_ACT_OK
    c = counters(blocking)
    assert c[1].sum() == 0
    assert c[0].tolist() == [IP_BYTES, 1, 0, 0]
    assert blocking.read_drops()["blocked"] == (1, IP_BYTES)


def test_a_bound_address_from_another_mac_is_dropped_and_counted(blocking: Datapath) -> None:
    assert up(blocking, SUB_V4, INTERNET_V4, STRANGER_MAC) == TC_ACT_SHOT
    assert up(blocking, SUB_V6, INTERNET_V6, STRANGER_MAC) == TC_ACT_SHOT
    assert up(blocking, SUB_V4, INTERNET_V4, MOBILE_MAC) == TC_ACT_SHOT  # another subscriber's
    assert up(blocking, SUB_V4, INTERNET_V4, SUB_MAC) == TC_ACT_OK
    c = counters(blocking)
    assert c[1].tolist() == [IP_BYTES, 1, 0, 0]
    assert c[5].sum() == c[0].sum() == 0
    assert blocking.read_drops()["mac_mismatch"] == (3, 3 * IP_BYTES)


def test_a_mac_only_subscriber_is_followed_across_addresses(blocking: Datapath) -> None:
    leases = ("10.50.0.20", "10.50.0.77")  # one DHCP lease, then another
    for lease in leases:
        assert up(blocking, lease, INTERNET_V4, MOBILE_MAC) == TC_ACT_OK
        assert down(blocking, INTERNET_V4, lease, MOBILE_MAC) == TC_ACT_OK
    privacy = "2001:db8:5:0:8d1c:2f0e:aa41:9b03"  # a new SLAAC privacy address
    assert up(blocking, privacy, INTERNET_V6, MOBILE_MAC) == TC_ACT_OK
    assert down(blocking, INTERNET_V6, privacy, MOBILE_MAC) == TC_ACT_OK
    # Its DHCP discover and ND from link-local are talk with the gateway: slot 0, not billed.
    assert up(blocking, "0.0.0.0", "255.255.255.255", MOBILE_MAC, frames.BROADCAST_MAC) == TC_ACT_OK
    assert up(blocking, "fe80::5", "ff02::2", MOBILE_MAC, "33:33:00:00:00:02") == TC_ACT_OK
    c = counters(blocking)
    assert c[5].tolist() == [3 * IP_BYTES, 3, 3 * IP_BYTES, 3]
    assert c[0].tolist() == [2 * IP_BYTES, 2, 0, 0]
    assert c[1].sum() == 0
    assert blocking.read_drops()["unprovisioned"] == (0, 0)


def test_suspension_holds_whatever_address_the_device_picks(blocking: Datapath) -> None:
    blocking.set_slot(5, 0x10014, 0x20014, abi.SLOT_BLOCKED)
    blocking.set_slot(1, 0x10010, 0x20010, abi.SLOT_BLOCKED | abi.SLOT_MAC_BOUND)
    assert up(blocking, "10.50.0.99", INTERNET_V4, MOBILE_MAC) == TC_ACT_SHOT
    assert up(blocking, NOBODY_V4, INTERNET_V4, SUB_MAC) == TC_ACT_SHOT  # moved off its prefix
    assert down(blocking, INTERNET_V4, NOBODY_V4, SUB_MAC) == TC_ACT_SHOT
    assert counters(blocking).sum() == 0
    assert blocking.read_drops()["blocked"] == (3, 3 * IP_BYTES)


def test_withdrawn_macs_no_longer_match(blocking: Datapath) -> None:
    blocking.provision_many([Provision(5, ("10.50.0.0/24",), 0x10014, 0x20014)])
    assert blocking.macs() == {1: [SUB_MAC]}
    assert up(blocking, "10.60.0.1", INTERNET_V4, MOBILE_MAC) == TC_ACT_SHOT
    blocking.unprovision(1)
    assert blocking.macs() == {}
    assert up(blocking, "10.60.0.1", INTERNET_V4, SUB_MAC) == TC_ACT_SHOT
    assert blocking.read_drops()["unprovisioned"] == (2, 2 * IP_BYTES)


def test_allowed_unprovisioned_traffic_takes_slot_zeros_class(lan: tuple[str, str]) -> None:
    netns, dev = lan
    dp = attach(netns, dev, f"pola{os.getpid()}", block=False)
    try:
        dp.set_slot(0, SLOT0_DOWN, SLOT0_UP)
        frame, ip_bytes = frames.udp_frame(NOBODY_V4, INTERNET_V4, 300, src_mac=STRANGER_MAC)
        result = prog_test_run(dp.program_fd("desanet_ingress"), frame)
        assert (result.retval, result.skb.priority) == (TC_ACT_OK, SLOT0_UP)
        assert dp.read_counters()[0].tolist() == [ip_bytes, 1, 0, 0]
        assert dp.read_drops()["unprovisioned"] == (0, 0)
    finally:
        dp.detach()
