"""The clocks desanet reads: wall time for stamping usage, monotonic time for pacing.

Every part reads time through here so that tests can pass a fake clock and so
that there is one definition of "now in Unix milliseconds".
"""

from __future__ import annotations

import time
from typing import Protocol


def now_ms() -> int:
    """Wall clock in Unix milliseconds, UTC (usage intervals are stamped with it)."""
    return time.time_ns() // 1_000_000


def monotonic_s() -> float:
    """Seconds on a clock that never steps (for deadlines and pacing)."""
    return time.monotonic()


class Clock(Protocol):
    """What the service loop needs of time; `SystemClock` in production, a fake in tests."""

    def now_ms(self) -> int: ...

    def monotonic_s(self) -> float: ...


class SystemClock:
    """The machine's clocks."""

    def now_ms(self) -> int:
        return now_ms()

    def monotonic_s(self) -> float:
        return monotonic_s()
