"""Failures inside the service loop's steps: logged, counted, retried, never fatal.

A tick reads counters, checks quotas, publishes and writes the status; any of
them can fail for a while (a netlink socket refused when descriptors run out,
a read-only status folder, a journal disk that is full). `LoopFaults.guard`
runs one step: a failure is logged (once when it starts, then every
`LOG_EVERY` repeats, and once when the step recovers), counted by step for
the metrics and the status, and the step is simply tried again at the next
interval. Usage a failed publish could not journal is kept and merged into
the next interval (`merged`), so billing misses nothing.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping
from typing import Any, TypeVar

import numpy as np

from desanet.cython_ext.usage import UsageInterval
from desanet.gateway.parts import UsageStream
from desanet.meter.wire import UsageEvent

log = logging.getLogger("desanet.gateway.service")

T = TypeVar("T")
LOG_EVERY = 60


class LoopFaults:
    """Failure counts by step, and the error of every step failing right now."""

    def __init__(self) -> None:
        self.counts: dict[str, int] = {}
        self.failing: dict[str, str] = {}
        self._streak: dict[str, int] = {}

    def guard(self, step: str, run: Callable[[], T]) -> T | None:
        """`run()`, or None when it raised (logged and counted, retried next time)."""
        try:
            result = run()
        except Exception as err:
            self._failed(step, err)
            return None
        self.recovered(step)
        return result

    def recovered(self, step: str) -> None:
        """`step` works again (or what it failed to do is done another way)."""
        streak = self._streak.pop(step, 0)
        if streak:
            self.failing.pop(step, None)
            log.warning("%s works again after %d failed attempts", step, streak)

    def _failed(self, step: str, err: Exception) -> None:
        self.counts[step] = self.counts.get(step, 0) + 1
        streak = self._streak[step] = self._streak.get(step, 0) + 1
        text = f"{type(err).__name__}: {err}"
        self.failing[step] = text
        if streak == 1:
            log.error("%s failed, retried every interval: %s", step, text)
        elif streak % LOG_EVERY == 0:
            log.error("%s still failing (%d attempts): %s", step, streak, text)

    def warnings(self) -> list[str]:
        """One line per step failing now, for the status."""
        return [
            f"{step} failing ({self._streak.get(step, 0)} attempts): {text}"
            for step, text in sorted(self.failing.items())
        ]


class Outbox:
    """Usage and events not journaled yet: kept across a failed publish, sent with the next."""

    def __init__(self) -> None:
        self.events: list[UsageEvent] = []
        self._held: UsageInterval | None = None

    def publish(
        self,
        meter: UsageStream,
        interval: UsageInterval,
        state: Callable[[], Mapping[str, Any]],
        drops: Mapping[str, tuple[int, int]] | None = None,
    ) -> None:
        """Journal and publish `interval` (with what a failed publish left) and the events.

        `drops` (reason -> cumulative packets, bytes of traffic of nobody) travel with it.
        """
        if self._held is not None:
            interval = merged(self._held, interval)
        if not len(interval) and not self.events:
            return
        before = meter.last_seq
        try:
            meter.publish(interval, state(), self.events, drops)
        except Exception:
            # Not journaled: it goes out with the next interval. Journaled (a later step
            # failed): it is out, and must not be sent twice.
            journaled = meter.last_seq != before
            self._held = None if journaled else interval
            if journaled:
                self.events = []
            raise
        self._held, self.events = None, []


def merged(older: UsageInterval, newer: UsageInterval) -> UsageInterval:
    """One interval covering both: deltas summed per slot, the newer running totals."""
    slots = np.union1d(older.slots, newer.slots).astype(older.slots.dtype)
    columns = {}
    for name in ("up", "down", "up_pkts", "down_pkts"):
        column = np.zeros(slots.shape[0], dtype=np.uint64)
        for part in (older, newer):
            column[np.searchsorted(slots, part.slots)] += getattr(part, name)
        columns[name] = column
    for name in ("up_total", "down_total"):
        column = np.zeros(slots.shape[0], dtype=np.uint64)
        for part in (older, newer):  # newer last: its totals win
            column[np.searchsorted(slots, part.slots)] = getattr(part, name)
        columns[name] = column
    return UsageInterval(older.t0_ms, newer.t1_ms, slots, **columns)
