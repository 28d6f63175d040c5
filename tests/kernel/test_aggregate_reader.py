"""The counter reader on real per-CPU maps: every slot on every CPU, summed exactly in the kernel.

Each test pins a per-CPU map as a datapath would, loads the summing program
beside it (ebpf/counter_sums.py, as Datapath.attach does) and reads through
meter.poll.CounterReader, the gateway's own path.
"""

from __future__ import annotations

import ctypes
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from bcc import BPF
from bcc.libbcc import lib as libbcc

from desanet import cython_ext
from desanet.benchmarks.aggregate import BatchRead
from desanet.ebpf import abi, counter_sums
from desanet.ebpf.counter_sums import possible_cpus
from desanet.errors import DatapathError
from desanet.meter.poll import CounterReader, Poller

pytestmark = pytest.mark.kernel

SLOTS = 1_000
BIG = 70_000  # more slots than one run of the summing program sums
PROGRAM = f"""
struct desanet_counters {{ u64 up_bytes; u64 up_pkts; u64 down_bytes; u64 down_pkts; }};
BPF_PERCPU_ARRAY(counters, struct desanet_counters, {SLOTS});
BPF_PERCPU_ARRAY(big, struct desanet_counters, {BIG});
BPF_PERCPU_ARRAY(wrong_shape, u64, 8);
"""


@pytest.fixture(scope="module")
def bpf() -> Iterator[Any]:
    program = BPF(text=PROGRAM.encode())
    yield program
    program.cleanup()


def fill(table: Any, values: np.ndarray) -> None:
    """Write (slots, cpus, 4) values into a BCC per-CPU table with one update batch."""
    n = values.shape[0]
    keys = (table.Key * n)(*range(n))
    leaves = (table.Leaf * n)()
    # A BCC per-CPU leaf is ncpu consecutive structs: the same bytes as the numpy rows.
    assert ctypes.sizeof(leaves) == values.nbytes
    ctypes.memmove(leaves, np.ascontiguousarray(values).ctypes.data, values.nbytes)
    table.items_update_batch(keys, leaves)


@pytest.fixture
def pin_dir() -> Iterator[Path]:
    path = Path("/sys/fs/bpf") / f"desanet-test-{os.getpid()}"
    path.mkdir()
    yield path
    for child in path.iterdir():
        child.unlink()
    path.rmdir()


def pin(table: Any, path: Path) -> None:
    assert libbcc.bpf_obj_pin(table.map_fd, str(path).encode()) == 0, os.strerror(
        ctypes.get_errno()
    )


def summed(table: Any, pin_dir: Path) -> Path:
    """Pin `table` as a datapath's counters in `pin_dir` and load the summing program there."""
    pin(table, pin_dir / abi.MAP_COUNTERS)
    counter_sums.load(pin_dir)
    return pin_dir


def test_reads_every_slot_on_every_cpu_exactly(bpf: Any, pin_dir: Path) -> None:
    table = bpf.get_table(b"counters")
    ncpu = len(possible_cpus())
    rng = np.random.default_rng(3)
    values = rng.integers(0, 1 << 62, size=(SLOTS, ncpu, 4), dtype=np.uint64)
    values[7] = np.uint64((1 << 63) - 1)  # near the top: the per-CPU sum wraps modulo 2^64
    fill(table, values)
    with CounterReader.open(summed(table, pin_dir)) as reader:
        assert reader.n_slots == SLOTS
        assert reader.read().tolist() == values.sum(axis=1, dtype=np.uint64).tolist()
        # BCC's own view of the same map agrees, slot by slot.
        for slot in (0, 7, SLOTS - 1):
            bcc_row = [
                sum(getattr(c, f) for c in table[slot]) % (1 << 64) for f in abi.COUNTER_FIELDS
            ]
            assert reader.read()[slot].tolist() == bcc_row
        # So does the benchmark's batch peer, per CPU and summed by either aggregator backend.
        for backend_name in cython_ext.BACKENDS:
            batch = BatchRead(table.map_fd, SLOTS, cython_ext.load_backend(backend_name))
            assert batch.read_percpu().tolist() == values.tolist()
            assert batch.read().tolist() == reader.read().tolist(), backend_name


def test_reads_a_map_larger_than_one_summing_run(bpf: Any, pin_dir: Path) -> None:
    table = bpf.get_table(b"big")
    ncpu = len(possible_cpus())
    assert counter_sums.chunk_slots(ncpu) < BIG
    values = np.random.default_rng(5).integers(0, 1 << 40, size=(BIG, ncpu, 4), dtype=np.uint64)
    fill(table, values)
    with CounterReader.open(summed(table, pin_dir)) as reader:
        assert reader.read().tolist() == values.sum(axis=1, dtype=np.uint64).tolist()
        values[BIG - 1, ncpu - 1, 3] += np.uint64(1)  # the very last counter moves
        fill(table, values)
        assert int(reader.read()[BIG - 1, 3]) == int(values[BIG - 1, :, 3].sum())


