"""Counter polling: read every slot of the datapath's per-CPU counters, feed the aggregator.

`CounterReader` opens the pinned `counters` map by path (no BCC objects
needed) and returns cumulative (n_slots, 4) sums over the possible CPUs in
one of two ways, chosen explicitly:
- "kernel" (default): ebpf.percpu_sum sums the CPUs inside the kernel into
  a memory-mapped array, one BPF_PROG_TEST_RUN per 65,536 slots (Linux 5.19+);
- "batch": one BPF_MAP_LOOKUP_BATCH of every slot on every CPU into a
  preallocated buffer, summed by the aggregator backend (Linux 5.6+).
`Poller` hands each read to an aggregator with the identity of the map it
came from, so a recreated map or a reboot rebases the deltas instead of
losing or inventing bytes.
"""

from __future__ import annotations

import ctypes
import errno
import os
import time
from pathlib import Path
from types import ModuleType, TracebackType
from typing import Any, Protocol

import numpy as np
import numpy.typing as npt

from desanet import cython_ext
from desanet.ebpf import abi, bpf_syscall
from desanet.ebpf.percpu_sum import KernelSum
from desanet.errors import DatapathError, ValidationError

BPF_MAP_TYPE_PERCPU_ARRAY = 6
BPFFS = Path("/sys/fs/bpf")
POSSIBLE_CPUS = Path("/sys/devices/system/cpu/possible")
BOOT_ID = Path("/proc/sys/kernel/random/boot_id")
COUNTER_BYTES = ctypes.sizeof(abi.Counters)
READ_METHODS = ("kernel", "batch")


def possible_cpus(path: Path = POSSIBLE_CPUS) -> list[int]:
    """The CPUs a per-CPU map holds a value for (the kernel's possible CPUs, e.g. "0-3")."""
    cpus: list[int] = []
    for part in path.read_text().strip().split(","):
        first, _, last = part.partition("-")
        cpus.extend(range(int(first), int(last or first) + 1))
    return cpus


def counters_path(gateway_id: str, lan: str, bpffs: Path = BPFFS) -> Path:
    """Where the datapath of `lan` on gateway `gateway_id` pins its counters map."""
    return bpffs / "desanet" / gateway_id / lan / abi.MAP_COUNTERS


