"""Limits before authentication on the usage and replay endpoints, against hostile peers.

The service runs in a child process (CURVE keys, publishing every 50 ms), so
that its memory and descriptors are measured alone, and the attacker is
another process as it would be: a raw TCP client announcing a 600 MiB
handshake frame, 1,100 idle TCP connections against a 1,024-descriptor limit,
and 10,000 random and hostile requests plus raw junk on both ports.
"""

from __future__ import annotations

import contextlib
import os
import random
import resource
import socket
import struct
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import msgpack
import pytest
import zmq

from desanet.errors import StreamError
from desanet.meter import wire
from desanet.meter.client import UsageClient
from desanet.meter.keys import (
    ClientSecurity,
    ServerSecurity,
    generate_keypair,
    load_allowed_keys,
    load_keypair,
)
from desanet.meter.service import MeterService, StreamConfig
from tests.unit.test_stream import interval

pytestmark = pytest.mark.unit

REPO = Path(__file__).resolve().parents[2]
MIB = 1 << 20


def child(state_dir: str, keys: str, nofile: int, handshake_ms: int) -> None:
    """The gateway stand-in (run in a subprocess): publish every 50 ms, report failures."""
    if nofile:
        resource.setrlimit(resource.RLIMIT_NOFILE, (nofile, nofile))
    security = ServerSecurity(
        server=load_keypair(Path(keys) / "gateway.key_secret"),
        allowed_clients=load_allowed_keys(Path(keys) / "allowed"),
    )
    config = StreamConfig(
        "tcp://127.0.0.1:*", "tcp://127.0.0.1:*", security, handshake_ms=handshake_ms
    )
    svc = MeterService("gw1", Path(state_dir), config, {1: "s1"})
    print("ready", svc.usage_endpoint, svc.replay_endpoint, flush=True)
    total = 0
    while True:
        total += 1000
        now = time.time_ns() // 1_000_000
        try:
            svc.publish(interval(now, [1], [1000], [total]), {})
        except StreamError as err:
            print("failed:", err, flush=True)
        time.sleep(0.05)


@dataclass
class Served:
    """A child service and a billing client's keys."""

    proc: subprocess.Popen[str]
    usage: str
    replay: str
    security: ClientSecurity

    @property
    def peak_rss_mib(self) -> float:
        """The most memory the service ever held resident (VmHWM), MiB."""
        status = Path(f"/proc/{self.proc.pid}/status").read_text()
        (line,) = [x for x in status.splitlines() if x.startswith("VmHWM:")]
        return int(line.split()[1]) / 1024

    @property
    def descriptors(self) -> int:
        return len(os.listdir(f"/proc/{self.proc.pid}/fd"))

    def client(self, **kw: int) -> UsageClient:
        return UsageClient(self.usage, self.replay, security=self.security, timeout_ms=3000, **kw)

    def failures(self) -> list[str]:
        self.proc.terminate()
        out, _ = self.proc.communicate(timeout=20)
        return [line for line in out.splitlines() if line.startswith("failed")]


def serve(tmp_path: Path, nofile: int = 0, handshake_ms: int = 10_000) -> Iterator[Served]:
    keys = tmp_path / "keys"
    generate_keypair(keys, "gateway")
    _, billing = generate_keypair(keys / "allowed", "billing")
    code = (
        "from tests.unit.test_stream_limits import child; "
        f"child({str(tmp_path / 'state')!r}, {str(keys)!r}, {nofile}, {handshake_ms})"
    )
    proc = subprocess.Popen(
        [sys.executable, "-c", code],
        cwd=REPO,
        stdout=subprocess.PIPE,
        text=True,
        env=os.environ | {"PYTHONPATH": str(REPO)},
    )
    try:
        assert proc.stdout is not None
        ready, usage, replay = proc.stdout.readline().split()
        assert ready == "ready"
        server = load_keypair(keys / "gateway.key").public
        yield Served(proc, usage, replay, ClientSecurity(server, load_keypair(billing)))
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.wait()


