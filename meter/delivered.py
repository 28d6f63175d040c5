"""Billed = delivered: cumulative counters of what left each subscriber's HTB class.

The datapath counts a packet when tc hands it to the queue (LAN egress for
"down", LAN ingress for "up"), before HTB can drop it. The shaper's leaf qdisc
of each subscriber class counts what it dequeued towards the wire:
`sent_bytes` there are link-layer bytes (14 bytes of Ethernet header per
packet, GSO super-packets counted per segment) and `sent_packets` are wire
packets, so

    delivered IP bytes = sent_bytes - 14 * sent_packets,   delivered packets = sent_packets

`DeliveredReader` wraps the datapath's counter reader and gives the poller,
per slot and direction, a cumulative count built from those deltas: from the
class when the slot has one in that direction, from the datapath otherwise
(slot 0, unshaped slots). Leaf counters restart when a leaf is replaced and
datapath counters when the map is recreated; each source restarts
independently here (per slot and direction), so the cumulative output never
goes backwards and never counts anything twice. Its state goes into the
journal with the aggregator's (`state()`/`restore()`), so it survives kill -9
and reboots the same way.

Given `class_stats_of` (read the leaves of some slots by handle), a read asks
the kernel only for the leaves that can have moved, so a tick costs what the
traffic costs, not what the subscriber list costs: a slot is read when its
datapath counter moved (every byte a leaf sends was counted there first), for
`LINGER_READS` reads after that (a packet counted just before the datapath
read may reach its queue just after the leaf read), and for as long as its
leaf still holds a backlog (a queue drains after its traffic stopped). A
slot read without a class restarts its leaf counters from zero, so the class
it gets next is billed from its first byte. Everything is read, by one dump,
on the first read, when the datapath map changes and after `read_all_next()`
(the service calls it before the shaper removes or replaces a leaf, whose
successor starts from zero): nothing else moves a leaf, so no background
sweep is needed. Without `class_stats_of` every read dumps every leaf (the
peer in benchmarks/service_cost.py).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any, Protocol, cast

import numpy as np
import numpy.typing as npt

from desanet.errors import StreamError
from desanet.meter.poll import CounterSource

ETHERNET_HEADER_BYTES = 14
STATE_PREFIX = "delivered."
# Columns of a counter row (ebpf.abi.COUNTER_FIELDS) fed by each direction's classes.
DIRECTION_COLUMNS = {"up": (0, 1), "down": (2, 3)}
_IDENTITY = b"desanet-delivered-v1"

U64 = npt.NDArray[np.uint64]


class SentStats(Protocol):
    """What a class reports about what it sent (shaper.readback.ClassStats has it)."""

    @property
    def sent_bytes(self) -> int: ...

    @property
    def sent_packets(self) -> int: ...


class LeafStats(SentStats, Protocol):
    """What a leaf reports, with the packets still queued in it."""

    @property
    def backlog_packets(self) -> int: ...


ClassStatsFn = Callable[[], Mapping[str, Mapping[int, SentStats]]]
# The leaves of some slots by direction; slots without a class are left out.
ClassStatsOfFn = Callable[[Mapping[str, Sequence[int]]], Mapping[str, Mapping[int, LeafStats]]]

# Reads of a slot's leaf after its datapath counter last moved (that read included).
LINGER_READS = 3
# Above this share of all leaves, one dump costs less than reading them one by one
# (at 10,000 subscribers: the dump 72-92 ms, one leaf by handle 8.4 us).
_DUMP_SHARE = 0.25


def _deltas(now: U64, last: U64) -> U64:
    """Per (slot, direction) pair of columns: now - last, or now whole where either went back."""
    pairs_now = now.reshape(now.shape[0], 2, 2)
    pairs_last = last.reshape(last.shape[0], 2, 2)
    restarted = (pairs_now < pairs_last).any(axis=2, keepdims=True)
    base = np.where(restarted, np.uint64(0), pairs_last)
    return (pairs_now - base).reshape(now.shape)


class DeliveredReader:
    """A counter reader whose bytes and packets are what the shaper delivered."""

    def __init__(
        self,
        reader: CounterSource,
        class_stats: ClassStatsFn,
        class_stats_of: ClassStatsOfFn | None = None,
    ) -> None:
        self.reader = reader
        self.class_stats = class_stats
        self.class_stats_of = class_stats_of
        self.n_slots = reader.n_slots
        n = self.n_slots
        self._cumulative = np.zeros((n, 4), dtype=np.uint64)
        self._datapath_last = np.zeros((n, 4), dtype=np.uint64)
        self._class_last = np.zeros((n, 4), dtype=np.uint64)
        self._source = np.frombuffer(reader.identity, dtype=np.uint8).copy()
        # Per direction and slot: reads left before its leaf is let be (with class_stats_of).
        self._due = {d: np.zeros(n, dtype=np.int8) for d in DIRECTION_COLUMNS}
        self._read_all = True
        self.leaves_read = 0  # leaves the last read asked the kernel for (all of them: a dump)

    @property
    def identity(self) -> bytes:
        # Constant: datapath map changes are absorbed here, the output never restarts.
        return _IDENTITY

    def repinned(self) -> bool:
        """True when the datapath map was recreated (the poller then calls `reopen`)."""
        return self.reader.repinned()

    def reopen(self) -> DeliveredReader:
        """Follow the datapath to its new map, keeping the delivered totals."""
        self.reader = self.reader.reopen()
        return self

    def close(self) -> None:
        """Close the underlying reader."""
        self.reader.close()

    def read_all_next(self) -> None:
        """Read every leaf at the next read (call before leaves are removed or replaced)."""
        self._read_all = True

    def read(self) -> U64:
        """Cumulative delivered IP bytes and packets per slot, (n_slots, 4) uint64."""
        raw = self.reader.read()
        source = np.frombuffer(self.reader.identity, dtype=np.uint8)
        # A new map (reboot, reload) counts from zero: take its values whole.
        new_source = not np.array_equal(source, self._source)
        last = np.zeros_like(raw) if new_source else self._datapath_last
        # Only the slots whose counters moved: the others add nothing.
        moved = np.flatnonzero((raw != last).any(axis=1))
        added = np.zeros((self.n_slots, 4), dtype=np.uint64)
        added[moved] = _deltas(raw[moved], last[moved])
        asked, by_direction = self._leaf_stats(added, new_source)

        # Nothing is kept before the leaves were read: a failed read is retried whole.
        for direction, by_slot in by_direction.items():
            if direction not in DIRECTION_COLUMNS:
                continue
            b, p = DIRECTION_COLUMNS[direction]
            slots = [slot for slot in by_slot if 0 < slot < self.n_slots]
            leaves = [by_slot[slot] for slot in slots]
            packets = np.array([leaf.sent_packets for leaf in leaves], dtype=np.int64)
            frames = np.array([leaf.sent_bytes for leaf in leaves], dtype=np.int64)
            sent = np.zeros((len(slots), 2), dtype=np.uint64)
            sent[:, 0] = np.maximum(frames - ETHERNET_HEADER_BYTES * packets, 0)
            sent[:, 1] = packets
            index = np.array(slots, dtype=np.intp)
            before = self._class_last[index][:, [b, p]]
            restarted = (sent < before).any(axis=1, keepdims=True)
            added[index, b], added[index, p] = (sent - np.where(restarted, 0, before)).T
            self._class_last[index, b], self._class_last[index, p] = sent.T
            if asked is not None:
                # Slots asked for without a class: a class they get later counts from zero.
                gone = np.setdiff1d(asked[direction], index, assume_unique=True)
                self._class_last[gone, b] = self._class_last[gone, p] = 0
        self._cumulative += added
        self._datapath_last[:] = raw
        if new_source:
            self._source = source.copy()
        return self._cumulative

    def _leaf_stats(
        self, datapath_delta: U64, new_source: bool
    ) -> tuple[dict[str, npt.NDArray[np.intp]] | None, Mapping[str, Mapping[int, SentStats]]]:
        """(slots asked for by direction, None for all; their leaves' statistics)."""
        if self.class_stats_of is None:
            self.leaves_read = 2 * (self.n_slots - 1)
            return None, self.class_stats()
        moved = {
            direction: (datapath_delta[:, b] != 0) | (datapath_delta[:, p] != 0)
            for direction, (b, p) in DIRECTION_COLUMNS.items()
        }
        asked: dict[str, npt.NDArray[np.intp]] = {}
        for direction in DIRECTION_COLUMNS:
            due = self._due[direction] | moved[direction]
            due[0] = 0  # slot 0 never has a class of its own
            asked[direction] = np.flatnonzero(due)
        count = sum(len(slots) for slots in asked.values())
        read_all = self._read_all or new_source or count > _DUMP_SHARE * 2 * self.n_slots
        stats: Mapping[str, Mapping[int, LeafStats]]
        if read_all:
            # With class_stats_of, class_stats reports backlogs too (shaper.readback.ClassStats).
            stats = cast(Mapping[str, Mapping[int, LeafStats]], self.class_stats())
            every = np.arange(1, self.n_slots)
            asked = {direction: every for direction in DIRECTION_COLUMNS}
            self.leaves_read = 2 * (self.n_slots - 1)
        else:
            stats = self.class_stats_of({d: slots.tolist() for d, slots in asked.items()})
            self.leaves_read = count
        # Read: the countdown goes on; a leaf still holding packets stays due.
        for direction in DIRECTION_COLUMNS:
            due = self._due[direction]
            due[moved[direction]] = LINGER_READS
            due[0] = 0
            np.subtract(due, 1, out=due, where=due > 0)
            for slot, leaf in stats.get(direction, {}).items():
                if 0 < slot < self.n_slots and leaf.backlog_packets:
                    due[slot] = max(due[slot], 1)
        self._read_all = False
        return asked, stats

    def state(self) -> dict[str, npt.NDArray[Any]]:
        """Arrays to journal with the aggregator's state (keys start with `delivered.`)."""
        return {
            STATE_PREFIX + "cumulative": self._cumulative.copy(),
            STATE_PREFIX + "datapath_last": self._datapath_last.copy(),
            STATE_PREFIX + "class_last": self._class_last.copy(),
            STATE_PREFIX + "source": self._source.copy(),
        }

    def restore(self, state: Mapping[str, npt.NDArray[Any]]) -> None:
        """Continue from a journaled `state()`."""
        try:
            arrays = [
                state[STATE_PREFIX + k] for k in ("cumulative", "datapath_last", "class_last")
            ]
            source = state[STATE_PREFIX + "source"]
        except KeyError as err:
            raise StreamError(f"journaled delivered-counter state lacks {err}") from None
        for arr in arrays:
            if arr.shape != (self.n_slots, 4):
                raise StreamError(
                    f"journaled delivered counters have {arr.shape[0]} slots, the datapath "
                    f"{self.n_slots}: restart with the same capacity"
                )
        self._cumulative, self._datapath_last, self._class_last = (
            np.array(a, dtype=np.uint64) for a in arrays
        )
        self._source = np.array(source, dtype=np.uint8)
        self._read_all = True  # the leaves moved on while nobody read them


def split_state(
    state: Mapping[str, npt.NDArray[Any]],
) -> tuple[dict[str, npt.NDArray[Any]], dict[str, npt.NDArray[Any]]]:
    """A restored journal state split into (aggregator part, delivered-reader part)."""
    aggregator = {k: v for k, v in state.items() if not k.startswith(STATE_PREFIX)}
    delivered = {k: v for k, v in state.items() if k.startswith(STATE_PREFIX)}
    return aggregator, delivered