class CounterReader:
    """Cumulative per-slot counters of a per-CPU counters map, summed over CPUs."""

    def __init__(
        self,
        fd: int,
        path: Path | None = None,
        backend: ModuleType | None = None,
        method: str = "kernel",
    ) -> None:
        """Take ownership of `fd`, a per-CPU array of struct desanet_counters."""
        self._fd = fd
        self.path = path
        self.method = method
        self._kernel_sum: KernelSum | None = None
        try:
            if method not in READ_METHODS:
                raise ValidationError(
                    f"counter read method {method!r}: use one of {', '.join(READ_METHODS)}"
                )
            self._backend = backend or cython_ext.load_backend()
            self._pin = self._pin_stat()
            shape = bpf_syscall.map_shape(fd)
            if (shape.type, shape.key_size, shape.value_size) != (
                BPF_MAP_TYPE_PERCPU_ARRAY,
                4,
                COUNTER_BYTES,
            ):
                raise DatapathError(
                    f"{path or f'map fd {fd}'} is not a per-CPU array of struct desanet_counters "
                    f"(type {shape.type}, key {shape.key_size} B, value {shape.value_size} B): "
                    "is the datapath of this version attached?"
                )
            self.n_slots = shape.max_entries
            self.cpus = possible_cpus()
            self.n_cpus = len(self.cpus)
            # Names this map instance across restarts: a new map or a reboot changes it.
            self.identity = BOOT_ID.read_text().strip().encode() + f"/{shape.id}".encode()
            if method == "kernel":
                self._kernel_sum = KernelSum(fd, self.n_slots, self.cpus)
        except BaseException:
            os.close(fd)
            raise
        self._percpu: npt.NDArray[np.uint64] | None = None
        self._cumulative = np.zeros((self.n_slots, 4), dtype=np.uint64)

    @classmethod
    def open(
        cls, path: Path | str, backend: ModuleType | None = None, method: str = "kernel"
    ) -> CounterReader:
        """Open the counters map pinned at `path`."""
        path = Path(path)
        if not path.exists():
            raise DatapathError(
                f"no counters pinned at {path}: is the datapath attached (desanet run)?"
            )
        return cls(bpf_syscall.obj_get(str(path)), path, backend, method)

    @classmethod
    def for_datapath(
        cls,
        gateway_id: str,
        lan: str,
        bpffs: Path = BPFFS,
        backend: ModuleType | None = None,
        method: str = "kernel",
    ) -> CounterReader:
        """Open the counters of the datapath attached to `lan` on gateway `gateway_id`."""
        return cls.open(counters_path(gateway_id, lan, bpffs), backend, method)

    @classmethod
    def from_fd(
        cls, fd: int, backend: ModuleType | None = None, method: str = "kernel"
    ) -> CounterReader:
        """Read a map someone else holds open (the reader keeps its own duplicate)."""
        return cls(os.dup(fd), None, backend, method)

    def _pin_stat(self) -> tuple[int, int] | None:
        if self.path is None:
            return None
        st = os.stat(self.path)
        return st.st_dev, st.st_ino

    def repinned(self) -> bool:
        """True when the pin now names another map (the datapath recreated it): reopen then."""
        if self.path is None:
            return False
        try:
            return self._pin_stat() != self._pin
        except FileNotFoundError:
            return True

    def reopen(self) -> CounterReader:
        """A reader of the map pinned at this reader's path now; this one is closed."""
        if self.path is None:
            raise DatapathError("a reader made from a file descriptor cannot be reopened")
        fresh = CounterReader.open(self.path, self._backend, self.method)
        self.close()
        return fresh

    def read(self) -> npt.NDArray[np.uint64]:
        """Cumulative counters summed over CPUs, (n_slots, 4) uint64; valid until the next read."""
        if self._kernel_sum is not None:
            return self._kernel_sum.run()
        return self._backend.sum_cpus(self.read_percpu(), self._cumulative)

    def read_percpu(self) -> npt.NDArray[np.uint64]:
        """Every slot on every CPU by one batch lookup, (n_slots, n_cpus, 4), in a reused buffer."""
        if self._percpu is None:
            # A per-CPU value is n_cpus consecutive copies of the 8-byte-aligned struct.
            self._percpu = np.empty((self.n_slots, self.n_cpus, 4), dtype=np.uint64)
            self._keys = np.empty(self.n_slots, dtype=np.uint32)
            self._cursor = ctypes.c_uint32(0)
            self._batch = bpf_syscall.BatchAttr(
                out_batch=ctypes.addressof(self._cursor), map_fd=self._fd
            )
        attr = self._batch
        done = 0
        while done < self.n_slots:
            # Resume after the last key read; the first call starts at the map's beginning.
            attr.in_batch = ctypes.addressof(self._cursor) if done else 0
            attr.keys = self._keys.ctypes.data + done * 4
            attr.values = self._percpu.ctypes.data + done * self.n_cpus * COUNTER_BYTES
            attr.count = self.n_slots - done
            # ENOENT is how the kernel says the last batch ended the map: not an error here.
            result = bpf_syscall.bpf_raw(bpf_syscall.BPF_MAP_LOOKUP_BATCH, attr)
            err = ctypes.get_errno() if result < 0 else 0
            done += attr.count
            if err == errno.ENOENT or (err == 0 and attr.count == 0):
                break
            if err:
                raise DatapathError(
                    f"cannot read the counters map ({os.strerror(err)}, errno {err}); "
                    "batch lookups need Linux 5.6 or newer"
                )
        if done != self.n_slots:
            raise DatapathError(f"the counters map returned {done} of {self.n_slots} slots")
        return self._percpu

    def close(self) -> None:
        """Release the map file descriptor and the summing program."""
        if self._kernel_sum is not None:
            self._kernel_sum.close()
            self._kernel_sum = None
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1

    def __enter__(self) -> CounterReader:
        return self

    def __exit__(
        self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()


def now_ms() -> int:
    """Unix time in ms, the clock of usage intervals."""
    return time.time_ns() // 1_000_000


class CounterSource(Protocol):
    """What the poller reads: CounterReader, or a reader wrapping one (meter.delivered)."""

    n_slots: int

    @property
    def identity(self) -> bytes: ...

    def read(self) -> npt.NDArray[np.uint64]: ...

    def repinned(self) -> bool: ...

    def reopen(self) -> CounterSource: ...

    def close(self) -> None: ...


class Poller:
    """One step of the meter loop: read the counters, account them in the aggregator."""

    def __init__(self, reader: CounterSource, aggregator: Any) -> None:
        if aggregator.n_slots != reader.n_slots:
            raise DatapathError(
                f"the aggregator has {aggregator.n_slots} slots but the counters map "
                f"{reader.n_slots}: restart with the datapath's capacity"
            )
        self.reader = reader
        self.aggregator = aggregator

    def poll(self, t_ms: int | None = None) -> int:
        """Read and account the counters; returns how many slots moved since the last poll."""
        if self.reader.repinned():
            self.reader = self.reader.reopen()
        # Checked every poll: the aggregator may have been restored from a journal
        # written while another map (or another boot) was counting.
        self.aggregator.use_source(self.reader.identity)
        cumulative = self.reader.read()
        return int(self.aggregator.poll(cumulative, now_ms() if t_ms is None else t_ms))