@pytest.fixture
def served(tmp_path: Path) -> Iterator[Served]:
    yield from serve(tmp_path)


def host_port(endpoint: str) -> tuple[str, int]:
    host, _, port = endpoint.removeprefix("tcp://").rpartition(":")
    return host, int(port)


def zmtp_greeting(mechanism: bytes = b"CURVE") -> bytes:
    """A ZMTP 3.0 greeting as a client sends it (signature, version, mechanism, filler)."""
    return b"\xff" + b"\0" * 7 + b"\x01\x7f" + b"\x03\x00" + mechanism.ljust(20, b"\0") + b"\0" * 32


def assert_serving(served: Served) -> None:
    """The stream still flows live and the replay endpoint still answers an allowed client."""
    with served.client() as client:
        live = client.messages(idle_timeout_ms=3000)
        seqs = [next(live).seq for _ in range(5)]
        assert seqs == list(range(seqs[0], seqs[0] + 5)), "live messages, each seq once"
        snap = client.snapshot()
        assert snap.seq >= seqs[-1]
        assert [m.seq for m in client.replay(seqs[0], seqs[-1])] == seqs


def test_a_600_mib_handshake_frame_does_not_grow_the_server(served: Served) -> None:
    assert_serving(served)
    before = served.peak_rss_mib
    for endpoint in (served.usage, served.replay):
        sock = socket.create_connection(host_port(endpoint), timeout=10)
        sock.sendall(zmtp_greeting())
        # A HELLO command announcing 600 MiB, then its body as fast as the server takes it.
        sock.sendall(struct.pack(">BQ", 0x06, 600 * MIB))
        chunk, sent = b"\0" * MIB, 0
        with pytest.raises(OSError):
            while sent < 600 * MIB:
                sock.sendall(chunk)
                sent += len(chunk)
        sock.close()
        # Only what the kernel's socket buffers took before the server hung up.
        assert sent < 64 * MIB, f"{endpoint}: {sent // MIB} MiB accepted before the hang-up"
    assert served.peak_rss_mib - before < 50
    assert_serving(served)
    assert served.failures() == []


def test_1100_idle_connections_leave_the_service_publishing_and_answering(
    tmp_path: Path,
) -> None:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < 2600:
        resource.setrlimit(resource.RLIMIT_NOFILE, (min(hard, 4096), hard))
    gen = serve(tmp_path, nofile=1024, handshake_ms=3000)
    served = next(gen)
    flood: list[socket.socket] = []
    try:
        billing = served.client()  # connected before the flood, as billing is
        billing.snapshot()
        live = billing.messages(idle_timeout_ms=3000)
        first = next(live)
        for endpoint in (served.usage, served.replay):
            for _ in range(1100):
                sock = socket.socket()
                sock.setblocking(False)
                sock.connect_ex(host_port(endpoint))  # completes in the background
                flood.append(sock)
        most = 0
        seen = first.seq
        deadline = time.monotonic() + 2.0
        while time.monotonic() < deadline:
            most = max(most, served.descriptors)
            seen = next(live).seq
        assert seen > first.seq + 10, "publishing went on during the flood"
        assert billing.snapshot().seq >= seen, "the replay endpoint answered during the flood"
        assert most < 1000, f"the service held {most} descriptors (limit 1024)"
        billing.close()
        time.sleep(3.5)  # the flood's connections never finished a handshake: they are dropped
        assert_serving(served)
    finally:
        for s in flood:
            s.close()
        failures = served.failures()
        gen.close()
    assert failures == [], failures


