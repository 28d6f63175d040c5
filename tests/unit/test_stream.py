"""The usage stream over real ZeroMQ sockets on loopback: schema, replay, gaps, security.

(Over 400 lines: the cases share the publisher and billing-client fixtures defined here.)
"""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Generator, Iterator
from pathlib import Path

import msgpack
import numpy as np
import pytest
import zmq

from desanet.cython_ext import twin
from desanet.cython_ext.usage import UsageInterval
from desanet.errors import ConfigError, StreamError
from desanet.meter import wire
from desanet.meter.client import UsageClient
from desanet.meter.keys import (
    ClientSecurity,
    KeyPair,
    ServerSecurity,
    generate_keypair,
    load_allowed_keys,
    load_keypair,
)
from desanet.meter.service import MeterService, StreamConfig

pytestmark = pytest.mark.unit

ANY_PORT = "tcp://127.0.0.1:*"
PLAINTEXT = ServerSecurity(plaintext=True)


def interval(t1: int, slots: list[int], up: list[int], totals: list[int]) -> UsageInterval:
    """An interval where down = 2 * up and packets = 1 per slot (enough to tell columns apart)."""

    def u64(values: list[int]) -> np.ndarray:
        return np.array(values, dtype=np.uint64)

    return UsageInterval(
        t0_ms=t1 - 1000,
        t1_ms=t1,
        slots=np.array(slots, dtype=np.uint32),
        up=u64(up),
        down=u64([2 * x for x in up]),
        up_pkts=u64([1] * len(slots)),
        down_pkts=u64([1] * len(slots)),
        up_total=u64(totals),
        down_total=u64([2 * x for x in totals]),
    )


def loopback_service(
    state_dir: Path, security: ServerSecurity = PLAINTEXT, **kw: object
) -> MeterService:
    """Gateway "gw1" publishing for s1-s3 on loopback ports the kernel picks."""
    return MeterService(
        "gw1",
        state_dir,
        StreamConfig(ANY_PORT, ANY_PORT, security, **kw),  # type: ignore[arg-type]
        {1: "s1", 2: "s2", 3: "s3"},
    )


def start(
    state_dir: Path, security: ServerSecurity = PLAINTEXT, **kw: int
) -> Generator[MeterService, None, None]:
    svc = loopback_service(state_dir, security, **kw)
    try:
        yield svc
    finally:
        svc.close()


@pytest.fixture
def service(tmp_path: Path) -> Iterator[MeterService]:
    yield from start(tmp_path / "state")


def client_of(svc: MeterService, **kw: object) -> UsageClient:
    return UsageClient(svc.usage_endpoint, svc.replay_endpoint, timeout_ms=2000, **kw)  # type: ignore[arg-type]


def wait_subscribed(svc: MeterService, client: UsageClient) -> None:
    # PUB drops messages until the subscription has arrived: publish probes until one shows up.
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline:
        svc.publish_snapshot()
        if client._sub.poll(100):
            client._sub.recv_multipart()
            return
    raise AssertionError("subscription never arrived")


def test_published_message_is_v1_exactly(service: MeterService) -> None:
    ctx = zmq.Context()
    sub = ctx.socket(zmq.SUB)
    sub.subscribe(b"usage.gw1")
    sub.connect(service.usage_endpoint)
    try:
        time.sleep(0.3)
        seq = service.publish(interval(5000, [0, 1, 3], [7, 100, 300], [7, 1100, 3300]), {})
        assert sub.poll(2000)
        topic, body = sub.recv_multipart()
        assert topic == b"usage.gw1"
        doc = msgpack.unpackb(body)
        # Slot 0 (unmatched traffic) is no subscriber: not in `sub`, under `unprovisioned`.
        assert doc == {
            "v": 1,
            "gw": "gw1",
            "epoch": service.epoch,
            "seq": seq,
            "t0": 4000,
            "t1": 5000,
            "sub": ["s1", "s3"],
            "up": [100, 300],
            "down": [200, 600],
            "up_pkts": [1, 1],
            "down_pkts": [1, 1],
            "up_total": [1100, 3300],
            "down_total": [2200, 6600],
            "unprovisioned": {
                "up": 7,
                "down": 14,
                "up_pkts": 1,
                "down_pkts": 1,
                "up_total": 7,
                "down_total": 14,
            },
        }
    finally:
        sub.close(0)
        ctx.term()


