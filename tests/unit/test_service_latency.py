"""The service's latency step on faked kernel parts: RTT in status and metrics, and the
adaptive link rate changing the running plan's classes in place, with an event."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

import numpy as np
import numpy.typing as npt
import pytest

from desanet.ebpf import abi
from desanet.gateway.config import Config
from desanet.gateway.parts import Parts
from desanet.gateway.roles import Roles
from desanet.gateway.status import read_snapshot, render
from tests.unit.service_lab import CAPACITY, CONFIG, S1, S2, Lab

pytestmark = pytest.mark.unit

MBIT = 1_000_000


class FakeRtt:
    """The datapath's cumulative RTT histograms, in memory; the test adds samples."""

    def __init__(self) -> None:
        self.slots = np.zeros((CAPACITY + 1, 2, abi.RTT_SLOT_BUCKETS), np.uint32)
        self.link = np.zeros((2, abi.RTT_LINK_BUCKETS), np.uint64)

    def add(self, slot: int, direction: int, rtt_ms: int, n: int) -> None:
        self.slots[slot, direction, abi.rtt_slot_bucket(rtt_ms * 1000)] += n
        self.link[direction, rtt_ms] += n

    def read_slots(self, rows: npt.NDArray[np.intp] | None = None) -> npt.NDArray[np.uint32]:
        return self.slots.copy() if rows is None else self.slots[rows]

    def read_link(self) -> npt.NDArray[np.uint64]:
        return self.link.copy()

    def close(self) -> None:
        pass


class LatencyLab(Lab):
    def __init__(self, folder: Path, adapt: bool) -> None:
        super().__init__(folder)
        if adapt:
            text = CONFIG.replace('up = "5mbit"\n', 'up = "5mbit"\nadapt = true\n')
            (folder / "gateway.toml").write_text(text)
        self.rtt = FakeRtt()

    def compose(self, config: Config, roles: Roles, slot_owners: Mapping[int, str]) -> Parts:
        parts = super().compose(config, roles, slot_owners)
        parts.open_latency = lambda: self.rtt
        return parts


def loaded_second(lab: LatencyLab, service: object, rtt_ms: int) -> None:
    lab.datapath.send("10.0.0.1", up=50_000, down=2_400_000)  # 19.2 Mbit/s down
    lab.rtt.add(1, abi.RTT_WAN, rtt_ms, 20)
    lab.rtt.add(1, abi.RTT_LAN, 5, 20)
    lab.tick(service)  # type: ignore[arg-type]


def test_rtt_percentiles_in_status_and_metrics(tmp_path: Path) -> None:
    lab = LatencyLab(tmp_path, adapt=False)
    lab.write(S1, S2)
    service = lab.service()
    service.start()
    try:
        for _ in range(5):
            loaded_second(lab, service, 600)
        snap = read_snapshot(lab.folder / "state")
        families = {f.name: f for f in service.collector.collect()}
    finally:
        service.close()
    link = snap.latency["link"]
    assert 600 <= link["wan"]["p50_ms"] <= 601 and link["wan"]["samples"] == 100
    assert 5 <= link["lan"]["p95_ms"] <= 6
    s1 = snap.latency["subscribers"]["s1"]
    # The per-subscriber buckets are half octaves: 600 ms lies in [524, 786).
    assert 524 <= s1["wan"]["p50_ms"] <= 786 and s1["wan"]["samples"] == 100
    assert "s2" not in snap.latency["subscribers"]
    assert "adapt" not in snap.latency
    assert "rtt p50/p95 (samples), last 60s: link wan 600/601 ms (100)" in render(snap)
    wan = [
        s for s in families["desanet_link_rtt_seconds"].samples if s.labels["direction"] == "wan"
    ]
    buckets = {s.labels["le"]: s.value for s in wan if s.name.endswith("_bucket")}
    assert buckets["0.5"] == 0 and buckets["0.6"] == 0 and buckets["0.7"] == 100
    subs = families["desanet_subscriber_rtt_seconds"].samples
    assert {s.labels["subscriber"] for s in subs} == {"s1"}


def test_adaptive_rate_scales_the_classes_in_place_and_says_so(tmp_path: Path) -> None:
    lab = LatencyLab(tmp_path, adapt=True)
    lab.write(S1, S2)
    service = lab.service()
    service.start()
    try:
        for _ in range(20):
            loaded_second(lab, service, 40)
        steady = len(lab.shaper.applied)
        before = lab.shaper.applied[-1]
        for _ in range(3):
            loaded_second(lab, service, 400)  # the modem queues: capacity fell
        after = lab.shaper.applied[-1]
        snap = read_snapshot(lab.folder / "state")
        streamed = [e for m in lab.received() for e in m.events]
    finally:
        service.close()
    assert len(lab.shaper.applied) > steady
    down = after.adapted_bps["down"]
    assert 0 < down < 20 * MBIT and "up" not in after.adapted_bps
    assert after.root_rate_bps("down") < before.root_rate_bps("down")
    assert after.root_rate_bps("up") == before.root_rate_bps("up")
    # The same classes, changed in place: guarantees scaled with the link, leaves kept.
    scale = down / (20 * MBIT)
    old, new = before.tree("down"), after.tree("down")
    assert set(old.classes) == set(new.classes)
    assert dict(old.leaves.items()) == dict(new.leaves.items())
    for classid in set(old.leaves) - {c for c in old.leaves if c & 0xFFFF == 0xF}:
        was, now = old.classes[classid], new.classes[classid]
        assert abs(now.rate_bytes_ps - was.rate_bytes_ps * scale) <= 1
        assert now.ceil_bytes_ps <= after.root_rate_bps("down") // 8
    assert dict(before.up.classes.items()) == dict(after.up.classes.items())
    rate_events = [e for e in snap.events if e["kind"] == "link_rate"]
    assert rate_events and rate_events[0]["sub"] == ""
    assert rate_events[0]["detail"].startswith("down 20.0 Mbit/s -> ")
    adapt = snap.latency["adapt"]
    assert adapt["down_bps"] < 20 * MBIT and adapt["changes"] >= 1
    assert 40 <= adapt["baseline_ms"] <= 45  # the queue lifts the slow baseline a little
    # Billing hears of it too.
    assert any(e.kind == "link_rate" and e.sub == "" for e in streamed)