def _random_value(rng: random.Random, depth: int = 0) -> object:
    kind = rng.randrange(9 if depth < 3 else 6)
    if kind == 0:
        return rng.choice(
            [0, 1, -1, 2**63 - 1, 2**64 - 1, -(2**63), rng.randrange(-(10**9), 10**9)]
        )
    if kind == 1:
        return rng.random() * 10 ** rng.randrange(-5, 20)
    if kind == 2:
        return "".join(chr(rng.randrange(32, 0x3000)) for _ in range(rng.randrange(40)))
    if kind == 3:
        return rng.randbytes(rng.randrange(40))
    if kind == 4:
        return rng.choice([None, True, False])
    if kind == 5:
        return rng.choice(["v", "op", "from", "epoch", "replay", "snapshot", 1])
    if kind == 6:
        return [_random_value(rng, depth + 1) for _ in range(rng.randrange(6))]
    keys = ["v", "op", "from", "epoch", "x"]
    return {rng.choice(keys): _random_value(rng, depth + 1) for _ in range(rng.randrange(6))}


def hostile_requests(rng: random.Random, epoch: str) -> Iterator[list[bytes]]:
    """Random and hostile request frames; mostly one frame, some several."""
    valid = [
        wire.encode_request(wire.OP_REPLAY, 1),
        wire.encode_request(wire.OP_REPLAY, 5, epoch),
        wire.encode_request(wire.OP_SNAPSHOT),
    ]
    while True:
        pick = rng.randrange(8)
        if pick == 0:
            frame = rng.randbytes(rng.randrange(0, 1500))
        elif pick == 1:
            frame = bytearray(rng.choice(valid))
            frame[rng.randrange(len(frame))] ^= 1 << rng.randrange(8)
            frame = bytes(frame)
        elif pick == 2:
            frame = msgpack.packb(
                {"v": 1, "op": "replay", "from": _random_value(rng), "epoch": _random_value(rng)}
            )
        elif pick == 3:
            # Declared lengths far beyond the frame: a 4-billion-element array, a huge string.
            frame = rng.choice([b"\xdd\xff\xff\xff\xff", b"\xdb\xff\xff\xff\xf0abc", b"\xdf" * 9])
        elif pick == 4:
            frame = b"\x91" * rng.randrange(1, 1000)  # nesting far deeper than any request
        elif pick == 5:
            yield [rng.randbytes(rng.randrange(20)) for _ in range(rng.randrange(2, 40))]
            continue
        else:
            frame = msgpack.packb(_random_value(rng), use_bin_type=rng.random() < 0.5)
        yield [frame]


def _check_reply(kind: bytes, payload: bytes) -> None:
    decoders = {
        wire.REPLY_ERROR: wire.decode_refusal,
        wire.REPLY_END: wire.decode_end,
        wire.REPLY_SNAPSHOT: wire.decode_snapshot,
        wire.REPLY_MSG: wire.decode_usage,
    }
    assert kind in decoders, kind
    decoders[kind](payload)  # raises StreamError if the reply is not what the protocol says


def test_ten_thousand_hostile_requests_and_raw_junk(served: Served) -> None:
    rng = random.Random(2027)
    assert_serving(served)
    with served.client() as probe:
        epoch = probe.snapshot().epoch
    before = served.peak_rss_mib
    ctx = zmq.Context()
    dealer = ctx.socket(zmq.DEALER)
    dealer.linger = 0
    security = served.security
    assert security.client is not None and security.server_public is not None
    dealer.curve_serverkey = security.server_public
    dealer.curve_publickey = security.client.public
    dealer.curve_secretkey = security.client.secret
    dealer.connect(served.replay)
    kinds: dict[bytes, int] = {}
    try:
        for n, frames in zip(range(10_000), hostile_requests(rng, epoch), strict=False):
            dealer.send_multipart(frames)
            while True:
                assert dealer.poll(5000), f"no answer to request {n}: {frames!r:.200}"
                reply = dealer.recv_multipart()
                assert len(reply) == 2, reply
                _check_reply(*reply)
                kinds[reply[0]] = kinds.get(reply[0], 0) + 1
                if reply[0] != wire.REPLY_MSG:
                    break
            if n % 2000 == 0:
                assert_serving(served)
        # Raw junk before any handshake, on both ports: random bytes, then junk after a greeting.
        for endpoint in (served.usage, served.replay):
            for i in range(200):
                sock = socket.create_connection(host_port(endpoint), timeout=5)
                junk = rng.randbytes(rng.randrange(1, 4096))
                # The server may hang up before all the junk is sent: that is the point.
                with contextlib.suppress(OSError):
                    sock.sendall((zmtp_greeting() if i % 2 else b"") + junk)
                sock.close()
    finally:
        dealer.close()
        ctx.term()
    assert kinds[wire.REPLY_ERROR] > 9000 and kinds[wire.REPLY_END] > 0
    assert served.peak_rss_mib - before < 50
    assert_serving(served)
    assert served.failures() == []


