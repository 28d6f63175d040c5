"""The few bpf(2) commands desanet issues itself, through ctypes.

BCC covers compiling and map access; this module adds what it lacks: opening
a pinned map by path, asking a map its shape, and BPF_PROG_TEST_RUN. Every
failing call becomes a `DatapathError` in `bpf()`, the one place errno is read.
"""

from __future__ import annotations

import ctypes
import os
from dataclasses import dataclass

from desanet.errors import DatapathError

SYS_BPF = 321  # x86_64
BPF_MAP_CREATE = 0
BPF_PROG_LOAD = 5
BPF_OBJ_GET = 7
BPF_PROG_TEST_RUN = 10
BPF_OBJ_GET_INFO_BY_FD = 15
BPF_BTF_LOAD = 18
BPF_MAP_LOOKUP_BATCH = 24

_libc = ctypes.CDLL(None, use_errno=True)
_libc.syscall.restype = ctypes.c_long


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


class MapCreateAttr(ctypes.Structure):
    """bpf_attr for BPF_MAP_CREATE (the leading fields desanet sets)."""

    _fields_ = [
        ("map_type", ctypes.c_uint32),
        ("key_size", ctypes.c_uint32),
        ("value_size", ctypes.c_uint32),
        ("max_entries", ctypes.c_uint32),
        ("map_flags", ctypes.c_uint32),
    ]


class BtfLoadAttr(ctypes.Structure):
    """bpf_attr for BPF_BTF_LOAD."""

    _fields_ = [
        ("btf", ctypes.c_uint64),
        ("btf_log_buf", ctypes.c_uint64),
        ("btf_size", ctypes.c_uint32),
        ("btf_log_size", ctypes.c_uint32),
        ("btf_log_level", ctypes.c_uint32),
    ]


class ProgLoadAttr(ctypes.Structure):
    """bpf_attr for BPF_PROG_LOAD (up to the function info desanet passes)."""

    _fields_ = [
        ("prog_type", ctypes.c_uint32),
        ("insn_cnt", ctypes.c_uint32),
        ("insns", ctypes.c_uint64),
        ("license", ctypes.c_uint64),
        ("log_level", ctypes.c_uint32),
        ("log_size", ctypes.c_uint32),
        ("log_buf", ctypes.c_uint64),
        ("kern_version", ctypes.c_uint32),
        ("prog_flags", ctypes.c_uint32),
        ("prog_name", ctypes.c_char * 16),
        ("prog_ifindex", ctypes.c_uint32),
        ("expected_attach_type", ctypes.c_uint32),
        ("prog_btf_fd", ctypes.c_uint32),
        ("func_info_rec_size", ctypes.c_uint32),
        ("func_info", ctypes.c_uint64),
        ("func_info_cnt", ctypes.c_uint32),
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


class BatchAttr(ctypes.Structure):
    """The `batch` member of union bpf_attr (BPF_MAP_*_BATCH commands)."""

    _fields_ = [
        ("in_batch", ctypes.c_uint64),
        ("out_batch", ctypes.c_uint64),
        ("keys", ctypes.c_uint64),
        ("values", ctypes.c_uint64),
        ("count", ctypes.c_uint32),
        ("map_fd", ctypes.c_uint32),
        ("elem_flags", ctypes.c_uint64),
        ("flags", ctypes.c_uint64),
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


def bpf_raw(cmd: int, attr: ctypes.Structure) -> int:
    """bpf(2) as is: the result, negative on failure (for retries that only collect a log)."""
    return int(_libc.syscall(SYS_BPF, cmd, ctypes.byref(attr), ctypes.sizeof(attr)))


def bpf(cmd: int, attr: ctypes.Structure, what: str) -> int:
    """bpf(2); a failure becomes a DatapathError saying `what` failed and why."""
    result = bpf_raw(cmd, attr)
    if result < 0:
        err = ctypes.get_errno()
        raise DatapathError(f"{what}: {os.strerror(err)} (errno {err})")
    return int(result)


@dataclass(frozen=True)
class MapShape:
    """What the kernel says a map is."""

    type: int
    key_size: int
    value_size: int
    max_entries: int
    name: str
    id: int  # the kernel's id of this map instance, new for every map created


def obj_get(path: str) -> int:
    """Open a pinned BPF object; returns a new file descriptor the caller closes."""
    raw = path.encode()
    attr = _ObjGetAttr(pathname=ctypes.cast(ctypes.c_char_p(raw), ctypes.c_void_p).value or 0)
    return bpf(BPF_OBJ_GET, attr, f"cannot open pinned BPF object {path}")


def map_shape(fd: int) -> MapShape:
    """Type, key/value sizes, capacity and id of the map behind `fd`."""
    info = _MapInfo()
    attr = _InfoAttr(bpf_fd=fd, info_len=ctypes.sizeof(info), info=ctypes.addressof(info))
    bpf(BPF_OBJ_GET_INFO_BY_FD, attr, "cannot read BPF map info")
    return MapShape(
        info.type, info.key_size, info.value_size, info.max_entries, info.name.decode(), info.id
    )


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