def test_seq_totals_and_aggregator_state_survive_restart(tmp_path: Path) -> None:
    agg = twin.Aggregator(4)
    counters = np.zeros((4, 4), dtype=np.uint64)
    gen = start(tmp_path)
    svc = next(gen)
    for t in range(1, 6):
        counters[1] += np.uint64(10 * t)
        agg.poll(counters, t * 1000)
        svc.publish(agg.rollup(t * 1000), agg.state())
    assert svc.last_seq == 5
    totals_before = agg.totals()
    svc.journal.close()
    svc._close_sockets()  # no checkpoint: as after kill -9, only the journal is left

    gen2 = start(tmp_path)
    svc2 = next(gen2)
    assert svc2.last_seq == 5
    assert svc2.snapshot().totals == {"s1": (int(totals_before[1, 0]), int(totals_before[1, 2]))}
    agg2 = twin.Aggregator(4)
    assert svc2.restored_state is not None
    agg2.restore(svc2.restored_state)
    counters[1] += np.uint64(7)
    agg2.poll(counters, 6000)
    iv = agg2.rollup(6000)
    assert svc2.publish(iv, agg2.state()) == 6
    # Kernel counters kept running while the daemon was down: only the new 7 bytes are new.
    assert iv.up.tolist() == [7] and iv.up_total.tolist() == [int(totals_before[1, 0]) + 7]
    gen2.close()


def test_replay_snapshot_and_join_mid_stream(service: MeterService) -> None:
    for t in range(1, 11):
        service.publish(interval(t * 1000, [1, 2], [t, 2 * t], [t * 10, t * 20]), {})
    with client_of(service) as client:
        snap = client.snapshot()
        assert (snap.gw, snap.seq) == ("gw1", 10)
        assert snap.totals == {"s1": (100, 200), "s2": (200, 400)}
        replayed = list(client.replay(4, 7))
        assert [m.seq for m in replayed] == [4, 5, 6, 7]
        assert replayed[0].up == [4, 8]
        # Join mid-stream: replay from seq 3, then live, every seq exactly once.
        stream = client.messages(from_seq=3, idle_timeout_ms=1500)
        seen = [next(stream).seq for _ in range(8)]
        assert seen == list(range(3, 11))
        wait_subscribed(service, client)
        service.publish(interval(12_000, [1], [5], [105]), {})
        rest = [m.seq for m in stream]
        assert rest[-1] == service.last_seq
        assert rest == list(range(11, service.last_seq + 1))


def test_replay_is_chunked_but_complete(tmp_path: Path) -> None:
    gen = start(tmp_path, snapshot_every=10**9)
    svc = next(gen)
    for t in range(1, 601):
        svc.publish(interval(t, [1], [1], [t]), {})
    with client_of(svc) as client:
        assert [m.seq for m in client.replay(1)] == list(range(1, 601))
    gen.close()


def test_gap_is_filled_from_replay_and_duplicates_dropped(service: MeterService) -> None:
    with client_of(service) as client:
        wait_subscribed(service, client)
        stream = client.messages(idle_timeout_ms=1000)
        first = service.publish(interval(1000, [1], [1], [1]), {})
        assert next(stream).seq == first
        client._sub.unsubscribe(wire.TOPIC_PREFIX.encode())
        time.sleep(0.2)
        for t in range(2, 6):
            service.publish(interval(t * 1000, [1], [1], [t]), {})
        client._sub.subscribe(wire.TOPIC_PREFIX.encode())
        time.sleep(0.2)
        last = service.publish(interval(6000, [1], [1], [6]), {})
        got = [m.seq for m in stream]
        assert got == list(range(first + 1, last + 1))
        assert client.gaps_filled == last - first - 1


def test_snapshot_messages_are_published_periodically(tmp_path: Path) -> None:
    gen = start(tmp_path, snapshot_every=3)
    svc = next(gen)
    for t in range(1, 7):
        svc.publish(interval(t * 1000, [t % 3 + 1], [1], [t]), {})
    with client_of(svc) as client:
        msgs = list(client.replay(1))
    snaps = [m for m in msgs if m.snapshot]
    assert [m.seq for m in snaps] == [4, 8]
    assert sorted(snaps[-1].sub) == ["s1", "s2", "s3"]
    assert all(x == 0 for x in snaps[-1].up)
    gen.close()


