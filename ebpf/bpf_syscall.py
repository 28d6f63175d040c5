"""The bpf(2) commands desanet issues itself, through ctypes.

BCC compiles and loads the programs; everything after that goes through here:
opening pinned objects by path and pinning them, asking a map or a program
what it is, reading and writing map elements (one at a time or in batches),
and BPF_PROG_TEST_RUN. A process that only reads or provisions an attached
datapath needs nothing else: no BCC, no compiler. Every failing call becomes a
`DatapathError` in `bpf()`, the one place errno is read.
"""

from __future__ import annotations

import ctypes
import functools
import os
import platform
from dataclasses import dataclass

from desanet.errors import DatapathError

# bpf(2)'s number in each architecture's system call table: x86_64 from
# asm/unistd_64.h; arm64 and riscv64 use the generic table (asm-generic/unistd.h);
# 32-bit ARM (EABI) from its own table, which arm64 mirrors in asm/unistd32.h.
SYS_BPF_BY_MACHINE = {
    "x86_64": 321,
    "aarch64": 280,
    "riscv64": 280,
    "armv6l": 386,
    "armv7l": 386,
    "armv8l": 386,  # 32-bit ARM userland on a 64-bit CPU
}

BPF_MAP_LOOKUP_ELEM = 1
BPF_MAP_UPDATE_ELEM = 2
BPF_MAP_DELETE_ELEM = 3
BPF_MAP_GET_NEXT_KEY = 4
BPF_OBJ_PIN = 6
BPF_OBJ_GET = 7
BPF_PROG_TEST_RUN = 10
BPF_PROG_GET_FD_BY_ID = 13
BPF_MAP_GET_FD_BY_ID = 14
BPF_OBJ_GET_INFO_BY_FD = 15
BPF_MAP_LOOKUP_BATCH = 24
BPF_MAP_UPDATE_BATCH = 26

BPF_ANY = 0
BPF_F_MMAPABLE = 1 << 10

_libc = ctypes.CDLL(None, use_errno=True)
_libc.syscall.restype = ctypes.c_long


def sys_bpf_number(machine: str) -> int:
    """The bpf(2) system call number on `machine` (as platform.machine() names it)."""
    try:
        return SYS_BPF_BY_MACHINE[machine]
    except KeyError:
        known = ", ".join(sorted(SYS_BPF_BY_MACHINE))
        raise DatapathError(
            f"desanet does not know the bpf(2) system call number on {machine!r} "
            f"(it knows {known}): this architecture is not supported"
        ) from None


@functools.cache
def _sys_bpf() -> int:
    return sys_bpf_number(platform.machine())


class SkBuff(ctypes.Structure):
    """struct __sk_buff (UAPI), as passed in and out of BPF_PROG_TEST_RUN."""

    _fields_ = [
        ("len", ctypes.c_uint32),
        ("pkt_type", ctypes.c_uint32),
        ("mark", ctypes.c_uint32),
        ("queue_mapping", ctypes.c_uint32),
        ("protocol", ctypes.c_uint32),
        ("vlan_present", ctypes.c_uint32),
        ("vlan_tci", ctypes.c_uint32),
        ("vlan_proto", ctypes.c_uint32),
        ("priority", ctypes.c_uint32),
        ("ingress_ifindex", ctypes.c_uint32),
        ("ifindex", ctypes.c_uint32),
        ("tc_index", ctypes.c_uint32),
        ("cb", ctypes.c_uint32 * 5),
        ("hash", ctypes.c_uint32),
        ("tc_classid", ctypes.c_uint32),
        ("data", ctypes.c_uint32),
        ("data_end", ctypes.c_uint32),
        ("napi_id", ctypes.c_uint32),
        ("family", ctypes.c_uint32),
        ("remote_ip4", ctypes.c_uint32),
        ("local_ip4", ctypes.c_uint32),
        ("remote_ip6", ctypes.c_uint32 * 4),
        ("local_ip6", ctypes.c_uint32 * 4),
        ("remote_port", ctypes.c_uint32),
        ("local_port", ctypes.c_uint32),
        ("data_meta", ctypes.c_uint32),
        ("flow_keys", ctypes.c_uint64),
        ("tstamp", ctypes.c_uint64),
        ("wire_len", ctypes.c_uint32),
        ("gso_segs", ctypes.c_uint32),
        ("sk", ctypes.c_uint64),
        ("gso_size", ctypes.c_uint32),
        ("tstamp_type", ctypes.c_uint8),
        ("_pad", ctypes.c_uint8 * 3),
        ("hwtstamp", ctypes.c_uint64),
    ]


