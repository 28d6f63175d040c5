"""The poller's bookkeeping without a kernel: CPU lists, pin paths, map changes."""

from __future__ import annotations

from pathlib import Path
from typing import cast

import numpy as np
import pytest

from desanet import cython_ext
from desanet.ebpf import abi
from desanet.ebpf.counter_sums import possible_cpus
from desanet.errors import DatapathError
from desanet.meter.poll import CounterReader, Poller

pytestmark = pytest.mark.unit


class FakeReader:
    """Stands in for CounterReader: a counters map whose values and identity the test sets."""

    def __init__(self, n_slots: int, identity: bytes) -> None:
        self.n_slots = n_slots
        self.identity = identity
        self.values = np.zeros((n_slots, 4), dtype=np.uint64)
        self.moved_pin = False
        self.closed = False

    def repinned(self) -> bool:
        return self.moved_pin

    def reopen(self) -> FakeReader:
        fresh = FakeReader(self.n_slots, self.identity + b"'")
        fresh.values = self.values
        self.closed = True
        return fresh

    def read(self) -> np.ndarray:
        return self.values


def test_possible_cpus_reads_the_kernel_list_format(tmp_path: Path) -> None:
    listing = tmp_path / "possible"
    listing.write_text("0-3,6,8-9\n")
    assert possible_cpus(listing) == [0, 1, 2, 3, 6, 8, 9]
    listing.write_text("0\n")
    assert possible_cpus(listing) == [0]


def test_counters_are_found_where_the_datapath_pins_them() -> None:
    path = abi.pin_dir("desa-sukamaju", "br-lan") / abi.MAP_COUNTERS
    assert path == Path("/sys/fs/bpf/desanet/desa-sukamaju/br-lan/counters")


@pytest.mark.parametrize("backend_name", ["cython", "python"])
def test_a_recreated_map_is_followed_and_nothing_is_lost(backend_name: str) -> None:
    aggregator = cython_ext.load_backend(backend_name).Aggregator(3)
    reader = FakeReader(3, b"boot-a/7")
    poller = Poller(cast(CounterReader, reader), aggregator)
    reader.values[1] = [1_000, 1, 2_000, 2]
    assert poller.poll(1_000) == 1
    # The datapath re-pins a fresh map that has already counted past the old values.
    reader.moved_pin = True
    reader.values[1] = [5_000, 5, 6_000, 6]
    assert poller.poll(2_000) == 1
    assert reader.closed and cast(FakeReader, poller.reader).identity == b"boot-a/7'"
    assert aggregator.totals()[1].tolist() == [6_000, 6, 8_000, 8]
    usage = aggregator.rollup(2_000)
    assert (usage.up.tolist(), usage.down.tolist()) == ([6_000], [8_000])


def test_the_aggregator_must_match_the_map() -> None:
    aggregator = cython_ext.load_backend().Aggregator(4)
    with pytest.raises(DatapathError, match="4 slots but the counters map 3"):
        Poller(cast(CounterReader, FakeReader(3, b"x")), aggregator)
