"""Stream identity: what a restart does with lost or damaged state, and what billing sees.

A `Gateway` here is the real MeterService with a real (numpy twin) aggregator
polling counters that are a pure function of a logical clock, as pinned BPF
maps keep counting while the service is down. A billing collector (SQLite)
collects across every restart; its billed bytes must equal the counters.
"""

from __future__ import annotations

import os
import re
import shutil
from pathlib import Path

import msgpack
import numpy as np
import pytest

from desanet.cython_ext import twin
from desanet.errors import StreamError
from desanet.meter import wire
from desanet.meter.client import EpochChanged, UsageClient
from desanet.meter.collector import UsageStore
from desanet.meter.journal import Retention
from desanet.meter.keys import ServerSecurity
from desanet.meter.records import encode_record, scan_records, split_payload
from desanet.meter.service import MeterService, StreamConfig
from tests.unit.test_stream import ANY_PORT, wait_subscribed
from tests.unit.test_stream_crash import _free_endpoint

pytestmark = pytest.mark.unit

SUBS = {1: "s1", 2: "s2", 3: "s3"}
N_SLOTS = 4
T0 = 1_790_000_000_000
# Bytes (and packets) per ms of each slot: up bytes, up packets, down bytes, down packets.
RATES = np.array([[0, 0, 0, 0]] + [[3 * s, 1, 7 * s, 1] for s in SUBS], dtype=np.uint64)


def counters_at(t_ms: int) -> np.ndarray:
    return RATES * np.uint64(t_ms - T0)


class Gateway:
    """MeterService plus aggregator, as gateway.service runs them, on loopback ports."""

    def __init__(self, state_dir: Path, segment_bytes: int = 16 << 20, **config: int) -> None:
        stream = StreamConfig(
            ANY_PORT,
            ANY_PORT,
            ServerSecurity(plaintext=True),
            retention=Retention(segment_bytes=segment_bytes),
            **config,  # type: ignore[arg-type]
        )
        self.svc = MeterService("gw1", state_dir, stream, SUBS)
        self.agg = twin.Aggregator(N_SLOTS)
        if self.svc.restored_state is not None:
            self.agg.restore(self.svc.restored_state)

    def run(self, t_ms: int, intervals: int) -> int:
        """Poll and publish `intervals` times, 1 s apart, after `t_ms`; returns the last t."""
        for _ in range(intervals):
            t_ms += 1000
            self.agg.poll(counters_at(t_ms), t_ms)
            self.svc.publish(self.agg.rollup(t_ms), self.agg.state())
        return t_ms

    def kill(self) -> None:
        """Stop as kill -9 would: no checkpoint, only what is already on disk."""
        self.svc._close_sockets()

    def client(self) -> UsageClient:
        return UsageClient(self.svc.usage_endpoint, self.svc.replay_endpoint, timeout_ms=3000)


def collect_all(gateway: Gateway, store: UsageStore) -> list[wire.UsageMessage]:
    """What `desanet collect` does, without following live: every message not yet stored."""
    pos = store.position("gw1")
    got = []
    with gateway.client() as client:
        start = (pos.seq + 1, pos.epoch) if pos is not None else (1, None)
        for msg in client.messages(start[0], epoch=start[1], follow=False):
            store.store(msg)
            got.append(msg)
    return got


def billed(store: UsageStore) -> dict[str, tuple[int, int]]:
    return {r.sub: (r.up, r.down) for r in store.report(0, 2**62)}


def truth(t_ms: int) -> dict[str, tuple[int, int]]:
    c = counters_at(t_ms)
    return {sub: (int(c[slot, 0]), int(c[slot, 2])) for slot, sub in SUBS.items()}


def stream_dir(state: Path) -> Path:
    return state / "stream"


