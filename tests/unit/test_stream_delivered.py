"""Billed = delivered: the class-sent correction, restarts of each counter source, persistence.

Also the read of only the leaves that can have moved: the same bills as a full
dump, while a tick asks the kernel only for the leaves whose counters moved.
"""

from __future__ import annotations

import random
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np
import pytest

from desanet.cython_ext import twin
from desanet.meter.delivered import LINGER_READS, DeliveredReader, split_state

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


@dataclass
class Leaf:
    """A leaf qdisc: what it sent and what it still holds (packets of IP bytes)."""

    sent_bytes: int = 0
    sent_packets: int = 0
    queue: list[int] = field(default_factory=list)

    @property
    def backlog_packets(self) -> int:
        return len(self.queue)


class Village:
    """Datapath counters and leaves moved by the same packets, as in the kernel."""

    def __init__(self, n_slots: int, shaped: set[int]) -> None:
        self.datapath = FakeDatapath(n_slots)
        self.leaves = {d: {s: Leaf() for s in shaped} for d in ("up", "down")}
        self.delivered = np.zeros((n_slots, 4), dtype=np.uint64)
        self.asked: list[dict[str, list[int]]] = []

    def offer(self, direction: str, slot: int, ip_bytes: int) -> None:
        b, p = (0, 1) if direction == "up" else (2, 3)
        self.datapath.counters[slot, b] += ip_bytes
        self.datapath.counters[slot, p] += 1
        leaf = self.leaves[direction].get(slot)
        if leaf is None:  # no class: what the datapath counted is delivered
            self.delivered[slot, b] += ip_bytes
            self.delivered[slot, p] += 1
        elif len(leaf.queue) < 8:  # a full queue drops
            leaf.queue.append(ip_bytes)

    def dequeue(self, per_leaf: int) -> None:
        for direction, leaves in self.leaves.items():
            b, p = (0, 1) if direction == "up" else (2, 3)
            for slot, leaf in leaves.items():
                for ip_bytes in leaf.queue[:per_leaf]:
                    leaf.sent_bytes += ip_bytes + 14
                    leaf.sent_packets += 1
                    self.delivered[slot, b] += ip_bytes
                    self.delivered[slot, p] += 1
                del leaf.queue[:per_leaf]

    def dump(self) -> dict[str, dict[int, Leaf]]:
        return {d: dict(leaves) for d, leaves in self.leaves.items()}

    def by_handle(self, slots: Mapping[str, Sequence[int]]) -> dict[str, dict[int, Leaf]]:
        self.asked.append({d: list(s) for d, s in slots.items()})
        return {
            d: {s: self.leaves[d][s] for s in wanted if s in self.leaves[d]}
            for d, wanted in slots.items()
        }


def test_reading_only_moved_leaves_bills_what_a_full_dump_bills() -> None:
    rng = random.Random(16)
    village = Village(64, shaped=set(range(1, 60)))
    full = DeliveredReader(village.datapath, village.dump)
    moved = DeliveredReader(village.datapath, village.dump, village.by_handle)
    for tick in range(200):
        if tick < 150:
            for _ in range(rng.randrange(3)):
                slot, direction = rng.randrange(64), rng.choice(("up", "down"))
                for _ in range(rng.randrange(1, 10)):  # a burst fills the queue
                    village.offer(direction, slot, rng.randrange(28, 1500))
        # Queues drain slower than they fill: bytes leave well after their counter stopped.
        village.dequeue(per_leaf=1)
        assert moved.read().tolist() == full.read().tolist()
    assert not any(leaf.queue for leaves in village.leaves.values() for leaf in leaves.values())
    assert moved.read().tolist() == village.delivered.tolist()


def test_a_tick_asks_only_for_the_leaves_that_can_have_moved() -> None:
    village = Village(10_001, shaped=set(range(1, 10_001)))
    reader = DeliveredReader(village.datapath, village.dump, village.by_handle)
    reader.read()  # the first read takes every leaf, by one dump
    assert village.asked == [] and reader.leaves_read == 20_000
    village.offer("down", 7, 1000)
    village.dequeue(per_leaf=8)
    reader.read()
    assert village.asked[-1] == {"up": [], "down": [7]}
    # Slot 7's counter no longer moves: its leaf is read a few more times, then let be.
    for _ in range(5):
        reader.read()
    assert [a["down"] for a in village.asked] == [[7]] * LINGER_READS + [[]] * (6 - LINGER_READS)
    # Until the queue is empty, whatever the countdown says.
    village.offer("up", 9, 500)
    village.offer("up", 9, 500)
    reads = 0
    while village.leaves["up"][9].queue or reads < LINGER_READS:
        reader.read()
        village.dequeue(per_leaf=0 if reads < 5 else 1)
        reads += 1
    reader.read()
    assert village.asked[-2]["up"] == [9] and reads > LINGER_READS
    assert reader.read()[9].tolist() == [1000, 2, 0, 0]
    assert village.asked[-1]["up"] == []


def test_a_replaced_leaf_or_a_new_class_is_billed_from_its_first_byte() -> None:
    village = Village(64, shaped={1, 2})
    reader = DeliveredReader(village.datapath, village.dump, village.by_handle)
    village.offer("down", 1, 1000)
    village.offer("down", 2, 300)
    village.dequeue(per_leaf=8)
    reader.read()
    # The service reads before the shaper replaces slot 1's leaf and removes slot 2's
    # class, and asks for a full read next.
    reader.read()
    reader.read_all_next()
    village.leaves["down"][1] = Leaf()
    del village.leaves["down"][2]
    for _ in range(4):
        reader.read()  # both idle: slot 1's new leaf is seen at zero, slot 2 without a class
    village.leaves["down"][2] = Leaf()  # a new class: nothing is removed, nobody is told
    for _ in range(3):
        village.offer("down", 1, 900)
        village.offer("down", 2, 900)
    village.dequeue(per_leaf=8)
    totals = reader.read()
    assert totals[1].tolist() == [0, 0, 3700, 4] == village.delivered[1].tolist()
    assert totals[2].tolist() == [0, 0, 3000, 4] == village.delivered[2].tolist()


def test_a_failed_leaf_read_loses_nothing() -> None:
    village = Village(64, shaped={1})
    failing = [True]

    def by_handle(slots: Mapping[str, Sequence[int]]) -> dict[str, dict[int, Leaf]]:
        if failing[0]:
            raise OSError("netlink busy")
        return village.by_handle(slots)

    reader = DeliveredReader(village.datapath, village.dump, by_handle)
    reader.read()
    village.offer("up", 1, 400)
    village.offer("up", 2, 200)
    village.dequeue(per_leaf=8)
    with pytest.raises(OSError):
        reader.read()
    failing[0] = False
    totals = reader.read()
    assert totals[1].tolist() == [400, 1, 0, 0] and totals[2].tolist() == [200, 1, 0, 0]