@pytest.fixture
def curve(tmp_path: Path) -> tuple[ServerSecurity, KeyPair, KeyPair]:
    keys = tmp_path / "keys"
    _, server_secret = generate_keypair(keys, "gateway")
    _, billing_secret = generate_keypair(keys / "allowed", "billing")
    _, intruder_secret = generate_keypair(keys, "intruder")
    security = ServerSecurity(
        server=load_keypair(server_secret),
        allowed_clients=load_allowed_keys(keys / "allowed"),
    )
    return security, load_keypair(billing_secret), load_keypair(intruder_secret)


def test_curve_allowed_client_receives_and_unknown_receives_nothing(
    tmp_path: Path, curve: tuple[ServerSecurity, KeyPair, KeyPair]
) -> None:
    security, billing, intruder = curve
    assert security.server is not None
    gen = start(tmp_path / "state", security)
    svc = next(gen)
    good = client_of(svc, security=ClientSecurity(security.server.public, billing))
    bad = client_of(svc, security=ClientSecurity(security.server.public, intruder))
    clear = client_of(svc)
    try:
        wait_subscribed(svc, good)
        for t in range(1, 4):
            svc.publish(interval(t * 1000, [1], [t], [t]), {})
        assert [m.seq for m in good.messages(idle_timeout_ms=500)] == [
            svc.last_seq - 2,
            svc.last_seq - 1,
            svc.last_seq,
        ]
        assert good.snapshot().totals["s1"] == (3, 6)
        for outsider in (bad, clear):
            assert not outsider._sub.poll(300)
            with pytest.raises(StreamError, match="no answer"):
                outsider.snapshot()
    finally:
        for c in (good, bad, clear):
            c.close()
        gen.close()


def test_plaintext_only_on_loopback_and_curve_needs_a_key(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="loopback"):
        MeterService(
            "gw1",
            tmp_path,
            StreamConfig("tcp://0.0.0.0:*", ANY_PORT, PLAINTEXT),
            {},
        )
    with pytest.raises(ConfigError, match="secret key"):
        ServerSecurity()


def test_ten_thousand_malformed_requests_leave_the_service_serving(
    service: MeterService,
) -> None:
    service.publish(interval(1000, [1], [1], [1]), {})
    bad_requests = [
        b"",
        b"\xc1",
        b"not msgpack at all",
        msgpack.packb([1, 2, 3]),
        msgpack.packb({"v": 2, "op": "replay", "from": 1}),
        msgpack.packb({"v": 1, "op": "delete-everything"}),
        msgpack.packb({"v": 1, "op": "replay", "from": -5}),
        msgpack.packb({"v": 1, "op": "replay", "from": "1"}),
        msgpack.packb({"v": 1, "op": "replay", "from": 2**64 - 1}),
        msgpack.packb({"v": 1, "op": "replay"}),
        msgpack.packb({"v": 1, "op": "replay", "from": 1.5}),
        msgpack.packb({1: 2}),
        b"\xdd\xff\xff\xff\xff",
        msgpack.packb({"v": 1, "op": "snapshot", "pad": "x" * 5000}),
    ]
    ctx = zmq.Context()
    dealer = ctx.socket(zmq.DEALER)
    dealer.connect(service.replay_endpoint)
    errors = 0
    try:
        sent = 0
        while sent < 10_000:
            batch = [bad_requests[(sent + i) % len(bad_requests)] for i in range(200)]
            for request in batch:
                dealer.send(request)
            sent += len(batch)
            for _ in batch:
                assert dealer.poll(5000), f"no reply after {sent} bad requests"
                kind, _payload = dealer.recv_multipart()
                errors += kind == wire.REPLY_ERROR
        dealer.send_multipart([b"two", b"frames"])
        assert dealer.poll(2000)
        assert dealer.recv_multipart()[0] == wire.REPLY_ERROR
        # A frame beyond the size limit is dropped with its connection, never parsed.
        huge = ctx.socket(zmq.DEALER)
        huge.connect(service.replay_endpoint)
        huge.send(b"\x00" * (1 << 20))
        assert not huge.poll(300)
        huge.close(0)
    finally:
        dealer.close(0)
        ctx.term()
    assert errors == 10_000
    with client_of(service) as client:
        assert client.snapshot().seq == service.last_seq
        assert [m.seq for m in client.replay(1)] == [1]
    assert service.publish(interval(2000, [1], [1], [2]), {}) == 2


