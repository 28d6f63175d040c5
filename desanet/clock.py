"""The clocks desanet reads: wall time for stamping usage, monotonic time for pacing.

Every part reads time through here, so that tests can pass a fake clock and
there is one definition of "now in Unix milliseconds".

A village gateway often has no real-time clock: it boots with the date of its
last shutdown (or of 1970) until NTP reaches the internet through the
satellite. `SteadyClock` stamps usage from a clock that does not follow such
steps: it starts no earlier than the last stamp the gateway wrote, advances
with the monotonic clock, and takes a step of the system clock only when the
kernel reports the clock synchronized (by NTP). So a wrong date at boot
neither moves intervals backwards nor starts a new quota month.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import logging
import time
from collections.abc import Callable
from typing import Protocol

log = logging.getLogger(__name__)

STEP_MS = 2_000  # a difference this large between the clocks is a step, not drift
_TIME_ERROR = 5  # adjtimex(2) clock state: not synchronized
_TIMEX_BYTES = 512  # larger than struct timex on every architecture; modes = 0 reads only


def now_ms() -> int:
    """System wall clock in Unix milliseconds, UTC."""
    return time.time_ns() // 1_000_000


def monotonic_s() -> float:
    """Seconds on a clock that never steps (for deadlines and pacing)."""
    return time.monotonic()


def _monotonic_ms() -> int:
    return time.monotonic_ns() // 1_000_000


def kernel_synchronized() -> bool:
    """True when the kernel says an NTP daemon keeps the system clock synchronized."""
    libc = ctypes.CDLL(ctypes.util.find_library("c"), use_errno=True)
    timex = ctypes.create_string_buffer(_TIMEX_BYTES)  # zeroed: modes = 0, change nothing
    state = int(libc.adjtimex(timex))
    return state not in (-1, _TIME_ERROR)


class Clock(Protocol):
    """What the service loop needs of time; a `SteadyClock` in production, a fake in tests."""

    def now_ms(self) -> int: ...

    def monotonic_s(self) -> float: ...


class SystemClock:
    """The machine's clocks as they are (for tools that stamp nothing durable)."""

    def now_ms(self) -> int:
        return now_ms()

    def monotonic_s(self) -> float:
        return monotonic_s()


class SteadyClock:
    """Wall-clock milliseconds that never step unless NTP says the system clock is right."""

    def __init__(
        self,
        floor_ms: int = 0,
        wall_ms: Callable[[], int] = now_ms,
        mono_ms: Callable[[], int] = _monotonic_ms,
        synchronized: Callable[[], bool] = kernel_synchronized,
    ) -> None:
        self._wall_ms = wall_ms
        self._mono_ms = mono_ms
        self._synchronized = synchronized
        wall = wall_ms()
        start = wall
        if wall < floor_ms and not synchronized():
            log.warning(
                "system clock is %.0f s behind the last usage stamp and not synchronized: "
                "stamping from the last stamp on",
                (floor_ms - wall) / 1000,
            )
            start = floor_ms
        self._anchor(start)
        self.refused_steps = 0

    def _anchor(self, wall: int) -> None:
        self._base_wall = wall
        self._base_mono = self._mono_ms()

    def now_ms(self) -> int:
        """Now: monotonic time since the anchor, re-anchored on a trusted step."""
        steady = self._base_wall + self._mono_ms() - self._base_mono
        wall = self._wall_ms()
        if abs(wall - steady) <= STEP_MS:
            return steady
        if self._synchronized():
            log.info(
                "system clock stepped by %+.1f s and is synchronized: following it",
                (wall - steady) / 1000,
            )
            self._anchor(wall)
            return wall
        if self.refused_steps == 0:
            log.warning(
                "system clock stepped by %+.1f s but is not synchronized: not following it",
                (wall - steady) / 1000,
            )
        self.refused_steps += 1
        self._anchor(steady)
        return steady

    def monotonic_s(self) -> float:
        return self._mono_ms() / 1000
