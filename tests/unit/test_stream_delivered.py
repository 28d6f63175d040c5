"""Billed = delivered: the class-sent correction, restarts of each counter source, persistence."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pytest

from desanet.cython_ext import twin
from desanet.meter.delivered import DeliveredReader, split_state

pytestmark = pytest.mark.unit


@dataclass
class Sent:
    sent_bytes: int
    sent_packets: int


class FakeDatapath:
    """Cumulative pre-queue counters, as the datapath map holds them."""

    def __init__(self, n_slots: int) -> None:
        self.n_slots = n_slots
        self.counters = np.zeros((n_slots, 4), dtype=np.uint64)
        self.identity = b"map-1"

    def read(self) -> np.ndarray:
        return self.counters.copy()

    def repinned(self) -> bool:
        return False

    def reopen(self) -> FakeDatapath:
        return self

    def close(self) -> None:
        pass


def frames(ip_bytes: int, packets: int) -> Sent:
    """Leaf qdisc counters for `packets` IP packets totalling `ip_bytes` (plus Ethernet headers)."""
    return Sent(ip_bytes + 14 * packets, packets)


def test_shaped_slots_bill_what_left_the_class() -> None:
    dp = FakeDatapath(3)
    stats: dict[str, dict[int, Sent]] = {"down": {1: frames(0, 0)}, "up": {1: frames(0, 0)}}
    reader = DeliveredReader(dp, lambda: stats)
    # 1000 packets of 1000 IP bytes offered down, 900 delivered, 100 dropped by the shaper;
    # slot 2 has no class: its datapath counts are delivered as they are.
    dp.counters[1] = [5000, 5, 1_000_000, 1000]
    dp.counters[2] = [70, 1, 80, 1]
    stats["down"][1] = frames(900_000, 900)
    stats["up"][1] = frames(5000, 5)
    assert reader.read()[1].tolist() == [5000, 5, 900_000, 900]
    assert reader.read()[2].tolist() == [70, 1, 80, 1]


def test_each_source_restarts_alone_and_nothing_is_counted_twice() -> None:
    dp = FakeDatapath(2)
    stats: dict[str, dict[int, Sent]] = {"down": {1: frames(1000, 10)}, "up": {1: frames(50, 1)}}
    reader = DeliveredReader(dp, lambda: stats)
    assert reader.read()[1].tolist() == [50, 1, 1000, 10]
    # The download leaf is replaced (plan change): its counters start again.
    stats["down"][1] = frames(300, 3)
    stats["up"][1] = frames(80, 2)
    assert reader.read()[1].tolist() == [80, 2, 1300, 13]
    # The datapath map is recreated (reboot): unshaped slot 0 takes the new values whole.
    dp.counters[0] = [10, 1, 10, 1]
    reader.read()
    dp.identity = b"map-2"
    dp.counters[0] = [4, 1, 4, 1]
    assert reader.read()[0].tolist() == [14, 2, 14, 2]


def test_state_survives_a_restart_through_the_journal_state() -> None:
    dp = FakeDatapath(2)
    stats: dict[str, dict[int, Sent]] = {"down": {1: frames(1000, 10)}, "up": {}}
    reader = DeliveredReader(dp, lambda: stats)
    agg = twin.Aggregator(2)
    agg.poll(reader.read(), 1000)
    assert agg.rollup(1000).down.tolist() == [1000]
    journaled = {**agg.state(), **reader.state()}
    # The daemon dies; the kernel keeps counting; a new daemon restores both parts.
    stats["down"][1] = frames(1500, 15)
    reader2 = DeliveredReader(dp, lambda: stats)
    agg2 = twin.Aggregator(2)
    agg_part, delivered_part = split_state(journaled)
    agg2.restore(agg_part)
    reader2.restore(delivered_part)
    agg2.poll(reader2.read(), 2000)
    interval = agg2.rollup(2000)
    assert interval.down.tolist() == [500] and interval.down_total.tolist() == [1500]
