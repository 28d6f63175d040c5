"""The datapath's per-CPU counters summed in the kernel: the loader side and the reader side.

Theory of operation:
1. `load(pin_dir)` runs where the datapath is attached (ebpf/datapath.py calls
   it): it compiles ebpf/counter_sums.bpf.c with BCC for the counters map
   pinned in `pin_dir`, and pins the program (`sum_counters`) and its mmapable
   sums array (`counter_sums`) beside it.
2. `CounterSums.open(pin_dir)`, in any process, opens those three pins with
   BPF_OBJ_GET (no BCC, no compiler), checks that the program sums exactly
   these maps, and maps the sums array read-only into memory.
3. `read()` takes an exclusive flock on the pin directory, runs the program
   with BPF_PROG_TEST_RUN from slot 0 until every slot is summed (each run
   returns how many it summed), copies the sums into the reader's own array
   and unlocks. The lock and the copy are what let two readers (the gateway
   service and `desanet datapath counters`) share one sums array: neither can
   see the other's half-finished run, so no counter ever seems to go back.
Cost (benchmarks/aggregate.py, 2 vCPU): 1.3 ms per 65,536 slots, the copy
0.05 ms of it. Needs Linux 5.19 (bpf_map_lookup_percpu_elem) and CAP_BPF.
"""

from __future__ import annotations

import ctypes
import fcntl
import mmap
import os
from collections.abc import Sequence
from pathlib import Path
from types import TracebackType

import numpy as np
import numpy.typing as npt

from desanet.ebpf import abi, bpf_syscall, build
from desanet.errors import DatapathError

SOURCE = build.EBPF_DIR / "counter_sums.bpf.c"
POSSIBLE_CPUS = Path("/sys/devices/system/cpu/possible")
COUNTER_BYTES = ctypes.sizeof(abi.Counters)
BPF_MAP_TYPE_ARRAY = 2
BPF_MAP_TYPE_PERCPU_ARRAY = 6
BPF_PROG_TYPE_RAW_TRACEPOINT = 17  # never attached: a type whose test run takes a plain context
# The verifier gives up past 8,192 pending branches in one pass (BPF_COMPLEXITY_LIMIT_JMP_SEQ),
# and each slot of a run adds one or two per CPU. Measured on 6.18: 2,048 slots per run load
# with 2 CPUs and 4,096 do not; 1,024 and 2,048 with 4; 512 and 1,024 with 8. Half of that.
BRANCH_BUDGET = 4096
# A new program is pinned under this name first, then renamed over the old one
# (bpffs refuses names with a dot); the datapath's detach removes leftovers.
STAGING_PREFIX = f"{abi.PROG_SUM_COUNTERS}_new_"


def possible_cpus(path: Path = POSSIBLE_CPUS) -> list[int]:
    """The CPUs a per-CPU map holds a value for (the kernel's possible CPUs, e.g. "0-3")."""
    cpus: list[int] = []
    for part in path.read_text().strip().split(","):
        first, _, last = part.partition("-")
        cpus.extend(range(int(first), int(last or first) + 1))
    return cpus


