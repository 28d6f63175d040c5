"""Python mirror of ebpf/desanet_abi.h (tests/unit/test_abi.py checks sizes and offsets)."""

import ctypes
import enum
from pathlib import Path

HEADER = Path(__file__).with_name("desanet_abi.h")
BPFFS = Path("/sys/fs/bpf")

SLOT_UNMATCHED = 0
DEFAULT_CAPACITY = 65536
PREFIXES_PER_SUBSCRIBER = 4
MACS_PER_SUBSCRIBER = 4
GATEWAY_ADDRS_MAX = 256

MAP_SUBSCRIBERS = "subscribers"
MAP_HOSTS = "hosts"
MAP_COUNTERS = "counters"
MAP_SLOTS = "slots"
MAP_SETTINGS = "settings"
MAP_COUNTER_SUMS = "counter_sums"
PROG_SUM_COUNTERS = "sum_counters"
MAP_MACS = "macs"
MAP_GATEWAY_ADDRS = "gateway_addrs"
MAP_DROPS = "drops"
MAP_RTT_FLOWS = "rtt_flows"
MAP_RTT_SLOTS = "rtt_slots"
MAP_RTT_LINK = "rtt_link"
# Everything pinned in a datapath's directory, maps and program alike.
PINNED = (
    MAP_SUBSCRIBERS,
    MAP_HOSTS,
    MAP_COUNTERS,
    MAP_SLOTS,
    MAP_SETTINGS,
    MAP_COUNTER_SUMS,
    PROG_SUM_COUNTERS,
    MAP_MACS,
    MAP_GATEWAY_ADDRS,
    MAP_DROPS,
    MAP_RTT_FLOWS,
    MAP_RTT_SLOTS,
    MAP_RTT_LINK,
)

SLOT_BLOCKED = 0x1
SLOT_MAC_BOUND = 0x2
SETTING_BLOCK_UNPROVISIONED = 0x1


class DropReason(enum.IntEnum):
    """Why the datapath dropped a packet: DESANET_DROP_* of the header, the `drops` map index."""

    BLOCKED = 1
    UNPROVISIONED = 2
    MAC_MISMATCH = 3


DROP_REASONS = 4  # entries of the `drops` map (index 0 is unused)

# Passive RTT (ebpf/datapath.bpf.c): directions, the flow table's size, histogram shapes.
RTT_WAN = 0
RTT_LAN = 1
RTT_DIRECTIONS = ("wan", "lan")  # names by index, as status and metrics show them
RTT_FLOWS_LOG2 = 17
RTT_FLOWS = 1 << RTT_FLOWS_LOG2
RTT_SLOT_BUCKETS = 24
RTT_LINK_BUCKETS = 2048


def rtt_slot_bucket_lower_us(bucket: int) -> int:
    """Where per-slot RTT bucket `bucket` starts, in us (the header's half octaves from 768 us)."""
    if bucket == 0:
        return 0
    b = bucket + 18
    return (2 + b % 2) << (b // 2 - 1)


def rtt_slot_bucket(us: int) -> int:
    """The per-slot bucket of a sample of `us` us (rtt_slot_bucket() of ebpf/datapath.bpf.c)."""
    if us < 768:
        return 0
    top = us.bit_length() - 1
    b = 2 * top + ((us >> (top - 1)) & 1) - 18
    return min(b, RTT_SLOT_BUCKETS - 1)


# Columns of struct desanet_counters, in order; the aggregator reads them by index.
COUNTER_FIELDS = ("up_bytes", "up_pkts", "down_bytes", "down_pkts")


class LpmKey(ctypes.Structure):
    """struct desanet_lpm_key: prefix length and a 16-byte (IPv4-mapped for v4) address."""

    _fields_ = [("prefixlen", ctypes.c_uint32), ("addr", ctypes.c_uint8 * 16)]


class HostKey(ctypes.Structure):
    """struct desanet_host_key: a whole 16-byte (IPv4-mapped for v4) address."""

    _fields_ = [("addr", ctypes.c_uint8 * 16)]


class MacKey(ctypes.Structure):
    """struct desanet_mac_key: one Ethernet address."""

    _fields_ = [("addr", ctypes.c_uint8 * 6)]


class Drops(ctypes.Structure):
    """struct desanet_drops: packets and IP bytes dropped for one reason, all CPUs."""

    _fields_ = [("packets", ctypes.c_uint64), ("bytes", ctypes.c_uint64)]


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


class SumRun(ctypes.Structure):
    """struct desanet_sum_run: where one run of the summing program starts."""

    _fields_ = [("first_slot", ctypes.c_uint64)]


class RttFlowKey(ctypes.Structure):
    """struct desanet_rtt_flow_key: one TCP flow, the subscriber's side first."""

    _fields_ = [
        ("sub_addr", ctypes.c_uint32),
        ("remote_addr", ctypes.c_uint32),
        ("sub_port", ctypes.c_uint16),
        ("remote_port", ctypes.c_uint16),
    ]


class RttFlow(ctypes.Structure):
    """struct desanet_rtt_flow: whose entry, each direction's outstanding and last TSval, its ns."""

    _fields_ = [
        ("key", RttFlowKey),
        ("reserved", ctypes.c_uint32),
        ("tsval", ctypes.c_uint32 * 2),
        ("seen", ctypes.c_uint32 * 2),
        ("t_ns", ctypes.c_uint64 * 2),
    ]


class RttHist(ctypes.Structure):
    """struct desanet_rtt_hist: one slot's cumulative RTT samples per direction and bucket."""

    _fields_ = [("count", ctypes.c_uint32 * (2 * RTT_SLOT_BUCKETS))]


class Settings(ctypes.Structure):
    """struct desanet_settings: the upload IFB ifindex and SETTING_* flags."""

    _fields_ = [("upload_ifindex", ctypes.c_uint32), ("flags", ctypes.c_uint32)]


STRUCTS: dict[str, type[ctypes.Structure]] = {
    "desanet_lpm_key": LpmKey,
    "desanet_host_key": HostKey,
    "desanet_counters": Counters,
    "desanet_slot": Slot,
    "desanet_sum_run": SumRun,
    "desanet_settings": Settings,
    "desanet_mac_key": MacKey,
    "desanet_drops": Drops,
    "desanet_rtt_flow_key": RttFlowKey,
    "desanet_rtt_flow": RttFlow,
    "desanet_rtt_hist": RttHist,
}


def pin_dir(gateway_id: str, lan: str, bpffs: Path = BPFFS) -> Path:
    """Where the datapath of `lan` on gateway `gateway_id` pins its maps and programs."""
    return bpffs / "desanet" / gateway_id / lan
