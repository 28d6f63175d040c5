"""Map elements read and written through bpf(2): one at a time, or whole maps in batches.

`BpfMap` is what the datapath provisions through once its maps are pinned, in
the process that attached them and in any other that opens them later; the
batch functions take raw buffers so that numpy arrays can be filled without a
copy. ENOENT is an answer here ("no such element", "no more elements"), not
an error.
"""

from __future__ import annotations

import ctypes
import errno
import os
from collections.abc import Iterator
from pathlib import Path
from types import TracebackType
from typing import Any

from desanet.ebpf.bpf_syscall import (
    BPF_ANY,
    BPF_MAP_DELETE_ELEM,
    BPF_MAP_GET_NEXT_KEY,
    BPF_MAP_LOOKUP_BATCH,
    BPF_MAP_LOOKUP_ELEM,
    BPF_MAP_UPDATE_BATCH,
    BPF_MAP_UPDATE_ELEM,
    bpf,
    map_shape,
    obj_get,
)
from desanet.errors import DatapathError


class ElemAttr(ctypes.Structure):
    """bpf_attr for BPF_MAP_{LOOKUP,UPDATE,DELETE}_ELEM and BPF_MAP_GET_NEXT_KEY."""

    _fields_ = [
        ("map_fd", ctypes.c_uint32),
        ("_pad", ctypes.c_uint32),
        ("key", ctypes.c_uint64),
        ("value", ctypes.c_uint64),  # next_key for BPF_MAP_GET_NEXT_KEY
        ("flags", ctypes.c_uint64),
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


def lookup_batch(
    fd: int, keys: int, values: int, count: int, key_size: int, value_stride: int
) -> int:
    """Read up to `count` elements into the buffers at addresses `keys` and `values`
    (`value_stride` bytes per element: a per-CPU value is one copy per possible CPU);
    returns how many elements the map held."""
    # The resume cursor: a bucket number (u32) for hashes, a key for arrays.
    cursor = ctypes.create_string_buffer(max(key_size, 8))
    attr = BatchAttr(out_batch=ctypes.addressof(cursor), map_fd=fd)
    done = 0
    while done < count:
        # Resume after the last batch; the first call starts at the map's beginning.
        attr.in_batch = ctypes.addressof(cursor) if done else 0
        attr.keys = keys + done * key_size
        attr.values = values + done * value_stride
        attr.count = count - done
        # ENOENT is how the kernel says the last batch ended the map.
        result = bpf(
            BPF_MAP_LOOKUP_BATCH,
            attr,
            "cannot read the map in batches (Linux 5.6 or newer needed)",
            allow=(errno.ENOENT,),
        )
        done += attr.count
        if result == -errno.ENOENT or attr.count == 0:
            break
    return done


def update_batch(fd: int, keys: int, values: int, count: int, what: str) -> None:
    """Write `count` elements from the buffers at addresses `keys` and `values` in one call."""
    attr = BatchAttr(keys=keys, values=values, count=count, map_fd=fd, elem_flags=BPF_ANY)
    bpf(BPF_MAP_UPDATE_BATCH, attr, what)
    if attr.count != count:
        raise DatapathError(f"{what}: the kernel wrote {attr.count} of {count} elements")


class BpfMap:
    """One BPF map by file descriptor, with ctypes key and value types (sizes checked)."""

    def __init__(self, fd: int, key_type: type[Any], value_type: type[Any], name: str) -> None:
        """Take ownership of `fd`; `name` says which map it is in error messages."""
        self.fd = fd
        self.name = name
        self.key_type = key_type
        self.value_type = value_type
        try:
            shape = map_shape(fd)
            expected = (ctypes.sizeof(key_type), ctypes.sizeof(value_type))
            if (shape.key_size, shape.value_size) != expected:
                raise DatapathError(
                    f"map {name} has {shape.key_size}-byte keys and {shape.value_size}-byte "
                    f"values, not {expected[0]} and {expected[1]}: is the datapath of this "
                    "version attached?"
                )
        except BaseException:
            os.close(fd)
            raise
        self.max_entries = shape.max_entries

    @classmethod
    def open(cls, path: Path, key_type: type[Any], value_type: type[Any]) -> BpfMap:
        """Open the map pinned at `path`."""
        return cls(obj_get(str(path)), key_type, value_type, str(path))

    def _attr(self, key: Any, value: Any = None, flags: int = 0) -> ElemAttr:
        return ElemAttr(
            map_fd=self.fd,
            key=ctypes.addressof(key),
            value=ctypes.addressof(value) if value is not None else 0,
            flags=flags,
        )

    def lookup(self, key: Any) -> Any | None:
        """The value stored under `key`, or None."""
        value = self.value_type()
        result = bpf(
            BPF_MAP_LOOKUP_ELEM,
            self._attr(key, value),
            f"cannot read map {self.name}",
            allow=(errno.ENOENT,),
        )
        return None if result < 0 else value

    def update(self, key: Any, value: Any) -> None:
        """Store `value` under `key`, creating or replacing it."""
        bpf(BPF_MAP_UPDATE_ELEM, self._attr(key, value, BPF_ANY), f"cannot write map {self.name}")

    def delete(self, key: Any) -> None:
        """Remove `key`; KeyError if it is not there."""
        result = bpf(
            BPF_MAP_DELETE_ELEM,
            self._attr(key),
            f"cannot delete from map {self.name}",
            allow=(errno.ENOENT,),
        )
        if result < 0:
            raise KeyError(key)

    def keys(self) -> Iterator[Any]:
        """Every key, in the kernel's order (the map must not change meanwhile)."""
        current: Any = None
        while True:
            following = self.key_type()
            attr = ElemAttr(
                map_fd=self.fd,
                key=ctypes.addressof(current) if current is not None else 0,
                value=ctypes.addressof(following),
            )
            result = bpf(
                BPF_MAP_GET_NEXT_KEY, attr, f"cannot list map {self.name}", allow=(errno.ENOENT,)
            )
            if result < 0:
                return
            yield following
            current = following

    def items(self) -> list[tuple[Any, Any]]:
        """Every (key, value), one lookup per key (for maps without batch lookups: LPM tries)."""
        pairs = []
        for key in self.keys():
            value = self.lookup(key)
            if value is not None:
                pairs.append((key, value))
        return pairs

    def items_batch(self) -> list[tuple[Any, Any]]:
        """Every (key, value), read with batch lookups (hashes and arrays)."""
        keys = (self.key_type * self.max_entries)()
        values = (self.value_type * self.max_entries)()
        n = lookup_batch(
            self.fd,
            ctypes.addressof(keys),
            ctypes.addressof(values),
            self.max_entries,
            ctypes.sizeof(self.key_type),
            ctypes.sizeof(self.value_type),
        )
        return list(zip(keys[:n], values[:n], strict=True))

    def update_batch(self, keys: ctypes.Array[Any], values: ctypes.Array[Any]) -> None:
        """Store values[i] under keys[i] for every i, in one system call."""
        update_batch(
            self.fd,
            ctypes.addressof(keys),
            ctypes.addressof(values),
            len(keys),
            f"cannot write map {self.name}",
        )

    def close(self) -> None:
        """Release the file descriptor."""
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1

    def __enter__(self) -> BpfMap:
        return self

    def __exit__(
        self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()
