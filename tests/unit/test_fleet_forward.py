"""The gateway's forwarder on a real nats-server: the journal reaches the stream once, in order.

The meter service here journals real usage messages (tests/unit/test_stream's
loopback gateway "gw1"); each carries the epoch of the journal's life, which
names it for the hub.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path

import msgpack
import pytest

from desanet.errors import StreamError
from desanet.meter.fleet_forward import Forwarder, ForwarderConfig
from desanet.meter.fleet_outbox import Cursor, message_epoch, resume
from desanet.meter.journal import Journal, Retention
from desanet.meter.service import MeterService
from tests.fleet_harness import FleetHub, StoredMessage, fleet_hub, read_stream
from tests.unit.test_stream import interval, loopback_service

pytestmark = pytest.mark.unit

WINDOW = ForwarderConfig(window=32, read_batch=16, ack_timeout_s=4.0, save_interval_s=0.1)


@pytest.fixture
def hub(tmp_path: Path) -> Iterator[FleetHub]:
    with fleet_hub(tmp_path / "hub", ["gw1"]) as hub_:
        yield hub_


@pytest.fixture
def service(tmp_path: Path) -> Iterator[MeterService]:
    svc = loopback_service(tmp_path / "state", snapshot_every=25)
    try:
        yield svc
    finally:
        svc.close()


def journal_some(svc: MeterService, n: int, forwarder: Forwarder | None = None) -> None:
    """Journal `n` intervals of s1 and s2 (and the snapshots every 25), waking the forwarder."""
    for _ in range(n):
        t = svc.last_seq + 1
        svc.publish(interval(t * 1000, [1, 2], [3, 5], [3 * t, 5 * t]), {})
        if forwarder is not None:
            forwarder.notify()


def forwarder(svc: MeterService, hub_: FleetHub) -> Forwarder:
    cursor = svc.state_dir / "fleet-cursor.json"
    return Forwarder("gw1", svc.journal, cursor, hub_.gateway("gw1"), WINDOW)


def assert_exactly_the_journal(
    svc: MeterService, stored: list[StoredMessage], in_order: bool = True
) -> None:
    """The stream holds each journaled message once, bytes unchanged (in seq order if asked)."""
    journaled = svc.journal.read(1, 10**6)
    if not in_order:
        stored = sorted(stored, key=lambda m: int(m.msg_id.rsplit(":", 1)[1]))
    assert [m.msg_id for m in stored] == [f"gw1:{svc.epoch}:{seq}" for seq, _ in journaled]
    assert [m.data for m in stored] == [data for _, data in journaled], "bytes changed"
    assert {m.subject for m in stored} == {"desanet.usage.gw1"}
    if in_order:
        assert [m.stream_seq for m in stored] == list(range(1, len(journaled) + 1))


def test_backlog_and_live_messages_reach_the_stream_once_in_order(
    hub: FleetHub, service: MeterService
) -> None:
    journal_some(service, 120)  # journaled while the gateway had no fleet: the backlog
    fwd = forwarder(service, hub)
    fwd.start()
    try:
        journal_some(service, 80, fwd)
        assert fwd.wait_acked(service.last_seq, 20), fwd.status()
        status = fwd.status()
    finally:
        fwd.stop()
    assert status.max_in_flight > 1, "publishes went one at a time"
    assert status.published == service.last_seq and status.republished == 0
    assert Cursor.load(service.state_dir / "fleet-cursor.json") == Cursor(
        service.epoch, service.last_seq
    )
    assert_exactly_the_journal(service, read_stream(hub))


def test_hub_killed_mid_run_loses_and_duplicates_nothing(
    hub: FleetHub, service: MeterService
) -> None:
    fwd = forwarder(service, hub)
    fwd.start()
    node = hub.nats.nodes[0]
    try:
        journal_some(service, 100, fwd)
        assert fwd.wait_acked(service.last_seq, 20), fwd.status()
        # Frozen, the hub takes publishes into its socket and answers none: a full window
        # is in flight when it dies.
        node.freeze()
        journal_some(service, 60, fwd)
        deadline = time.monotonic() + 10
        while fwd.status().in_flight < WINDOW.window and time.monotonic() < deadline:
            time.sleep(0.01)
        assert fwd.status().in_flight == WINDOW.window
        node.kill()
        journal_some(service, 40, fwd)  # the gateway goes on while the hub is away
        node.restart()
        journal_some(service, 40, fwd)
        assert fwd.wait_acked(service.last_seq, 30), fwd.status()
        status = fwd.status()
    finally:
        fwd.stop()
    assert status.republished >= WINDOW.window
    assert_exactly_the_journal(service, read_stream(hub))


def test_restart_resumes_after_the_last_acknowledged_message(
    hub: FleetHub, service: MeterService
) -> None:
    first = forwarder(service, hub)
    first.start()
    journal_some(service, 60, first)
    assert first.wait_acked(service.last_seq, 20)
    first.stop()
    # As if the gateway died after these acks but before saving its cursor: the hub
    # holds seqs the next start sends again, and drops them as duplicates.
    acked = Cursor.load(service.state_dir / "fleet-cursor.json")
    assert acked == Cursor(service.epoch, service.last_seq)
    sent_before = acked.seq - 30
    Cursor(service.epoch, sent_before).save(service.state_dir / "fleet-cursor.json")
    journal_some(service, 40)  # the gateway restarts with the hub away
    node = hub.nats.nodes[0]
    node.stop()
    second = forwarder(service, hub)
    second.start()
    try:
        time.sleep(0.5)
        assert second.status().connected is False
        node.restart()
        assert second.wait_acked(service.last_seq, 30), second.status()
        status = second.status()
    finally:
        second.stop()
    assert status.published == service.last_seq - sent_before, "not resumed at the cursor"
    assert_exactly_the_journal(service, read_stream(hub))


def test_message_epoch_comes_from_the_message_or_the_fallback() -> None:
    with_epoch = msgpack.packb({"v": 1, "gw": "gw1", "seq": 1, "epoch": "2026a"})
    without = msgpack.packb({"v": 1, "gw": "gw1", "seq": 1})
    assert message_epoch(with_epoch, "old") == "2026a"
    assert message_epoch(without, "old") == "old"
    with pytest.raises(StreamError, match="no epoch"):
        message_epoch(without, None)


def test_a_cluster_node_dies_under_the_forwarder(tmp_path: Path, service: MeterService) -> None:
    with fleet_hub(tmp_path / "cluster", ["gw1"], nodes=3, replicas=3) as hub_:
        fwd = forwarder(service, hub_)
        fwd.start()
        try:
            journal_some(service, 60, fwd)
            assert fwd.wait_acked(service.last_seq, 20), fwd.status()
            (node,) = [n for n in hub_.nats.nodes if n.url == fwd.status().server]
            node.freeze()  # a full window in flight to the node that dies
            journal_some(service, 60, fwd)
            node.kill()
            journal_some(service, 60, fwd)
            assert fwd.wait_acked(service.last_seq, 30), fwd.status()
            status = fwd.status()
        finally:
            fwd.stop()
        assert status.server != node.url and status.republished > 0
        node.restart()
        stored = read_stream(hub_)
    # While the stream elects a new leader, the front of the window is refused and the
    # rest may land: resent, the refused ones follow them. Each is stored once; the
    # collector does not depend on the order.
    assert_exactly_the_journal(service, stored, in_order=False)


def test_resume_checks_the_cursor_against_the_journal(tmp_path: Path) -> None:
    def message(epoch: str, seq: int) -> bytes:
        return bytes(msgpack.packb({"v": 1, "gw": "gw1", "seq": seq, "epoch": epoch}))

    journal = Journal(tmp_path / "j", Retention(max_bytes=1, segment_bytes=200), epoch="e1")
    try:
        assert resume(journal, Cursor("e1", 40), None) == Cursor(), "empty: start at 1"
        for seq in range(1, 31):
            journal.append(seq, message("e1", seq), b"")
        assert resume(journal, Cursor(), None) == Cursor("e1", 0)
        assert resume(journal, Cursor("e1", 12), None) == Cursor("e1", 12)
        assert resume(journal, Cursor("e0", 12), None) == Cursor("e1", 0), "another life"
        assert resume(journal, Cursor("e1", 45), None) == Cursor("e1", 0), "cursor ahead"
        journal.prune(20)  # retention drops segments the hub may not have had
        first = journal.first_seq
        assert 1 < first <= 21
        assert resume(journal, Cursor("e1", 3), None) == Cursor("e1", first - 1)
    finally:
        journal.close()