class TestRunAttr(ctypes.Structure):
    """bpf_attr for BPF_PROG_TEST_RUN."""

    _fields_ = [
        ("prog_fd", ctypes.c_uint32),
        ("retval", ctypes.c_uint32),
        ("data_size_in", ctypes.c_uint32),
        ("data_size_out", ctypes.c_uint32),
        ("data_in", ctypes.c_uint64),
        ("data_out", ctypes.c_uint64),
        ("repeat", ctypes.c_uint32),
        ("duration", ctypes.c_uint32),
        ("ctx_size_in", ctypes.c_uint32),
        ("ctx_size_out", ctypes.c_uint32),
        ("ctx_in", ctypes.c_uint64),
        ("ctx_out", ctypes.c_uint64),
        ("flags", ctypes.c_uint32),
        ("cpu", ctypes.c_uint32),
        ("batch_size", ctypes.c_uint32),
    ]


class _ObjGetAttr(ctypes.Structure):
    _fields_ = [
        ("pathname", ctypes.c_uint64),
        ("bpf_fd", ctypes.c_uint32),
        ("file_flags", ctypes.c_uint32),
        ("path_fd", ctypes.c_int32),
    ]


class _InfoAttr(ctypes.Structure):
    _fields_ = [
        ("bpf_fd", ctypes.c_uint32),
        ("info_len", ctypes.c_uint32),
        ("info", ctypes.c_uint64),
    ]


class _MapInfo(ctypes.Structure):
    _fields_ = [
        ("type", ctypes.c_uint32),
        ("id", ctypes.c_uint32),
        ("key_size", ctypes.c_uint32),
        ("value_size", ctypes.c_uint32),
        ("max_entries", ctypes.c_uint32),
        ("map_flags", ctypes.c_uint32),
        ("name", ctypes.c_char * 16),
        ("ifindex", ctypes.c_uint32),
        ("btf_vmlinux_value_type_id", ctypes.c_uint32),
        ("netns_dev", ctypes.c_uint64),
        ("netns_ino", ctypes.c_uint64),
        ("btf_id", ctypes.c_uint32),
        ("btf_key_type_id", ctypes.c_uint32),
        ("btf_value_type_id", ctypes.c_uint32),
        ("_pad", ctypes.c_uint32),
        ("map_extra", ctypes.c_uint64),
    ]


class _ProgInfo(ctypes.Structure):
    """The leading fields of struct bpf_prog_info, up to the ids of the maps a program uses."""

    _fields_ = [
        ("type", ctypes.c_uint32),
        ("id", ctypes.c_uint32),
        ("tag", ctypes.c_uint8 * 8),
        ("jited_prog_len", ctypes.c_uint32),
        ("xlated_prog_len", ctypes.c_uint32),
        ("jited_prog_insns", ctypes.c_uint64),
        ("xlated_prog_insns", ctypes.c_uint64),
        ("load_time", ctypes.c_uint64),
        ("created_by_uid", ctypes.c_uint32),
        ("nr_map_ids", ctypes.c_uint32),
        ("map_ids", ctypes.c_uint64),
    ]


def bpf(cmd: int, attr: ctypes.Structure, what: str, allow: tuple[int, ...] = ()) -> int:
    """bpf(2): the result, or -errno for an errno listed in `allow` (ENOENT where "no such
    element" is an answer); any other failure becomes a DatapathError saying `what` failed."""
    result = int(_libc.syscall(_sys_bpf(), cmd, ctypes.byref(attr), ctypes.sizeof(attr)))
    if result < 0:
        err = ctypes.get_errno()
        if err in allow:
            return -err
        raise DatapathError(f"{what}: {os.strerror(err)} (errno {err})")
    return result


@dataclass(frozen=True)
class MapShape:
    """What the kernel says a map is."""

    type: int
    key_size: int
    value_size: int
    max_entries: int
    flags: int
    name: str
    id: int  # the kernel's id of this map instance, new for every map created