def test_epoch_names_every_message_and_survives_restarts(tmp_path: Path) -> None:
    gw = Gateway(tmp_path / "state")
    epoch = gw.svc.epoch
    assert re.fullmatch(r"[0-9a-f]{32}", epoch)
    t = gw.run(T0, 5)
    gw.kill()
    # What kill -9 leaves when it lands while the mark is being replaced.
    leftover = stream_dir(tmp_path / "state") / ".published.mark.x1y2.tmp"
    leftover.write_bytes(b"half")
    again = Gateway(tmp_path / "state")
    assert (again.svc.epoch, again.svc.last_seq) == (epoch, 5)
    assert not leftover.exists()
    assert again.svc.new_epoch_reason is None
    t = again.run(t, 2)
    with again.client() as client:
        msgs = list(client.replay(1))
    assert [(m.epoch, m.seq) for m in msgs] == [(epoch, s) for s in range(1, 8)]
    again.svc.close()
    assert Gateway(tmp_path / "state").svc.epoch == epoch


def _record_offsets(segment: Path) -> list[int]:
    data = segment.read_bytes()
    first = data.index(b"DNJ1")
    return [offset for offset, _seq, _p in scan_records(data, first)]


def test_one_flipped_bit_in_record_5_of_10_stops_the_service_and_cuts_nothing(
    tmp_path: Path,
) -> None:
    state = tmp_path / "state"
    gw = Gateway(state, snapshot_every=10**6)
    t = gw.run(T0, 10)
    store = UsageStore.sqlite(tmp_path / "billing.sqlite")
    collect_all(gw, store)
    epoch = gw.svc.epoch
    gw.kill()
    (segment,) = sorted((stream_dir(state) / "journal").glob("*.seg"))
    offsets = _record_offsets(segment)
    assert len(offsets) == 10
    data = bytearray(segment.read_bytes())
    data[offsets[4] + 30] ^= 0x10
    segment.write_bytes(bytes(data))
    with pytest.raises(StreamError) as refused:
        Gateway(state)
    text = str(refused.value)
    assert str(segment) in text and f"byte {offsets[4]}" in text and "seq 6" in text
    assert segment.read_bytes() == bytes(data), "no valid record was cut"

    # What the message advises: move the journal aside. A new epoch starts from the checkpoint.
    os.replace(stream_dir(state) / "journal", tmp_path / "journal.damaged")
    again = Gateway(state)
    assert again.svc.epoch != epoch and again.svc.last_seq == 0
    t = again.run(t, 3)
    new = collect_all(again, store)
    assert [(m.epoch, m.seq) for m in new] == [(again.svc.epoch, s) for s in (1, 2, 3)]
    assert store.epochs("gw1") == [epoch, again.svc.epoch]
    assert billed(store) == truth(t), "nothing lost, nothing counted twice across the epochs"
    store.close()
    again.svc.close()


def test_state_dir_moved_aside_starts_a_new_epoch_and_billing_continues(tmp_path: Path) -> None:
    state = tmp_path / "state"
    gw = Gateway(state)
    t = gw.run(T0, 20)
    store = UsageStore.sqlite(tmp_path / "billing.sqlite")
    assert len(collect_all(gw, store)) == gw.svc.last_seq
    old = gw.svc.epoch
    gw.svc.close()
    os.replace(state, tmp_path / "state.old")  # as the operator is told to do

    fresh = Gateway(state)
    assert fresh.svc.epoch != old and fresh.svc.restored_state is None
    t = fresh.run(t, 4)
    new = collect_all(fresh, store)
    # Seq 1 again, but of another epoch: stored, not dropped as a duplicate of old seq 1.
    assert [(m.epoch, m.seq) for m in new] == [(fresh.svc.epoch, s) for s in range(1, 5)]
    assert billed(store) == truth(t)
    assert store.totals("gw1") == truth(t)
    store.close()
    fresh.svc.close()