def test_a_slot_unreadable_on_some_cpu_is_an_error_not_a_short_read(
    bpf: Any, pin_dir: Path
) -> None:
    table = bpf.get_table(b"counters")
    pin(table, pin_dir / abi.MAP_COUNTERS)
    # One CPU more than the kernel has: the per-CPU lookup of that one finds nothing.
    counter_sums.load(pin_dir, cpus=range(len(possible_cpus()) + 1))
    with (
        CounterReader.open(pin_dir) as reader,
        pytest.raises(DatapathError, match="unreadable on some CPU"),
    ):
        reader.read()


@pytest.mark.parametrize("n_cpus", [1, 4, 16, 64, 256])
def test_the_summing_program_verifies_for_machines_of_many_sizes(
    bpf: Any, pin_dir: Path, n_cpus: int
) -> None:
    # Loading is the verifier's whole judgement: runs of chunk_slots(n_cpus) slots pass it.
    pin(bpf.get_table(b"big"), pin_dir / abi.MAP_COUNTERS)
    counter_sums.load(pin_dir, cpus=range(n_cpus))
    assert (pin_dir / abi.PROG_SUM_COUNTERS).exists()


def test_refuses_a_map_that_is_not_the_counters(bpf: Any, pin_dir: Path) -> None:
    pin(bpf.get_table(b"wrong_shape"), pin_dir / abi.MAP_COUNTERS)
    with pytest.raises(DatapathError, match="not a per-CPU array of struct desanet_counters"):
        counter_sums.load(pin_dir)
    with pytest.raises(DatapathError, match="is the datapath attached"):
        CounterReader.open("/sys/fs/bpf/desanet/no-such-gateway/br-lan")


def test_refuses_a_summing_program_of_other_counters(bpf: Any, pin_dir: Path) -> None:
    summed(bpf.get_table(b"counters"), pin_dir)
    second = BPF(text=PROGRAM.encode())
    try:
        # Another map pinned as the counters, the program still summing the first one.
        (pin_dir / abi.MAP_COUNTERS).unlink()
        pin(second.get_table(b"counters"), pin_dir / abi.MAP_COUNTERS)
        with pytest.raises(DatapathError, match="does not read these counters"):
            CounterReader.open(pin_dir)
    finally:
        second.cleanup()


def test_a_recreated_map_rebases_and_totals_carry_forward(bpf: Any, pin_dir: Path) -> None:
    table = bpf.get_table(b"counters")
    ncpu = len(possible_cpus())
    values = np.zeros((SLOTS, ncpu, 4), dtype=np.uint64)
    values[5, 0] = [10_000, 10, 20_000, 20]
    fill(table, values)
    aggregator = cython_ext.load_backend().Aggregator(SLOTS)
    poller = Poller(CounterReader.open(summed(table, pin_dir)), aggregator)
    poller.poll(1_000)
    first_identity = poller.reader.identity
    # The datapath restarts with a fresh map holding less than the old one counted...
    second = BPF(text=PROGRAM.encode())
    try:
        fresh = second.get_table(b"counters")
        values[5, 0] = [3_000, 3, 4_000, 4]
        fill(fresh, values)
        (pin_dir / abi.MAP_COUNTERS).unlink()
        summed(fresh, pin_dir)
        poller.poll(2_000)
        assert poller.reader.identity != first_identity
        assert aggregator.totals()[5].tolist() == [13_000, 13, 24_000, 24]
        # ...and once its counters overtake the old ones, nothing is lost either.
        values[5, 0] = [50_000, 50, 60_000, 60]
        fill(fresh, values)
        poller.poll(3_000)
        assert aggregator.totals()[5].tolist() == [60_000, 60, 80_000, 80]
        usage = aggregator.rollup(3_000)
        assert (usage.slots.tolist(), usage.up.tolist()) == ([5], [60_000])
        poller.reader.close()
    finally:
        second.cleanup()


def test_two_readers_share_the_sums_and_each_sees_its_own_read(bpf: Any, pin_dir: Path) -> None:
    table = bpf.get_table(b"counters")
    ncpu = len(possible_cpus())
    values = np.zeros((SLOTS, ncpu, 4), dtype=np.uint64)
    values[3, 0] = [1_000, 1, 0, 0]
    fill(table, values)
    with CounterReader.open(summed(table, pin_dir)) as first, CounterReader.open(pin_dir) as second:
        seen_first = first.read()
        values[3, 0] = [5_000, 5, 0, 0]
        fill(table, values)
        assert second.read()[3].tolist() == [5_000, 5, 0, 0]
        # The second reader's run rewrote the shared sums; the first one's read is its own.
        assert seen_first[3].tolist() == [1_000, 1, 0, 0]