def _wide(n: int) -> tuple[list[int], list[int], list[int]]:
    """Slots, deltas and totals of `n` subscribers: a message of about 30 bytes each."""
    return list(range(1, n + 1)), [123_456_789] * n, [864_197_523] * n


def test_a_full_subscriber_queue_drops_for_that_subscriber_only_and_is_counted(
    tmp_path: Path,
) -> None:
    subs = {slot: f"s{slot}" for slot in range(1, 5001)}
    config = StreamConfig(
        "tcp://127.0.0.1:*",
        "tcp://127.0.0.1:*",
        ServerSecurity(plaintext=True),
        send_hwm=4,
        snapshot_every=10**6,
    )
    svc = MeterService("gw1", tmp_path / "state", config, subs)
    ctx = zmq.Context()
    slow, fast = ctx.socket(zmq.SUB), ctx.socket(zmq.SUB)
    slow.rcvhwm, slow.rcvbuf = 1, 4096  # connected, subscribed, never reading
    for sock in (slow, fast):
        sock.subscribe(b"usage.")
        sock.connect(svc.usage_endpoint)
    try:
        time.sleep(0.5)
        received = []
        for n in range(1, 101):
            seq = svc.publish(interval(n * 1000, *_wide(len(subs))), {})
            assert fast.poll(5000), f"the reading subscriber got nothing for seq {seq}"
            received.append(wire.decode_usage(fast.recv_multipart()[1]).seq)
        assert received == list(range(1, 101)), "the reading subscriber lost nothing"
        assert svc.dropped > 0 and svc.stats().dropped_messages == svc.dropped
        got = 0
        while slow.poll(100):
            slow.recv_multipart()
            got += 1
        assert got < 100, "the full queue did drop messages for the slow subscriber"
        with UsageClient(svc.usage_endpoint, svc.replay_endpoint) as client:
            assert [m.seq for m in client.replay(1)] == list(range(1, 101)), "all by replay"
    finally:
        slow.close(0)
        fast.close(0)
        ctx.term()
        svc.close()


def test_replies_a_client_does_not_read_are_dropped_and_counted(tmp_path: Path) -> None:
    config = StreamConfig("tcp://127.0.0.1:*", "tcp://127.0.0.1:*", ServerSecurity(plaintext=True))
    svc = MeterService(
        "gw1", tmp_path / "state", config, {slot: f"s{slot}" for slot in range(1, 2001)}
    )
    for n in range(1, 301):
        svc.publish(interval(n * 1000, *_wide(2000)), {})
    ctx = zmq.Context()
    deaf = ctx.socket(zmq.DEALER)
    deaf.rcvhwm, deaf.rcvbuf = 1, 4096
    deaf.connect(svc.replay_endpoint)
    try:
        for _ in range(20):
            deaf.send(wire.encode_request(wire.OP_REPLAY, 1))
        deadline = time.monotonic() + 10
        while svc.stats().replay_dropped_replies == 0 and time.monotonic() < deadline:
            time.sleep(0.05)
        assert svc.stats().replay_dropped_replies > 0
        with UsageClient(svc.usage_endpoint, svc.replay_endpoint) as client:
            assert client.snapshot().seq == svc.last_seq, "other clients are still answered"
    finally:
        deaf.close(0)
        ctx.term()
        svc.close()
