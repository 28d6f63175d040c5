"""The status's rows are rebuilt only for subscribers that changed, and equal a fresh build."""

from __future__ import annotations

import numpy as np
import pytest

from desanet.gateway.service import GatewayService
from desanet.gateway.status import (
    StatusRows,
    StatusSnapshot,
    decode_rows,
    read_snapshot,
    write_snapshot,
)
from tests.unit.service_lab import Lab, control

pytestmark = pytest.mark.unit


def fresh(service: GatewayService, totals: np.ndarray, rates: np.ndarray) -> tuple[bytes, ...]:
    return StatusRows().update(service.roster, totals, rates)


def test_only_changed_rows_are_rebuilt_and_they_equal_a_fresh_build(
    lab: Lab, running: GatewayService
) -> None:
    n = running.config.capacity + 1
    totals, rates = np.zeros((n, 4), dtype=np.uint64), np.zeros((n, 2))
    rows = StatusRows()
    rows.update(running.roster, totals, rates)
    assert rows.rebuilt == 3
    rows.update(running.roster, totals, rates)
    assert rows.rebuilt == 0
    s2 = lab.datapath.slot_of("10.0.0.2")
    totals[s2] = [10, 1, 2000, 3]
    rates[s2] = [80.0, 16_000.0]
    assert [r.down_total for r in decode_rows(rows.update(running.roster, totals, rates))] == [
        0,
        2000,
        0,
    ]
    assert rows.rebuilt == 1 and tuple(rows.encoded) == fresh(running, totals, rates)
    rates[s2] = 0.0  # idle again: the rate falls to zero, the row follows
    rows.update(running.roster, totals, rates)
    assert rows.rebuilt == 1 and tuple(rows.encoded) == fresh(running, totals, rates)
    # A control change replaces s3's record: its row shows the new state.
    control(running, lab, {"op": "suspend", "sub": "s3", "mode": "wall"})
    assert decode_rows(rows.update(running.roster, totals, rates))[2].state == "suspended (wall)"
    assert rows.rebuilt == 1 and tuple(rows.encoded) == fresh(running, totals, rates)
    # A reload builds a new roster: every row again, in the file's order.
    lab.write("s4,D,10.0.0.4,1mbit,4mbit,256kbit,1mbit,", *_rows_of(lab)[1:])
    lab.settle(running)
    assert [r.id for r in decode_rows(rows.update(running.roster, totals, rates))] == [
        "s4",
        "s2",
        "s3",
    ]
    assert rows.rebuilt == 3 and tuple(rows.encoded) == fresh(running, totals, rates)


def _rows_of(lab: Lab) -> list[str]:
    return (lab.folder / "subscribers.csv").read_text().splitlines()[1:]


def test_the_written_status_reads_back_the_same_with_kept_rows(
    lab: Lab, running: GatewayService
) -> None:
    lab.datapath.send("10.0.0.1", up=300, down=700)
    lab.tick(running)
    written = read_snapshot(lab.folder / "state")
    first = written.subscribers[0]
    assert (first.id, first.up_total, first.down_total) == ("s1", 300, 700)
    # The same snapshot written without kept rows gives the same document.
    again = lab.folder / "again"
    again.mkdir()
    write_snapshot(again, StatusSnapshot(**vars(written)))
    assert read_snapshot(again) == written


def test_metrics_are_scraped_from_the_kept_rows(lab: Lab, running: GatewayService) -> None:
    lab.datapath.send("10.0.0.2", up=10, down=20)
    lab.tick(running)
    metrics = {
        (sample.name, tuple(sample.labels.values())): sample.value
        for family in running.collector.collect()
        for sample in family.samples
    }
    assert metrics[("desanet_subscriber_bytes_total", ("s2", "down"))] == 20
    assert metrics[("desanet_subscriber_bytes_total", ("s2", "up"))] == 10
    assert metrics[("desanet_subscriber_state", ("s1", "active"))] == 1
    assert metrics[("desanet_subscribers", ())] == 3
