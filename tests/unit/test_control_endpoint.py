"""The control endpoint on loopback: only allowed CURVE keys get in; malformed bodies refused."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator, Sequence
from typing import Any

import msgpack
import pytest
import zmq

from desanet.errors import ControlError
from desanet.gateway.control import MAX_BATCH, ControlEndpoint, request, request_many
from desanet.meter.keys import ClientSecurity, KeyPair, ServerSecurity

pytestmark = pytest.mark.unit


def keypair() -> KeyPair:
    public, secret = zmq.curve_keypair()
    return KeyPair(public, secret)


SERVER, BILLING, STRANGER = keypair(), keypair(), keypair()
BATCHES: list[int] = []  # sizes of the batches the handler got


@pytest.fixture
def endpoint() -> Iterator[ControlEndpoint]:
    security = ServerSecurity(server=SERVER, allowed_clients=frozenset({BILLING.public}))
    ep = ControlEndpoint("tcp://127.0.0.1:0", security)
    stop = threading.Event()

    def echo(req: object) -> dict[str, Any]:
        if isinstance(req, dict) and req.get("op") == "crash":
            raise RuntimeError("a bug in the handler")
        if isinstance(req, dict) and req.get("op") == "unpackable":
            return {"ok": True, "value": object()}
        if isinstance(req, dict):
            return {"ok": True, "echo": req}
        return {"ok": False, "error": f"refused {type(req).__name__}"}

    def echo_all(requests: Sequence[object]) -> list[dict[str, Any]]:
        BATCHES.append(len(requests))
        return [echo(r) for r in requests]

    def serve() -> None:
        while not stop.is_set():
            if ep.sock.poll(50):
                time.sleep(0.05)  # let a pipelined burst arrive whole
                ep.serve_pending(echo_all)

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    yield ep
    stop.set()
    thread.join()
    ep.close()


def test_allowed_client_gets_replies(endpoint: ControlEndpoint) -> None:
    reply = request(
        endpoint.endpoint, {"op": "show", "sub": "s1"}, ClientSecurity(SERVER.public, BILLING)
    )
    assert reply == {"ok": True, "echo": {"op": "show", "sub": "s1"}}


def test_unknown_key_and_plaintext_clients_get_nothing(endpoint: ControlEndpoint) -> None:
    with pytest.raises(ControlError, match="no reply"):
        request(endpoint.endpoint, {"op": "show"}, ClientSecurity(SERVER.public, STRANGER), 500)
    with pytest.raises(ControlError, match="no reply"):
        request(endpoint.endpoint, {"op": "show"}, ClientSecurity(), 500)


def test_malformed_frames_get_error_replies(endpoint: ControlEndpoint) -> None:
    with zmq.Context() as ctx, ctx.socket(zmq.DEALER) as sock:
        sock.linger = 0
        sock.curve_serverkey = SERVER.public
        sock.curve_publickey = BILLING.public
        sock.curve_secretkey = BILLING.secret
        sock.connect(endpoint.endpoint)
        for frames in ([b"\\xc1garbage"], [b"a", b"b"], [msgpack.packb([1, 2])]):
            sock.send_multipart(frames)
            assert sock.poll(2000)
            reply = msgpack.unpackb(sock.recv_multipart()[-1])
            assert reply["ok"] is False
        sock.send_multipart([msgpack.packb({"op": "show"})])
        assert sock.poll(2000)
        assert msgpack.unpackb(sock.recv_multipart()[-1])["ok"] is True


def test_any_failure_inside_is_an_error_reply(endpoint: ControlEndpoint) -> None:
    billing = ClientSecurity(SERVER.public, BILLING)
    for op, kind in (("crash", "RuntimeError"), ("unpackable", "TypeError")):
        reply = request(endpoint.endpoint, {"op": op}, billing)
        assert reply == {"ok": False, "error": f"internal error ({kind}); see the log"}
    assert request(endpoint.endpoint, {"op": "show"}, billing)["ok"] is True


def test_pipelined_requests_are_served_in_batches_in_order(endpoint: ControlEndpoint) -> None:
    BATCHES.clear()
    bodies = [{"op": "show", "sub": f"s{i}"} for i in range(600)]
    replies = request_many(endpoint.endpoint, bodies, ClientSecurity(SERVER.public, BILLING))
    assert [r["echo"]["sub"] for r in replies] == [f"s{i}" for i in range(600)]
    # Together, but never more than MAX_BATCH at a time.
    assert sum(BATCHES) == 600 and max(BATCHES) == MAX_BATCH and len(BATCHES) < 100


def test_a_spent_budget_serves_nothing_and_a_short_one_little() -> None:
    security = ServerSecurity(server=SERVER, allowed_clients=frozenset({BILLING.public}))
    ep = ControlEndpoint("tcp://127.0.0.1:0", security)
    sizes: list[int] = []

    def handler(requests: Sequence[object]) -> list[dict[str, Any]]:
        sizes.append(len(requests))
        return [{"ok": True} for _ in requests]

    bodies = [msgpack.packb({"op": "show", "sub": "s1"})] * 20
    try:
        with zmq.Context() as ctx, ctx.socket(zmq.DEALER) as sock:
            sock.linger = 0
            sock.curve_serverkey = SERVER.public
            sock.curve_publickey, sock.curve_secretkey = BILLING.public, BILLING.secret
            sock.connect(ep.endpoint)
            for body in bodies:
                sock.send_multipart([b"", body])
            assert ep.wait(2000)
            time.sleep(0.2)
            assert ep.serve_pending(handler, budget_s=0.0) == 0  # the tick is due first
            assert ep.serve_pending(handler, budget_s=1e-9) == 1  # one request at least
            served = 1
            while served < 20:
                assert ep.wait(2000)
                served += ep.serve_pending(handler)
            assert sizes[0] == 1 and sum(sizes) == 20
    finally:
        ep.close()