def obj_get(path: str) -> int:
    """Open a pinned BPF object; returns a new file descriptor the caller closes."""
    raw = ctypes.create_string_buffer(path.encode())
    attr = _ObjGetAttr(pathname=ctypes.addressof(raw))
    return bpf(BPF_OBJ_GET, attr, f"cannot open pinned BPF object {path}")


class _GetFdByIdAttr(ctypes.Structure):
    _fields_ = [
        ("id", ctypes.c_uint32),
        ("next_id", ctypes.c_uint32),
        ("open_flags", ctypes.c_uint32),
    ]


def prog_fd_by_id(prog_id: int) -> int:
    """Open the loaded program with kernel id `prog_id`; a new descriptor the caller closes."""
    attr = _GetFdByIdAttr(id=prog_id)
    return bpf(BPF_PROG_GET_FD_BY_ID, attr, f"cannot open BPF program {prog_id}")


def map_fd_by_id(map_id: int) -> int:
    """Open the map with kernel id `map_id`; a new descriptor the caller closes."""
    attr = _GetFdByIdAttr(id=map_id)
    return bpf(BPF_MAP_GET_FD_BY_ID, attr, f"cannot open BPF map {map_id}")


def obj_pin(fd: int, path: str) -> None:
    """Pin the map or program behind `fd` at `path` in bpffs (which must not exist yet)."""
    raw = ctypes.create_string_buffer(path.encode())
    attr = _ObjGetAttr(pathname=ctypes.addressof(raw), bpf_fd=fd)
    bpf(BPF_OBJ_PIN, attr, f"cannot pin BPF object at {path}")


def map_shape(fd: int) -> MapShape:
    """Type, key/value sizes, capacity and id of the map behind `fd`."""
    info = _MapInfo()
    attr = _InfoAttr(bpf_fd=fd, info_len=ctypes.sizeof(info), info=ctypes.addressof(info))
    bpf(BPF_OBJ_GET_INFO_BY_FD, attr, "cannot read BPF map info")
    return MapShape(
        info.type,
        info.key_size,
        info.value_size,
        info.max_entries,
        info.map_flags,
        info.name.decode(),
        info.id,
    )


def prog_map_ids(fd: int) -> list[int]:
    """The kernel ids of the maps the program behind `fd` uses."""
    ids = (ctypes.c_uint32 * 64)()
    info = _ProgInfo(nr_map_ids=len(ids), map_ids=ctypes.addressof(ids))
    attr = _InfoAttr(bpf_fd=fd, info_len=ctypes.sizeof(info), info=ctypes.addressof(info))
    bpf(BPF_OBJ_GET_INFO_BY_FD, attr, "cannot read BPF program info")
    return list(ids[: min(info.nr_map_ids, len(ids))])


@dataclass(frozen=True)
class TestRun:
    """Outcome of BPF_PROG_TEST_RUN: the verdict, the mean ns per run, the skb afterwards."""

    retval: int
    duration_ns: int
    skb: SkBuff


def prog_test_run(
    prog_fd: int, frame: bytes, repeat: int = 1, skb: SkBuff | None = None
) -> TestRun:
    """Run a SCHED_CLS program on `frame` inside the kernel, `repeat` times, with no NIC."""
    data_in = ctypes.create_string_buffer(frame, len(frame))
    data_out = ctypes.create_string_buffer(len(frame) + 256)
    ctx_in = skb if skb is not None else SkBuff()
    ctx_out = SkBuff()
    attr = TestRunAttr(
        prog_fd=prog_fd,
        data_size_in=len(frame),
        data_size_out=ctypes.sizeof(data_out),
        data_in=ctypes.addressof(data_in),
        data_out=ctypes.addressof(data_out),
        repeat=repeat,
        ctx_size_in=ctypes.sizeof(ctx_in),
        ctx_size_out=ctypes.sizeof(ctx_out),
        ctx_in=ctypes.addressof(ctx_in),
        ctx_out=ctypes.addressof(ctx_out),
    )
    bpf(BPF_PROG_TEST_RUN, attr, "BPF_PROG_TEST_RUN failed")
    return TestRun(retval=attr.retval, duration_ns=attr.duration, skb=ctx_out)