def test_journal_deleted_starts_a_new_epoch_from_the_checkpoint(tmp_path: Path) -> None:
    state = tmp_path / "state"
    gw = Gateway(state, checkpoint_every=5, snapshot_every=10**6)
    t = gw.run(T0, 12)
    store = UsageStore.sqlite(tmp_path / "billing.sqlite")
    collect_all(gw, store)
    old = gw.svc.epoch
    gw.kill()
    shutil.rmtree(stream_dir(state) / "journal")

    again = Gateway(state)
    assert again.svc.epoch != old
    assert "journal is missing" in (again.svc.new_epoch_reason or "")
    assert again.svc.previous == wire.PreviousEpoch(old, 10, 12)
    t = again.run(t, 2)
    collect_all(again, store)
    # The first interval of the new epoch covers seqs 11-12 again: they are not billed twice.
    assert billed(store) == truth(t)
    replaced = list((state / "replaced").iterdir())
    assert len(replaced) == 1 and (replaced[0] / "stream" / "published.mark").exists()

    with again.client() as client, pytest.raises(EpochChanged) as changed:
        list(client.replay(11, epoch=old))
    assert changed.value.epoch == again.svc.epoch and changed.value.oldest == 1
    assert changed.value.previous == wire.PreviousEpoch(old, 10, 12)
    assert "seqs 11..12 of it were published but are lost" in str(changed.value)
    store.close()
    again.svc.close()


def test_seqs_published_but_missing_from_the_journal_start_a_new_epoch(tmp_path: Path) -> None:
    state = tmp_path / "state"
    gw = Gateway(state, segment_bytes=600, snapshot_every=10**6)
    t = gw.run(T0, 12)
    with gw.client() as client:
        published = {(m.epoch, m.seq): m for m in client.replay(1)}
    gw.kill()
    segments = sorted((stream_dir(state) / "journal").glob("*.seg"))
    assert len(segments) > 2
    segments[-1].unlink()  # the journal still reads cleanly, it only ends early

    again = Gateway(state)
    assert again.svc.epoch != gw.svc.epoch
    assert "are lost" in (again.svc.new_epoch_reason or "")
    again.run(t, 3)
    with again.client() as client:
        after = list(client.replay(1))
    assert all((m.epoch, m.seq) not in published for m in after), "no (epoch, seq) reused"
    again.svc.close()