def chunk_slots(n_cpus: int) -> int:
    """Slots one run sums: the largest power of two the verifier's branch budget allows."""
    limit = max(1, BRANCH_BUDGET // (n_cpus + 2))
    return 1 << (limit.bit_length() - 1)


def counters_shape(fd: int, path: Path) -> bpf_syscall.MapShape:
    """The shape of the map at `fd`, which must be a per-CPU array of struct desanet_counters."""
    shape = bpf_syscall.map_shape(fd)
    if (shape.type, shape.key_size, shape.value_size) != (
        BPF_MAP_TYPE_PERCPU_ARRAY,
        4,
        COUNTER_BYTES,
    ):
        raise DatapathError(
            f"{path} is not a per-CPU array of struct desanet_counters (type {shape.type}, "
            f"key {shape.key_size} B, value {shape.value_size} B): "
            "is the datapath of this version attached?"
        )
    return shape


def load(pin_dir: Path, cpus: Sequence[int] | None = None) -> None:
    """Compile and pin the summing program for the counters pinned in `pin_dir`.

    `cpus` are the CPU ids to sum, the kernel's possible CPUs unless given. A
    program already pinned there is replaced in one step (rename), so a reader
    opening the pins never finds none.
    """
    path = pin_dir / abi.MAP_COUNTERS
    cpus = possible_cpus() if cpus is None else list(cpus)
    if cpus != list(range(len(cpus))):
        # The program reads CPUs 0..n-1; ids with gaps would read CPUs that have no values.
        raise DatapathError(
            f"the possible CPUs {cpus} are not numbered 0 to {len(cpus) - 1}: "
            "desanet cannot sum per-CPU counters on this machine"
        )
    counters_fd = bpf_syscall.obj_get(str(path))
    try:
        shape = counters_shape(counters_fd, path)
        defines: dict[str, str | int] = {
            "DESANET_SLOTS": shape.max_entries,
            "DESANET_NR_CPUS": len(cpus),
            "DESANET_SUM_CHUNK": chunk_slots(len(cpus)),
            "DESANET_PIN_DIR": f'"{pin_dir}"',
            "DESANET_COUNTERS_FD": counters_fd,
        }
        module = build.compile_source(SOURCE, defines, "the counter summing program")
        try:
            try:
                program = module.load_func(b"desanet_sum_counters", BPF_PROG_TYPE_RAW_TRACEPOINT)
            except Exception as err:  # BCC raises bare Exception when the verifier refuses
                raise DatapathError(
                    f"the counter summing program did not load ({err}); it needs Linux 5.19 "
                    "or newer (bpf_map_lookup_percpu_elem)"
                ) from err
            staging = pin_dir / f"{STAGING_PREFIX}{os.getpid()}"
            bpf_syscall.obj_pin(program.fd, str(staging))
            os.replace(staging, pin_dir / abi.PROG_SUM_COUNTERS)
        finally:
            module.cleanup()  # the pins keep the program and its sums array alive
    finally:
        os.close(counters_fd)


class CounterSums:
    """Every slot's counters summed over CPUs, through the summing program pinned in a directory."""

    def __init__(self, pin_dir: Path) -> None:
        self.pin_dir = pin_dir
        self._fds: list[int] = []
        self._mapping: mmap.mmap | None = None
        try:
            self._open()
        except BaseException:
            self.close()
            raise

    @classmethod
    def open(cls, pin_dir: Path) -> CounterSums:
        """Open the summing program and maps pinned in `pin_dir` (an attached datapath's)."""
        missing = [
            n for n in (abi.MAP_COUNTERS, abi.PROG_SUM_COUNTERS) if not (pin_dir / n).exists()
        ]
        if missing:
            raise DatapathError(
                f"no {' or '.join(missing)} pinned in {pin_dir}: is the datapath attached "
                "(desanet run)?"
            )
        return cls(pin_dir)

    def _own(self, fd: int) -> int:
        self._fds.append(fd)
        return fd

    def _open(self) -> None:
        counters_path = self.pin_dir / abi.MAP_COUNTERS
        sums_path = self.pin_dir / abi.MAP_COUNTER_SUMS
        counters = counters_shape(self._own(bpf_syscall.obj_get(str(counters_path))), counters_path)
        self.n_slots = counters.max_entries
        self.counters_id = counters.id
        sums_fd = self._own(bpf_syscall.obj_get(str(sums_path)))
        sums = bpf_syscall.map_shape(sums_fd)
        if (sums.type, sums.value_size, sums.max_entries) != (
            BPF_MAP_TYPE_ARRAY,
            COUNTER_BYTES,
            self.n_slots,
        ) or not sums.flags & bpf_syscall.BPF_F_MMAPABLE:
            raise DatapathError(
                f"{sums_path} is not an mmapable array of {self.n_slots} counter sums: "
                "re-attach the datapath (desanet run)"
            )
        self._prog_fd = self._own(bpf_syscall.obj_get(str(self.pin_dir / abi.PROG_SUM_COUNTERS)))
        uses = set(bpf_syscall.prog_map_ids(self._prog_fd))
        if not {counters.id, sums.id} <= uses:
            raise DatapathError(
                f"the summing program pinned in {self.pin_dir} does not read these counters "
                "into these sums (a datapath attached halfway?): re-attach the datapath"
            )
        self._lock_fd = self._own(os.open(self.pin_dir, os.O_RDONLY | os.O_DIRECTORY))
        length = -(-self.n_slots * COUNTER_BYTES // mmap.PAGESIZE) * mmap.PAGESIZE
        self._mapping = mmap.mmap(sums_fd, length, mmap.MAP_SHARED, mmap.PROT_READ)
        self._shared: npt.NDArray[np.uint64] = np.frombuffer(
            self._mapping, dtype=np.uint64, count=self.n_slots * 4
        ).reshape(self.n_slots, 4)
        self._sums = np.zeros((self.n_slots, 4), dtype=np.uint64)
        self._run = abi.SumRun()
        self._attr = bpf_syscall.TestRunAttr(
            prog_fd=self._prog_fd,
            ctx_size_in=ctypes.sizeof(self._run),
            ctx_in=ctypes.addressof(self._run),
        )

    def read(self) -> npt.NDArray[np.uint64]:
        """Cumulative counters summed over CPUs, (n_slots, 4) uint64; reused by the next read."""
        run, attr = self._run, self._attr
        fcntl.flock(self._lock_fd, fcntl.LOCK_EX)
        try:
            first = 0
            while first < self.n_slots:
                run.first_slot = first
                bpf_syscall.bpf(
                    bpf_syscall.BPF_PROG_TEST_RUN, attr, "cannot run the counter summing program"
                )
                if attr.retval == 0:
                    raise DatapathError(
                        f"summing the counters stopped at slot {first} of {self.n_slots}: "
                        "it was unreadable on some CPU"
                    )
                first += attr.retval
            np.copyto(self._sums, self._shared)
        finally:
            fcntl.flock(self._lock_fd, fcntl.LOCK_UN)
        return self._sums

    def close(self) -> None:
        """Release the program, the maps and the mapping."""
        if self._mapping is not None:
            self._shared = np.zeros((0, 4), dtype=np.uint64)  # drop the view before unmapping
            self._mapping.close()
            self._mapping = None
        while self._fds:
            os.close(self._fds.pop())

    def __enter__(self) -> CounterSums:
        return self

    def __exit__(
        self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()
