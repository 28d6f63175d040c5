"""Python mirror of ebpf/desanet_abi.h (tests/unit/test_abi.py checks sizes and offsets)."""

import ctypes
from pathlib import Path

HEADER = Path(__file__).with_name("desanet_abi.h")

SLOT_UNMATCHED = 0
DEFAULT_CAPACITY = 65536
PREFIXES_PER_SUBSCRIBER = 4

MAP_SUBSCRIBERS = "subscribers"
MAP_HOSTS = "hosts"
MAP_COUNTERS = "counters"
MAP_SLOTS = "slots"
MAP_SETTINGS = "settings"

SLOT_BLOCKED = 0x1

# Columns of struct desanet_counters, in order; the aggregator reads them by index.
COUNTER_FIELDS = ("up_bytes", "up_pkts", "down_bytes", "down_pkts")


class LpmKey(ctypes.Structure):
    """struct desanet_lpm_key: prefix length and a 16-byte (IPv4-mapped for v4) address."""

    _fields_ = [("prefixlen", ctypes.c_uint32), ("addr", ctypes.c_uint8 * 16)]


class HostKey(ctypes.Structure):
    """struct desanet_host_key: a whole 16-byte (IPv4-mapped for v4) address."""

    _fields_ = [("addr", ctypes.c_uint8 * 16)]


class Counters(ctypes.Structure):
    """struct desanet_counters: delivered IP bytes and packets of one slot on one CPU."""

    _fields_ = [(name, ctypes.c_uint64) for name in COUNTER_FIELDS]


class Slot(ctypes.Structure):
    """struct desanet_slot: HTB classids for skb->priority and flags."""

    _fields_ = [
        ("down_classid", ctypes.c_uint32),
        ("up_classid", ctypes.c_uint32),
        ("flags", ctypes.c_uint32),
        ("reserved", ctypes.c_uint32),
    ]


class Settings(ctypes.Structure):
    """struct desanet_settings: the upload IFB ifindex."""

    _fields_ = [("upload_ifindex", ctypes.c_uint32), ("reserved", ctypes.c_uint32)]


STRUCTS: dict[str, type[ctypes.Structure]] = {
    "desanet_lpm_key": LpmKey,
    "desanet_host_key": HostKey,
    "desanet_counters": Counters,
    "desanet_slot": Slot,
    "desanet_settings": Settings,
}