@pytest.mark.parametrize("damaged", ["newest", "both"])
def test_damaged_checkpoints(tmp_path: Path, damaged: str) -> None:
    state = tmp_path / "state"
    gw = Gateway(state, checkpoint_every=4, snapshot_every=10**6)
    t = gw.run(T0, 10)
    store = UsageStore.sqlite(tmp_path / "billing.sqlite")
    collect_all(gw, store)
    epoch = gw.svc.epoch
    gw.kill()
    points = sorted(stream_dir(state).glob("checkpoint-*.bin"), key=lambda p: p.stat().st_mtime)
    for path in points[-1:] if damaged == "newest" else points:
        data = bytearray(path.read_bytes())
        data[len(data) // 2] ^= 0xFF
        path.write_bytes(bytes(data))

    again = Gateway(state)
    if damaged == "newest":
        # The older checkpoint and the journal records after it rebuild the same state.
        assert (again.svc.epoch, again.svc.last_seq) == (epoch, 10)
    else:
        assert again.svc.epoch != epoch and again.svc.restored_state is None
        assert "fails its crc" in (again.svc.new_epoch_reason or "")
    t = again.run(t, 3)
    collect_all(again, store)
    assert billed(store) == truth(t)
    store.close()
    again.svc.close()


def _strip_epochs(state: Path) -> None:
    """Rewrite a state_dir in the layout of a gateway from before stream epochs."""
    stream = stream_dir(state)
    legacy_journal = state / "journal"
    legacy_journal.mkdir()
    for segment in sorted((stream / "journal").glob("*.seg")):
        data = segment.read_bytes()
        out = []
        for _o, seq, payload in scan_records(data, data.index(b"DNJ1")):
            message, change = split_payload(payload)
            body = msgpack.unpackb(message)
            del body["epoch"]
            out.append(encode_record(seq, msgpack.packb(body), change))
        (legacy_journal / segment.name).write_bytes(b"".join(out))
    newest = max(stream.glob("checkpoint-*.bin"), key=lambda p: p.stat().st_mtime)
    data = newest.read_bytes()
    ((_o, seq, payload),) = scan_records(data)
    body = msgpack.unpackb(split_payload(payload)[0])
    v1 = {k: body[k] for k in ("gw", "seq", "t1", "state", "totals")} | {"v": 1}
    (state / "checkpoint.bin").write_bytes(encode_record(seq, msgpack.packb(v1), b""))
    shutil.rmtree(stream)


def test_state_from_before_epochs_is_carried_into_a_new_epoch(tmp_path: Path) -> None:
    state = tmp_path / "state"
    gw = Gateway(state, checkpoint_every=4, snapshot_every=10**6)
    t = gw.run(T0, 9)
    gw.kill()
    _strip_epochs(state)

    upgraded = Gateway(state)
    assert "before stream epochs" in (upgraded.svc.new_epoch_reason or "")
    assert upgraded.svc.snapshot().totals == truth(t), "checkpoint and old journal both applied"
    assert not (state / "journal").exists() and not (state / "checkpoint.bin").exists()
    t = upgraded.run(t, 2)
    assert upgraded.svc.snapshot().totals == truth(t)
    upgraded.svc.close()


def test_a_switch_interrupted_by_a_crash_is_finished_or_undone(tmp_path: Path) -> None:
    prepared = Gateway(tmp_path / "a")
    prepared.run(T0, 3)
    prepared.kill()
    # The crash came after the old files were moved aside, before the new ones were installed.
    (tmp_path / "b").mkdir()
    os.replace(stream_dir(tmp_path / "a"), tmp_path / "b" / "stream.new")
    installed = Gateway(tmp_path / "b")
    assert (installed.svc.epoch, installed.svc.last_seq) == (prepared.svc.epoch, 3)
    installed.kill()
    # The crash came while the new files were being prepared: the old ones stand.
    (tmp_path / "b" / "stream.new").mkdir()
    (tmp_path / "b" / "stream.new" / "published.mark").write_bytes(b"half")
    again = Gateway(tmp_path / "b")
    assert (again.svc.epoch, again.svc.last_seq) == (prepared.svc.epoch, 3)
    assert not (tmp_path / "b" / "stream.new").exists()
    again.svc.close()


def test_a_live_client_follows_the_gateway_into_a_new_epoch(tmp_path: Path) -> None:
    usage, replay = _free_endpoint(), _free_endpoint()
    plain = ServerSecurity(plaintext=True)
    config = StreamConfig(usage, replay, plain, snapshot_every=10**6)
    svc = MeterService("gw1", tmp_path / "s1", config, SUBS)
    agg = twin.Aggregator(N_SLOTS)
    client = UsageClient(usage, replay, timeout_ms=3000)
    try:
        wait_subscribed(svc, client)  # publishes snapshot probes until one arrives
        stream = client.messages(idle_timeout_ms=2000)
        t = T0
        for _ in range(3):
            t += 1000
            agg.poll(counters_at(t), t)
            svc.publish(agg.rollup(t), agg.state())
        first = [next(stream) for _ in range(3)]
        old = svc.epoch
        svc.close()
        # Another state_dir: the restarted gateway has lost its state and begins a new epoch.
        svc = MeterService("gw1", tmp_path / "s2", config, SUBS)
        agg = twin.Aggregator(N_SLOTS)
        wait_subscribed(svc, client)  # the client reconnected; these probes it does not see
        for _ in range(4):
            t += 1000
            agg.poll(counters_at(t), t)
            svc.publish(agg.rollup(t), agg.state())
        rest = [next(stream)]
        while rest[-1].seq < svc.last_seq:
            rest.append(next(stream))
    finally:
        svc.close()
        client.close()
    assert {m.epoch for m in first} == {old}
    # The first live message of the new epoch has a seq above 1: the client reads the new
    # epoch from its seq 1, each seq once, the probes it missed included.
    assert [(m.epoch, m.seq) for m in rest] == [(svc.epoch, s) for s in range(1, svc.last_seq + 1)]
    assert client.epoch_changes == 1
