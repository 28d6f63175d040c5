"""The control endpoint: the ZeroMQ socket billing sends requests to, and billing's client.

The gateway side answers from the service loop's thread, so requests and
polls never race on the control state; what a request means is decided in
`desanet.gateway.control_requests`.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Sequence
from typing import Any

import msgpack
import zmq

from desanet.errors import ControlError
from desanet.gateway.control_requests import MALFORMED
from desanet.meter.keys import (
    ClientSecurity,
    ServerSecurity,
    secure_client,
    secure_server,
    start_authenticator,
)
from desanet.meter.limits import ConnectionLimiter, EndpointLimits, apply_limits

log = logging.getLogger(__name__)

MAX_REQUEST_BYTES = 4096
# Requests answered as one batch at most (one transaction, one shaper apply:
# about 50 ms of work at 10,000 subscribers, benchmarks/control.py).
MAX_BATCH = 256
# A peer may queue a few batches (4 KiB each at most, authenticated peers only).
LIMITS = EndpointLimits(MAX_REQUEST_BYTES, max_connections=64, receive_hwm=4 * MAX_BATCH)

BatchHandler = Callable[[Sequence[object]], Sequence[dict[str, Any]]]


class ControlEndpoint:
    """The ROUTER socket billing sends requests to: CURVE + ZAP, the usage stream's allowed keys.

    Served from the service loop's thread (`serve_pending`), so requests and
    polls never race on the control state. A client with an unknown key never
    gets through the handshake; a malformed request gets an error reply.
    """

    def __init__(self, endpoint: str, security: ServerSecurity) -> None:
        self.ctx: zmq.Context[zmq.Socket[bytes]] = zmq.Context()
        self.auth = start_authenticator(self.ctx, security)
        self.sock: zmq.Socket[bytes] = self.ctx.socket(zmq.ROUTER)
        self.sock.linger = 0
        # Before authentication: libzmq drops a peer sending a bigger frame before it reaches
        # Python, ends a handshake that takes too long, and a batch's worth is queued per peer.
        apply_limits(self.sock, LIMITS)
        # Each connection holds a descriptor: those beyond the limit are shut down.
        self.limiter = ConnectionLimiter(self.sock, "control", LIMITS.max_connections)
        try:
            secure_server(self.sock, security, endpoint)
            self.sock.bind(endpoint)
        except zmq.ZMQError as err:
            self.close()
            raise ControlError(f"cannot bind the control endpoint {endpoint}: {err}") from err
        self.endpoint = self.sock.getsockopt_string(zmq.LAST_ENDPOINT)
        self.limiter.bound(self.endpoint)
        self._request_cost_s = 0.001  # seconds per request, measured batch by batch
        self._watched: list[int] = []

    def watch(self, fd: int) -> None:
        """Also end `wait()` when `fd` is readable (requests queued elsewhere, fleet_control)."""
        self._watched.append(fd)

    def wait(self, timeout_ms: int) -> bool:
        """Wait up to `timeout_ms` for a request; True when one is waiting."""
        poller = zmq.Poller()
        poller.register(self.sock, zmq.POLLIN)
        poller.register(self.limiter.monitor, zmq.POLLIN)
        for fd in self._watched:
            poller.register(fd, zmq.POLLIN)
        deadline = time.monotonic() + timeout_ms / 1000
        while True:
            left_ms = max(0, int((deadline - time.monotonic()) * 1000))
            ready = dict(poller.poll(left_ms))
            if self.limiter.monitor in ready:
                self.limiter.handle()  # connections come and go: keep waiting for a request
            if self.sock in ready or any(fd in ready for fd in self._watched):
                return True
            if left_ms == 0:
                return False

    def serve_pending(self, handler: BatchHandler, budget_s: float | None = None) -> int:
        """Answer the waiting requests as one batch; returns how many.

        `handler` gets the decoded requests in arrival order and returns one
        reply per request: requests that arrive together are applied together.
        A batch holds at most MAX_BATCH requests, and with `budget_s` only as
        many as that time allows at the cost measured so far (none when it is
        spent), so the service loop's next tick is never late by more than one
        request. The boundary of every request: whatever goes wrong (the
        handler, or packing a reply) becomes an error reply and one log line;
        the next request is served as usual.
        """
        self.limiter.handle()
        max_requests = MAX_BATCH
        if budget_s is not None:
            if budget_s <= 0:
                return 0
            max_requests = max(1, min(MAX_BATCH, int(budget_s / self._request_cost_s)))
        started = time.monotonic()
        envelopes: list[list[bytes]] = []
        bodies: list[object] = []
        framing: dict[int, dict[str, Any]] = {}
        while len(envelopes) < max_requests:
            try:
                frames = self.sock.recv_multipart(zmq.NOBLOCK)
            except zmq.Again:
                break
            # REQ peers send [identity, "", body], DEALER peers [identity, body]: the
            # reply goes back under the same envelope, whatever follows it.
            envelope = frames[:2] if len(frames) > 1 and frames[1] == b"" else frames[:1]
            body = frames[len(envelope) :]
            envelopes.append(envelope)
            if len(body) != 1:
                framing[len(envelopes) - 1] = {
                    "ok": False,
                    "error": "malformed: one body frame expected",
                }
            else:
                bodies.append(unpack_request(body[0]))
        if not envelopes:
            return 0
        answers = iter(answer_batch(handler, bodies))
        for index, envelope in enumerate(envelopes):
            reply = framing[index] if index in framing else next(answers)
            self.sock.send_multipart([*envelope, pack_reply(reply)])
        cost = (time.monotonic() - started) / len(envelopes)
        self._request_cost_s = (self._request_cost_s + cost) / 2
        return len(envelopes)

    def close(self) -> None:
        """Close the socket and stop the authenticator."""
        if hasattr(self, "limiter"):
            self.sock.disable_monitor()
            self.limiter.close()
        self.sock.close(linger=0)
        if self.auth is not None:
            self.auth.stop()
        self.ctx.term()


def answer_batch(handler: BatchHandler, bodies: list[object]) -> list[Any]:
    """One reply per decoded request; a failing handler answers each with an internal error.

    The boundary of a batch for every transport (ZeroMQ here, NATS in fleet_control).
    """
    if not bodies:
        return []
    try:
        replies = list(handler(bodies))
        if len(replies) != len(bodies):
            raise ControlError(f"{len(replies)} replies for {len(bodies)} requests")
    except Exception as err:
        log.error("control request failed inside the gateway: %s: %s", type(err).__name__, err)
        replies = [_internal_error(err)] * len(bodies)
    return replies


def _internal_error(err: Exception) -> dict[str, Any]:
    return {"ok": False, "error": f"internal error ({type(err).__name__}); see the log"}


def pack_reply(reply: Any) -> bytes:
    """The msgpack bytes of a reply map (an internal error's if it cannot be packed)."""
    try:
        return bytes(msgpack.packb(reply))
    except Exception as err:
        log.error("control reply could not be packed: %s: %s", type(err).__name__, err)
        return bytes(msgpack.packb(_internal_error(err)))


def unpack_request(body: bytes) -> object:
    """The decoded request map, or MALFORMED (decide() refuses it with an error reply)."""
    try:
        return msgpack.unpackb(body, raw=False, strict_map_key=True)
    except (ValueError, msgpack.ExtraData, msgpack.FormatError, msgpack.StackError, TypeError):
        return MALFORMED


def request(
    endpoint: str, body: dict[str, Any], security: ClientSecurity, timeout_ms: int = 5000
) -> dict[str, Any]:
    """Send one control request and return the reply (billing's side; `desanet control`)."""
    with zmq.Context() as ctx, ctx.socket(zmq.REQ) as sock:
        sock.linger = 0
        secure_client(sock, security)
        sock.connect(endpoint)
        sock.send(msgpack.packb(body))
        if not sock.poll(timeout_ms):
            raise ControlError(
                f"no reply from {endpoint} within {timeout_ms} ms (gateway down, or this "
                "client's key is not in allowed_keys)"
            )
        reply = msgpack.unpackb(sock.recv(), raw=False)
    if not isinstance(reply, dict):
        raise ControlError(f"{endpoint} sent a reply that is not a map")
    return reply


def request_many(
    endpoint: str,
    bodies: Sequence[dict[str, Any]],
    security: ClientSecurity,
    timeout_ms: int = 30_000,
) -> list[dict[str, Any]]:
    """Send many control requests at once and return their replies, in order.

    The requests are pipelined on one DEALER socket, so the gateway receives
    them together and applies them in batches (one transaction and one shaper
    apply each) instead of one round trip per change. `timeout_ms` bounds the
    wait for each next reply.
    """
    replies: list[dict[str, Any]] = []
    with zmq.Context() as ctx, ctx.socket(zmq.DEALER) as sock:
        sock.linger = 0
        sock.sndhwm = sock.rcvhwm = 0  # all of them in flight; replies are as many
        secure_client(sock, security)
        sock.connect(endpoint)
        for body in bodies:
            sock.send_multipart([b"", msgpack.packb(body)])
        while len(replies) < len(bodies):
            if not sock.poll(timeout_ms):
                raise ControlError(
                    f"{endpoint}: {len(replies)} of {len(bodies)} replies within {timeout_ms} ms "
                    "each (gateway down, or this client's key is not in allowed_keys)"
                )
            reply = msgpack.unpackb(sock.recv_multipart()[-1], raw=False)
            if not isinstance(reply, dict):
                raise ControlError(f"{endpoint} sent a reply that is not a map")
            replies.append(reply)
    return replies
