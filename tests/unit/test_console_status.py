"""The console's reading of the status file: measured rates, staleness, saturation."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import pytest

from desanet.gateway.console.status_source import StatusSource
from desanet.gateway.status import StatusSnapshot, write_snapshot
from tests.unit.console_helpers import status_row

pytestmark = pytest.mark.unit

T0 = 1_790_000_000_000


def snapshot(t_ms: int, down_total: int, down_bps: float = 123.0) -> StatusSnapshot:
    row = replace(status_row(1, down_bps), down_total=down_total, up_total=0, up_bps=0.0)
    return StatusSnapshot("gw", t_ms, T0, 20_000_000, 5_000_000, "fq_codel", "fq_codel", 1, [row])


def test_rates_are_the_bytes_delivered_between_snapshots_two_seconds_apart(tmp_path: Path) -> None:
    source = StatusSource(tmp_path, 1000)
    write_snapshot(tmp_path, snapshot(T0, 1_000_000))
    first = source.read()
    # One snapshot: nothing to measure from, the service's own rate is shown.
    assert first.rate(first.by_id["s1"]) == (123.0, 0.0)
    write_snapshot(tmp_path, snapshot(T0 + 1000, 1_250_000))
    assert source.read().rates == {}  # a second is too short a window
    write_snapshot(tmp_path, snapshot(T0 + 2000, 1_500_000))
    reading = source.read()
    assert reading.rate(reading.by_id["s1"]) == (2_000_000.0, 0.0)
    assert reading.down_bps == 2_000_000.0
    # Counters that went backwards (a slot given to someone new) are not a rate.
    write_snapshot(tmp_path, snapshot(T0 + 4000, 10, down_bps=55.0))
    reading = source.read()
    assert reading.rate(reading.by_id["s1"]) == (55.0, 0.0)


def test_a_status_five_intervals_old_means_the_service_is_down(tmp_path: Path) -> None:
    source = StatusSource(tmp_path, 1000)
    assert source.read().snapshot is None and "no status yet" in source.read().error
    write_snapshot(tmp_path, snapshot(T0, 0))
    reading = source.read()
    assert not source.stale(reading, now_ms=T0 + 4000)
    assert source.stale(reading, now_ms=T0 + 6000)


def test_saturation_counts_the_unbroken_time_above_ninety_percent(tmp_path: Path) -> None:
    source = StatusSource(tmp_path, 1000)
    busy = 19_000_000.0  # 95% of the 20 Mbit/s link
    for t, bps in ((0, 1e6), (1000, busy), (61_000, busy), (400_000, busy)):
        write_snapshot(tmp_path, snapshot(T0 + t, 0, down_bps=bps))
        source.read()
    down_s, up_s = source.saturated_s()
    assert down_s == 399.0 and up_s == 0.0
