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
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any, Protocol

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


ClassStatsFn = Callable[[], Mapping[str, Mapping[int, SentStats]]]


def _deltas(now: U64, last: U64) -> U64:
    """Per (slot, direction) pair of columns: now - last, or now whole where either went back."""
    pairs_now = now.reshape(now.shape[0], 2, 2)
    pairs_last = last.reshape(last.shape[0], 2, 2)
    restarted = (pairs_now < pairs_last).any(axis=2, keepdims=True)
    base = np.where(restarted, np.uint64(0), pairs_last)
    return (pairs_now - base).reshape(now.shape)


class DeliveredReader:
    """A counter reader whose bytes and packets are what the shaper delivered."""

    def __init__(self, reader: CounterSource, class_stats: ClassStatsFn) -> None:
        self.reader = reader
        self.class_stats = class_stats
        self.n_slots = reader.n_slots
        n = self.n_slots
        self._cumulative = np.zeros((n, 4), dtype=np.uint64)
        self._datapath_last = np.zeros((n, 4), dtype=np.uint64)
        self._class_last = np.zeros((n, 4), dtype=np.uint64)
        self._source = np.frombuffer(reader.identity, dtype=np.uint8).copy()

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

    def read(self) -> U64:
        """Cumulative delivered IP bytes and packets per slot, (n_slots, 4) uint64."""
        raw = self.reader.read()
        source = np.frombuffer(self.reader.identity, dtype=np.uint8)
        if not np.array_equal(source, self._source):
            # A new map (reboot, reload) counts from zero: take its values whole.
            self._datapath_last.fill(0)
            self._source = source.copy()
        datapath_delta = _deltas(raw, self._datapath_last)
        self._datapath_last[:] = raw

        sent = np.zeros((self.n_slots, 4), dtype=np.uint64)
        shaped = np.zeros((self.n_slots, 4), dtype=bool)
        for direction, by_slot in self.class_stats().items():
            if direction not in DIRECTION_COLUMNS:
                continue
            b, p = DIRECTION_COLUMNS[direction]
            for slot, stats in by_slot.items():
                if 0 < slot < self.n_slots:
                    header = ETHERNET_HEADER_BYTES * stats.sent_packets
                    sent[slot, b] = max(stats.sent_bytes - header, 0)
                    sent[slot, p] = stats.sent_packets
                    shaped[slot, [b, p]] = True
        class_delta = _deltas(sent, self._class_last)
        self._class_last[shaped] = sent[shaped]
        self._cumulative += np.where(shaped, class_delta, datapath_delta)
        return self._cumulative

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


def split_state(
    state: Mapping[str, npt.NDArray[Any]],
) -> tuple[dict[str, npt.NDArray[Any]], dict[str, npt.NDArray[Any]]]:
    """A restored journal state split into (aggregator part, delivered-reader part)."""
    aggregator = {k: v for k, v in state.items() if not k.startswith(STATE_PREFIX)}
    delivered = {k: v for k, v in state.items() if k.startswith(STATE_PREFIX)}
    return aggregator, delivered
