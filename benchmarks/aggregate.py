"""One full counter poll (read, sum over CPUs, deltas, rollup) at 1,000 / 65,536 / 1,000,000 slots.

desanet's path, the gateway's own: the pinned summing program
(ebpf/counter_sums.bpf.c) adds the CPUs up inside the kernel into a
memory-mapped array, meter.poll.CounterReader copies the sums out, the Cython
core does deltas and rollup. Peers, measured in the same run in alternating
order on the same per-CPU map of struct desanet_counters: one
BPF_MAP_LOOKUP_BATCH of every slot on every CPU with the Cython `sum_cpus`
(the fastest read without a program of our own), BCC `items()` with Python
sums (the naive path), BCC `items_lookup_batch()` with Python sums, and the
numpy twin on desanet's read. The peers hand their sums to the Cython core for
deltas and rollup, which flatters them: only their collection differs. Every
slot moves between polls, the worst case for the rollup.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import time
from collections.abc import Callable, Iterable
from pathlib import Path
from types import ModuleType
from typing import Any

import numpy as np
import numpy.typing as npt
from bcc import BPF
from bcc.libbcc import lib as libbcc

from desanet import cython_ext
from desanet.benchmarks.common import Report, median, parse_args
from desanet.ebpf import abi, counter_sums, maps
from desanet.errors import DatapathError
from desanet.meter.poll import CounterReader

SIZES = (1_000, 65_536, 1_000_000)
PROGRAM = "#include <desanet_abi.h>\n" + "".join(
    f"BPF_PERCPU_ARRAY(counters_{n}, struct desanet_counters, {n});\n" for n in SIZES
)
OURS = "desanet: kernel sum + Cython"
BATCH = "batch lookup + Cython sum_cpus"
TWIN = "numpy twin: kernel sum + numpy"
BCC_BATCH = "BCC items_lookup_batch()"
BCC_ITEMS = "BCC items()"
HEADLINE_PEERS = {"bcc_items": BCC_ITEMS, "bcc_batch": BCC_BATCH}


class BatchRead:
    """The batch peer: every slot on every CPU in one BPF_MAP_LOOKUP_BATCH, summed by a backend."""

    def __init__(self, fd: int, n_slots: int, backend: ModuleType) -> None:
        self.fd = fd
        self.backend = backend
        self.n_cpus = len(counter_sums.possible_cpus())
        # A per-CPU value is n_cpus consecutive copies of the 8-byte-aligned struct.
        self.percpu = np.empty((n_slots, self.n_cpus, 4), dtype=np.uint64)
        self.keys = np.empty(n_slots, dtype=np.uint32)
        self.sums = np.empty((n_slots, 4), dtype=np.uint64)

    def read_percpu(self) -> npt.NDArray[np.uint64]:
        """(n_slots, n_cpus, 4) as the kernel holds them."""
        n = self.keys.shape[0]
        stride = self.n_cpus * ctypes.sizeof(abi.Counters)
        got = maps.lookup_batch(
            self.fd, self.keys.ctypes.data, self.percpu.ctypes.data, n, 4, stride
        )
        if got != n:
            raise DatapathError(f"the counters map returned {got} of {n} slots")
        return self.percpu

    def read(self) -> npt.NDArray[np.uint64]:
        """Cumulative sums over CPUs, (n_slots, 4)."""
        return self.backend.sum_cpus(self.read_percpu(), self.sums)

    def close(self) -> None:
        """Nothing to release: the map belongs to the BCC module."""


def pin_for_summing(table: Any, pin_dir: Path) -> None:
    """Pin a BCC counters table as a datapath would, and load the summing program beside it."""
    pin_dir.mkdir(parents=True)
    if libbcc.bpf_obj_pin(table.map_fd, str(pin_dir / abi.MAP_COUNTERS).encode()) != 0:
        raise DatapathError(f"cannot pin the benchmark's counters in {pin_dir}")
    counter_sums.load(pin_dir)


def unpin(pin_dir: Path) -> None:
    """Remove what pin_for_summing left in bpffs."""
    for child in pin_dir.iterdir():
        child.unlink()
    pin_dir.rmdir()


class Bench:
    """A per-CPU counters map of one size, a way to advance it, and the polls under test."""

    def __init__(self, bpf: Any, n: int, pin_dir: Path) -> None:
        self.n = n
        self.table = bpf.get_table(f"counters_{n}".encode())
        fast = cython_ext.load_backend("cython")
        twin = cython_ext.load_backend("python")
        pin_for_summing(self.table, pin_dir)
        self.readers: dict[str, CounterReader | BatchRead] = {
            OURS: CounterReader.open(pin_dir),
            BATCH: BatchRead(self.table.map_fd, n, fast),
            TWIN: CounterReader.open(pin_dir),
        }
        self.aggregators = {
            OURS: fast.Aggregator(n),
            BATCH: fast.Aggregator(n),
            TWIN: twin.Aggregator(n),
            BCC_BATCH: fast.Aggregator(n),
            BCC_ITEMS: fast.Aggregator(n),
        }
        self.read_ms: dict[str, list[float]] = {name: [] for name in self.readers}
        ncpu = len(counter_sums.possible_cpus())
        self.base = np.random.default_rng(n).integers(
            0, 1 << 40, size=(n, ncpu, 4), dtype=np.uint64
        )
        self.step = 0
        self.keys = (self.table.Key * n)(*range(n))
        self.leaves = (self.table.Leaf * n)()
        self.sums = np.zeros((n, 4), dtype=np.uint64)

    def advance(self) -> None:
        """Every slot on every CPU counts more traffic (not timed)."""
        self.step += 1
        values = self.base + np.uint64(self.step * 1_500)
        ctypes.memmove(self.leaves, values.ctypes.data, values.nbytes)
        self.table.items_update_batch(self.keys, self.leaves)

    def ours(self, name: str) -> Callable[[], None]:
        """A full poll through a reader (desanet's, or the batch peer) and its aggregator."""
        reader = self.readers[name]

        def poll() -> None:
            start = time.perf_counter()
            cumulative = reader.read()
            self.read_ms[name].append((time.perf_counter() - start) * 1e3)
            self._aggregate(name, cumulative)

        return poll

    def bcc_batch(self) -> None:
        self._bcc_sums(self.table.items_lookup_batch())
        self._aggregate(BCC_BATCH, self.sums)

    def bcc_items(self) -> None:
        self._bcc_sums(self.table.items())
        self._aggregate(BCC_ITEMS, self.sums)

    def _bcc_sums(self, items: Iterable[tuple[Any, Any]]) -> None:
        sums = self.sums
        for key, per_cpu in items:
            sums[int(getattr(key, "value", key))] = [
                sum(c.up_bytes for c in per_cpu),
                sum(c.up_pkts for c in per_cpu),
                sum(c.down_bytes for c in per_cpu),
                sum(c.down_pkts for c in per_cpu),
            ]

    def _aggregate(self, name: str, cumulative: np.ndarray) -> None:
        agg = self.aggregators[name]
        agg.poll(cumulative, self.step * 1_000)
        agg.rollup(self.step * 1_000)

    def close(self) -> None:
        for reader in self.readers.values():
            reader.close()


def measure(
    bench: Bench, cases: dict[str, Callable[[], None]], rounds: int
) -> dict[str, list[float]]:
    """Ms per poll of each case; each round advances the counters, then runs every case."""
    bench.advance()
    for fn in cases.values():
        fn()  # first poll of each aggregator: buffers touched, baseline taken
    times: dict[str, list[float]] = {name: [] for name in cases}
    names = list(cases)
    for r in range(rounds):
        bench.advance()
        # Rotate the order so no case always runs right after the map update.
        for name in names[r % len(names) :] + names[: r % len(names)]:
            start = time.perf_counter()
            cases[name]()
            times[name].append((time.perf_counter() - start) * 1e3)
    return times


def main() -> None:
    args = parse_args(__doc__ or "aggregate benchmark")
    report = Report(
        "aggregate",
        ["slots", "path", "ms/poll", "best ms/poll", "of which read ms", "desanet speedup"],
        quick=args.quick,
    )
    load_start = os.getloadavg()[0]
    bpf = BPF(text=PROGRAM.encode(), cflags=[f"-I{abi.HEADER.parent}"])
    pins = abi.BPFFS / f"desanet-bench-{os.getpid()}"
    try:
        for n in SIZES:
            bench = Bench(bpf, n, pins / str(n))
            cases: dict[str, Callable[[], None]] = {
                name: bench.ours(name) for name in (OURS, BATCH, TWIN)
            }
            if not (args.quick and n >= 1_000_000):
                cases[BCC_BATCH] = bench.bcc_batch
            if n < 1_000_000 and not (args.quick and n > 1_000):
                cases[BCC_ITEMS] = bench.bcc_items
            rounds = 2 if args.quick else {1_000: 30, 65_536: 21, 1_000_000: 3}[n]
            times = measure(bench, cases, rounds)
            if n >= 1_000_000 and not args.quick:
                # items() takes seconds per poll at this size: one poll, timed alone.
                bench.advance()
                start = time.perf_counter()
                bench.bcc_items()
                times[BCC_ITEMS] = [(time.perf_counter() - start) * 1e3]
            bench.close()
            results = {name: median(t) for name, t in times.items()}
            ours = results[OURS]
            for name, ms in results.items():
                read = bench.read_ms.get(name)
                report.add(
                    slots=n,
                    path=name,
                    **{
                        "ms/poll": ms,
                        "best ms/poll": min(times[name]),
                        "desanet speedup": ms / ours,
                    },
                    **({"of which read ms": median(read[1:])} if read else {}),
                )
            if n != 1_000:
                report.headline[f"poll_ms_{n}"] = ours
            if n == 65_536:
                for key, name in HEADLINE_PEERS.items():
                    if name in results:
                        report.headline[f"speedup_vs_{key}_{n}"] = results[name] / ours
    finally:
        bpf.cleanup()
        if pins.exists():
            for pin_dir in pins.iterdir():
                unpin(pin_dir)
            with contextlib.suppress(OSError):
                pins.rmdir()
    report.notes.append(
        "peers collect the sums their own way, then use the Cython core for deltas and rollup"
    )
    report.notes.append("ms/poll is the median over rounds, best ms/poll the fastest round")
    if args.quick:
        report.notes.append("quick: BCC items() only at 1,000 slots, no BCC peers at 1,000,000")
    else:
        report.notes.append("BCC items() at 1,000,000 slots: a single poll, timed alone")
    # The cores are shared: say how busy they were, since medians move with it.
    load_end = os.getloadavg()[0]
    report.notes.append(
        f"load average (1 min) {load_start:.1f} at the start, {load_end:.1f} at the end"
    )
    report.finish(args)


if __name__ == "__main__":
    main()
