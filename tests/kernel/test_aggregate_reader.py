"""The counter reader on real per-CPU maps: every slot on every CPU, summed exactly, one call."""

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
from desanet.ebpf import abi
from desanet.ebpf.percpu_sum import KernelSum
from desanet.errors import DatapathError, ValidationError
from desanet.meter.poll import CounterReader, Poller, possible_cpus

pytestmark = pytest.mark.kernel

SLOTS = 1_000
BIG = 70_000  # more than one in-kernel summing run (CHUNK_SLOTS)
PROGRAM = f"""
struct desanet_counters {{ u64 up_bytes; u64 up_pkts; u64 down_bytes; u64 down_pkts; }};
BPF_PERCPU_ARRAY(counters, struct desanet_counters, {SLOTS});
BPF_PERCPU_ARRAY(big, struct desanet_counters, {BIG});
BPF_PERCPU_ARRAY(wrong_shape, u64, 8);
"""
# (read method, aggregator backend summing a batch read)
READERS = [("kernel", "cython"), ("batch", "cython"), ("batch", "python")]


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


@pytest.mark.parametrize(("method", "backend_name"), READERS)
def test_reads_every_slot_on_every_cpu_exactly(bpf: Any, method: str, backend_name: str) -> None:
    table = bpf.get_table(b"counters")
    ncpu = len(possible_cpus())
    rng = np.random.default_rng(3)
    values = rng.integers(0, 1 << 62, size=(SLOTS, ncpu, 4), dtype=np.uint64)
    values[7] = np.uint64((1 << 63) - 1)  # near the top: the per-CPU sum wraps modulo 2^64
    fill(table, values)
    backend = cython_ext.load_backend(backend_name)
    with CounterReader.from_fd(table.map_fd, backend, method) as reader:
        assert (reader.n_slots, reader.n_cpus) == (SLOTS, ncpu)
        assert reader.read().tolist() == values.sum(axis=1, dtype=np.uint64).tolist()
        assert reader.read_percpu().tolist() == values.tolist()
        # BCC's own view of the same map agrees, slot by slot.
        for slot in (0, 7, SLOTS - 1):
            bcc_row = [
                sum(getattr(c, f) for c in table[slot]) % (1 << 64) for f in abi.COUNTER_FIELDS
            ]
            assert reader.read()[slot].tolist() == bcc_row


@pytest.mark.parametrize("method", ["kernel", "batch"])
def test_reads_a_map_larger_than_one_summing_run(bpf: Any, method: str) -> None:
    table = bpf.get_table(b"big")
    ncpu = len(possible_cpus())
    values = np.random.default_rng(5).integers(0, 1 << 40, size=(BIG, ncpu, 4), dtype=np.uint64)
    fill(table, values)
    with CounterReader.from_fd(table.map_fd, method=method) as reader:
        assert reader.read().tolist() == values.sum(axis=1, dtype=np.uint64).tolist()
        values[BIG - 1, ncpu - 1, 3] += np.uint64(1)  # the very last counter moves
        fill(table, values)
        assert int(reader.read()[BIG - 1, 3]) == int(values[BIG - 1, :, 3].sum())


def test_a_slot_unreadable_on_some_cpu_is_an_error_not_a_short_read(bpf: Any) -> None:
    table = bpf.get_table(b"counters")
    missing_cpu = 1 << 20  # past any kernel's CPU ids: the per-CPU lookup finds nothing
    summing = KernelSum(table.map_fd, SLOTS, [0, missing_cpu])
    try:
        with pytest.raises(DatapathError, match="unreadable on some CPU"):
            summing.run()
    finally:
        summing.close()


def test_refuses_a_map_that_is_not_the_counters(bpf: Any) -> None:
    with pytest.raises(DatapathError, match="not a per-CPU array of struct desanet_counters"):
        CounterReader.from_fd(bpf.get_table(b"wrong_shape").map_fd)
    with pytest.raises(ValidationError, match="use one of kernel, batch"):
        CounterReader.from_fd(bpf.get_table(b"counters").map_fd, method="mmap")
    with pytest.raises(DatapathError, match="is the datapath attached"):
        CounterReader.open("/sys/fs/bpf/desanet/no-such-gateway/br-lan/counters")


def test_a_recreated_map_rebases_and_totals_carry_forward(bpf: Any, pin_dir: Path) -> None:
    table = bpf.get_table(b"counters")
    ncpu = len(possible_cpus())
    values = np.zeros((SLOTS, ncpu, 4), dtype=np.uint64)
    values[5, 0] = [10_000, 10, 20_000, 20]
    fill(table, values)
    pinned = pin_dir / "counters"
    pin(table, pinned)
    aggregator = cython_ext.load_backend().Aggregator(SLOTS)
    poller = Poller(CounterReader.open(pinned), aggregator)
    poller.poll(1_000)
    first_identity = poller.reader.identity
    # The datapath restarts with a fresh map holding less than the old one counted...
    second = BPF(text=PROGRAM.encode())
    try:
        fresh = second.get_table(b"counters")
        values[5, 0] = [3_000, 3, 4_000, 4]
        fill(fresh, values)
        pinned.unlink()
        pin(fresh, pinned)
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
