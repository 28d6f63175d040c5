"""The steady clock: usage stamps follow neither a wrong boot date nor an unsynchronized step."""

from __future__ import annotations

import pytest

from desanet.clock import SteadyClock

pytestmark = pytest.mark.unit

DEC_2026 = 1_796_083_200_000  # 2026-12-01T00:00Z


class FakeTime:
    def __init__(self, wall: int, synced: bool = False) -> None:
        self.wall = wall
        self.mono = 5_000
        self.synced = synced

    def advance(self, ms: int) -> None:
        self.wall += ms
        self.mono += ms

    def clock(self, floor_ms: int = 0) -> SteadyClock:
        return SteadyClock(floor_ms, lambda: self.wall, lambda: self.mono, lambda: self.synced)


def test_follows_the_wall_clock_when_nothing_steps() -> None:
    t = FakeTime(DEC_2026)
    clock = t.clock()
    t.advance(60_000)
    assert clock.now_ms() == DEC_2026 + 60_000


def test_a_wrong_boot_date_stamps_from_the_last_stamp() -> None:
    t = FakeTime(0)  # booted in 1970, no real-time clock
    clock = t.clock(floor_ms=DEC_2026)
    t.advance(1_000)
    assert clock.now_ms() == DEC_2026 + 1_000


def test_an_unsynchronized_step_is_not_followed() -> None:
    t = FakeTime(DEC_2026)
    clock = t.clock()
    t.advance(1_000)
    t.wall += 40 * 86_400_000  # someone set the date 40 days ahead by hand
    assert clock.now_ms() == DEC_2026 + 1_000
    t.advance(1_000)
    assert clock.now_ms() == DEC_2026 + 2_000
    assert clock.refused_steps >= 1


def test_a_synchronized_step_is_followed_once() -> None:
    t = FakeTime(DEC_2026 - 3_600_000)  # one hour slow at boot
    clock = t.clock()
    t.synced = True
    t.wall = DEC_2026
    assert clock.now_ms() == DEC_2026
    t.advance(500)
    assert clock.now_ms() == DEC_2026 + 500
