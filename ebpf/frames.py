"""Crafted Ethernet frames for BPF_PROG_TEST_RUN: the datapath's tests and benchmark feed these.

Each builder returns the frame and the IP bytes it carries (what the datapath
must count for it when it is not a GSO packet).
"""

from __future__ import annotations

import ipaddress
import struct

ETH_P_IP = 0x0800
ETH_P_IPV6 = 0x86DD
ETH_P_ARP = 0x0806
ETH_P_8021Q = 0x8100
IPPROTO_TCP = 6
IPPROTO_UDP = 17

SRC_MAC = "02:00:00:00:00:01"
DST_MAC = "02:00:00:00:00:02"
BROADCAST_MAC = "ff:ff:ff:ff:ff:ff"


def _mac(text: str) -> bytes:
    return bytes.fromhex(text.replace(":", ""))


def _checksum(data: bytes) -> int:
    if len(data) % 2:
        data += b"\0"
    total = sum(struct.unpack(f"!{len(data) // 2}H", data))
    while total >> 16:
        total = (total & 0xFFFF) + (total >> 16)
    return ~total & 0xFFFF


def ethernet(
    ethertype: int,
    payload: bytes,
    vlan: int | None = None,
    src_mac: str = SRC_MAC,
    dst_mac: str = DST_MAC,
) -> bytes:
    """An Ethernet frame, with one 802.1Q tag when `vlan` is given."""
    header = _mac(dst_mac) + _mac(src_mac)
    if vlan is not None:
        header += struct.pack("!HH", ETH_P_8021Q, vlan & 0x0FFF)
    return header + struct.pack("!H", ethertype) + payload


def l4(proto: int, payload_len: int) -> bytes:
    """A TCP (20-byte header) or UDP header followed by `payload_len` zero bytes."""
    if proto == IPPROTO_TCP:
        # ports, seq, ack, data offset 5 words, ACK flag, window, checksum, urgent
        header = struct.pack("!HHIIBBHHH", 40000, 5201, 1, 1, 5 << 4, 0x10, 65535, 0, 0)
    else:
        header = struct.pack("!HHHH", 40000, 5201, 8 + payload_len, 0)
    return header + bytes(payload_len)


def ipv4(src: str, dst: str, proto: int = IPPROTO_UDP, payload_len: int = 18) -> bytes:
    """An IPv4 packet (20-byte header) carrying a TCP/UDP segment."""
    body = l4(proto, payload_len)
    header = struct.pack(
        "!BBHHHBBH4s4s",
        0x45,
        0,
        20 + len(body),
        1,
        0,
        64,
        proto,
        0,
        ipaddress.IPv4Address(src).packed,
        ipaddress.IPv4Address(dst).packed,
    )
    header = header[:10] + struct.pack("!H", _checksum(header)) + header[12:]
    return header + body


def ipv6(src: str, dst: str, proto: int = IPPROTO_UDP, payload_len: int = 18) -> bytes:
    """An IPv6 packet (no extension headers) carrying a TCP/UDP segment."""
    body = l4(proto, payload_len)
    header = struct.pack(
        "!IHBB16s16s",
        6 << 28,
        len(body),
        proto,
        64,
        ipaddress.IPv6Address(src).packed,
        ipaddress.IPv6Address(dst).packed,
    )
    return header + body


def udp_frame(
    src: str,
    dst: str,
    frame_len: int,
    vlan: int | None = None,
    src_mac: str = SRC_MAC,
    dst_mac: str = DST_MAC,
) -> tuple[bytes, int]:
    """A UDP frame of exactly `frame_len` bytes; returns (frame, IP bytes it carries)."""
    v6 = ipaddress.ip_address(src).version == 6
    overhead = 14 + (4 if vlan is not None else 0) + (40 if v6 else 20) + 8
    if frame_len < overhead:
        raise ValueError(f"a frame of {frame_len} bytes cannot hold the headers ({overhead})")
    payload = frame_len - overhead
    packet = ipv6(src, dst, IPPROTO_UDP, payload) if v6 else ipv4(src, dst, IPPROTO_UDP, payload)
    ethertype = ETH_P_IPV6 if v6 else ETH_P_IP
    return ethernet(ethertype, packet, vlan, src_mac, dst_mac), len(packet)


def tcp_frame(
    src: str,
    dst: str,
    *,
    tsval: int | None = None,
    tsecr: int = 0,
    sport: int = 40000,
    dport: int = 443,
    payload_len: int = 0,
) -> bytes:
    """A TCP ACK segment; with `tsval`, the timestamp option laid out as Linux sends it
    (NOP, NOP, TS: RFC 7323 appendix A)."""
    options = b"" if tsval is None else struct.pack("!BBBBII", 1, 1, 8, 10, tsval, tsecr)
    doff = (20 + len(options)) // 4
    segment = (
        struct.pack("!HHIIBBHHH", sport, dport, 1, 1, doff << 4, 0x10, 65535, 0, 0)
        + options
        + bytes(payload_len)
    )
    v6 = ipaddress.ip_address(src).version == 6
    if v6:
        header = struct.pack(
            "!IHBB16s16s",
            6 << 28,
            len(segment),
            IPPROTO_TCP,
            64,
            ipaddress.IPv6Address(src).packed,
            ipaddress.IPv6Address(dst).packed,
        )
        return ethernet(ETH_P_IPV6, header + segment)
    header = struct.pack(
        "!BBHHHBBH4s4s",
        0x45,
        0,
        20 + len(segment),
        1,
        0,
        64,
        IPPROTO_TCP,
        0,
        ipaddress.IPv4Address(src).packed,
        ipaddress.IPv4Address(dst).packed,
    )
    header = header[:10] + struct.pack("!H", _checksum(header)) + header[12:]
    return ethernet(ETH_P_IP, header + segment)


def arp_frame() -> bytes:
    """An ARP request (not IP: the datapath must pass it uncounted)."""
    sender = _mac(SRC_MAC) + bytes(4)
    body = struct.pack("!HHBBH", 1, ETH_P_IP, 6, 4, 1) + sender + bytes(6) + bytes(4)
    return ethernet(ETH_P_ARP, body)
