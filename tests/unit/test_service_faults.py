"""A failure inside the tick is logged, counted and retried: the service keeps publishing usage.

Faults are real where the machine allows (a status path that cannot be
replaced) and fakes of the kernel parts otherwise (a counters map that cannot
be read, a shaper refusing requests), on tests/unit/service_lab.py.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import pytest

from desanet.cython_ext.usage import UsageInterval
from desanet.errors import StreamError
from desanet.gateway.faults import Outbox
from desanet.gateway.service import GatewayService
from desanet.gateway.status import read_snapshot
from desanet.meter.wire import UsageEvent
from tests.unit.service_lab import Lab, control

pytestmark = pytest.mark.unit


def test_unreadable_counters_are_retried_and_no_byte_is_lost(
    lab: Lab, running: GatewayService
) -> None:
    lab.datapath.send("10.0.0.2", up=100, down=200)
    lab.tick(running)
    lab.datapath.unreadable = "[Errno 24] Too many open files"
    lab.datapath.send("10.0.0.2", up=1_000, down=2_000)
    lab.tick(running)
    lab.tick(running)
    snap = read_snapshot(lab.folder / "state")
    assert snap.failures == {"counters": 2}
    assert any("counters failing (2 attempts)" in w and "Too many" in w for w in snap.warnings)
    assert control(running, lab, {"op": "show", "sub": "s2"})["ok"] is True
    lab.datapath.unreadable = None
    lab.tick(running)
    assert lab.billed()["s2"] == (1_100, 2_200)
    snap = read_snapshot(lab.folder / "state")
    assert snap.failures == {"counters": 2} and snap.warnings == []


def test_a_status_file_that_cannot_be_written_does_not_stop_usage(
    lab: Lab, running: GatewayService
) -> None:
    state = lab.folder / "state"
    lab.tick(running)
    (state / "status.json").unlink()
    (state / "status.json").mkdir()  # nothing can be renamed over a folder that holds a file
    (state / "status.json" / "keep").touch()
    for k in range(3):
        lab.datapath.send("10.0.0.1", up=10 * (k + 1))
        lab.tick(running)
    assert lab.billed()["s1"] == (60, 0)
    assert running.collector.snapshot is not None  # metrics are served all the same
    [family] = [m for m in running.collector.collect() if m.name == "desanet_loop_failures"]
    assert [(s.labels, s.value) for s in family.samples] == [({"step": "status"}, 3)]
    assert not [p for p in state.iterdir() if p.name.endswith(".tmp")]  # no debris left
    (state / "status.json" / "keep").unlink()
    (state / "status.json").rmdir()
    lab.tick(running)
    snap = read_snapshot(state)
    assert snap.failures == {"status": 3} and snap.subscribers[0].up_total == 60


def test_a_shaper_refusing_a_quota_throttle_is_retried_next_interval(
    lab: Lab, running: GatewayService
) -> None:
    s1 = lab.datapath.slot_of("10.0.0.1")
    lab.tick(running)
    lab.shaper.refuse = "RTM_NEWTCLASS: No buffer space available"
    lab.datapath.send("10.0.0.1", down=1_200_000)  # past s1's 1 MB quota
    lab.tick(running)
    assert lab.billed()["s1"] == (0, 1_200_000)  # usage went out all the same
    snap = read_snapshot(lab.folder / "state")
    assert snap.failures == {"quota": 1} and snap.subscribers[0].state == "fair-use"
    assert lab.shaper.ceilings_bps(s1) == (10_000_000, 2_000_000)  # not in the kernel yet
    lab.shaper.refuse = None
    lab.datapath.send("10.0.0.1", down=1)
    lab.tick(running)
    assert lab.shaper.ceilings_bps(s1) == (1_000_000, 256_000)
    assert lab.billed()["s1"] == (0, 1_200_001)
    assert read_snapshot(lab.folder / "state").warnings == []


class FailingOnce:
    """A usage stream whose journal refuses the first publish (a full disk), then works."""

    def __init__(self) -> None:
        self.last_seq = 0
        self.published: list[tuple[UsageInterval, list[UsageEvent]]] = []
        self.fail = True

    def publish(
        self,
        interval: UsageInterval,
        aggregator_state: Mapping[str, Any],
        events: Sequence[UsageEvent] = (),
        drops: Mapping[str, tuple[int, int]] | None = None,
    ) -> int:
        if self.fail:
            self.fail = False
            raise StreamError("cannot write the journal: No space left on device")
        self.last_seq += 1
        self.published.append((interval, list(events)))
        return self.last_seq


def interval(t0: int, slots: list[int], up: list[int], up_total: list[int]) -> UsageInterval:
    n = len(slots)
    zeros = np.zeros(n, dtype=np.uint64)
    return UsageInterval(
        t0,
        t0 + 1000,
        np.array(slots, dtype=np.uint32),
        np.array(up, dtype=np.uint64),
        zeros,
        np.ones(n, dtype=np.uint64),
        zeros,
        np.array(up_total, dtype=np.uint64),
        zeros,
    )


def test_usage_a_failed_publish_could_not_journal_goes_out_with_the_next() -> None:
    meter, outbox = FailingOnce(), Outbox()
    outbox.events.append(UsageEvent(1000, "s1", "suspend", "now suspended (block)"))
    with pytest.raises(StreamError):
        outbox.publish(meter, interval(0, [1, 2], [10, 20], [110, 20]), dict)  # type: ignore[arg-type]
    outbox.publish(meter, interval(1000, [2, 3], [5, 7], [25, 7]), dict)  # type: ignore[arg-type]
    [(sent, events)] = meter.published
    assert (sent.t0_ms, sent.t1_ms) == (0, 2000)
    assert sent.slots.tolist() == [1, 2, 3] and sent.up.tolist() == [10, 25, 7]
    assert sent.up_total.tolist() == [110, 25, 7] and sent.up_pkts.tolist() == [1, 2, 1]
    assert [e.kind for e in events] == ["suspend"] and outbox.events == []