def test_reassigned_slot_keeps_the_old_subscribers_totals(service: MeterService) -> None:
    service.publish(interval(1000, [1, 2], [10, 20], [10, 20]), {})
    service.set_subscribers({1: "s9", 2: "s2"})
    service.publish(interval(2000, [1, 2], [1, 2], [1, 22]), {})
    totals = {sub: up for sub, (up, _down) in service.snapshot().totals.items()}
    assert totals == {"s1": 10, "s2": 22, "s9": 1}


def test_client_asks_again_when_a_reply_lost_messages(tmp_path: Path) -> None:
    """A replay server on a lossy path: the first answer lacks seq 3; nothing is skipped."""
    ctx = zmq.Context()
    router = ctx.socket(zmq.ROUTER)
    port = router.bind_to_random_port("tcp://127.0.0.1")
    messages = {
        seq: wire.encode_usage(
            "gw1", seq, 0, 1, ["s1"], {c: [seq] for c in wire.COLUMNS}, epoch="e1"
        )
        for seq in range(1, 6)
    }
    asked: list[int] = []

    def serve() -> None:
        while router.poll(1000):
            identity, body = router.recv_multipart()
            start = wire.decode_request(body).from_seq
            asked.append(start)
            for seq in range(start, 6):
                if not (seq == 3 and len(asked) == 1):
                    router.send_multipart([identity, wire.REPLY_MSG, messages[seq]])
            end = wire.ReplayEnd("e1", 6, 5)
            router.send_multipart([identity, wire.REPLY_END, wire.encode_end(end)])

    thread = threading.Thread(target=serve)
    thread.start()
    try:
        with UsageClient("tcp://127.0.0.1:1", f"tcp://127.0.0.1:{port}") as client:
            assert [m.seq for m in client.replay(1)] == [1, 2, 3, 4, 5]
    finally:
        thread.join()
        router.close(0)
        ctx.term()
    assert asked == [1, 3]


def test_cli_usage_with_curve_keys(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from desanet.gateway.cli import main

    keys = tmp_path / "keys"
    assert main(["keygen", "gateway", "--dir", str(keys)]) == 0
    assert main(["keygen", "billing", "--dir", str(keys / "allowed")]) == 0
    security = ServerSecurity(
        server=load_keypair(keys / "gateway.key_secret"),
        allowed_clients=load_allowed_keys(keys / "allowed"),
    )
    gen = start(tmp_path / "state", security)
    svc = next(gen)
    try:
        svc.publish(interval(1000, [2], [42], [42]), {})
        connect = ["--connect", svc.usage_endpoint, "--replay", svc.replay_endpoint]
        curve = ["--server-key", str(keys / "gateway.key")]
        capsys.readouterr()
        own_key = ["--key", str(keys / "allowed" / "billing.key_secret")]
        assert main(["usage", *connect, *curve, *own_key, "--json"]) == 0
        row = json.loads(capsys.readouterr().out)
        assert (row["sub"], row["up_total"], row["down_total"]) == ("s2", 42, 84)
        # Without an allowed key of its own the client is refused: an error, exit status 2.
        assert main(["usage", *connect, *curve, "--timeout", "1"]) == 2
        assert "no answer from the replay endpoint" in capsys.readouterr().err
    finally:
        gen.close()


def test_events_round_trip_and_malformed_events_are_named() -> None:
    columns = {name: [] for name in wire.COLUMNS}
    event = wire.UsageEvent(1_700_000_000_000, "s5", "throttled", "quota passed")
    msg = wire.decode_usage(
        wire.encode_usage("gw", 7, 1, 2, [], columns, epoch="e1", events=[event])
    )
    assert msg.events == (event,)
    assert wire.decode_usage(wire.encode_usage("gw", 8, 1, 2, [], columns, epoch="e1")).events == ()
    body = msgpack.unpackb(wire.encode_usage("gw", 9, 1, 2, [], columns, epoch="e1"))
    for bad, message in (
        ("nope", "ev is not a list"),
        ([7], "not a map"),
        ([{"t": "x", "sub": "s", "kind": "k", "detail": ""}], "t is not an integer"),
        ([{"t": 1, "sub": 3, "kind": "k", "detail": ""}], "not a string"),
    ):
        with pytest.raises(StreamError, match=message):
            wire.decode_usage(msgpack.packb(body | {"ev": bad}))
