"""The control endpoint: the ZeroMQ socket billing sends requests to, and billing's client.

The gateway side answers from the service loop's thread, so requests and
polls never race on the control state; what a request means is decided in
`desanet.gateway.control_requests`.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
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

log = logging.getLogger(__name__)

MAX_REQUEST_BYTES = 4096


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
        # libzmq drops a peer sending a bigger frame before it reaches Python.
        self.sock.maxmsgsize = MAX_REQUEST_BYTES
        try:
            secure_server(self.sock, security, endpoint)
            self.sock.bind(endpoint)
        except zmq.ZMQError as err:
            self.close()
            raise ControlError(f"cannot bind the control endpoint {endpoint}: {err}") from err
        self.endpoint = self.sock.getsockopt_string(zmq.LAST_ENDPOINT)

    def wait(self, timeout_ms: int) -> bool:
        """Wait up to `timeout_ms` for a request; True when one is waiting."""
        return bool(self.sock.poll(timeout_ms))

    def serve_pending(self, handler: Callable[[object], dict[str, Any]]) -> int:
        """Answer every request waiting on the socket; returns how many were answered.

        The boundary of every request: whatever goes wrong while handling one
        (the handler, or packing its reply) becomes an error reply and one log
        line; the next request is served as usual.
        """
        served = 0
        while True:
            try:
                frames = self.sock.recv_multipart(zmq.NOBLOCK)
            except zmq.Again:
                return served
            # REQ peers send [identity, "", body], DEALER peers [identity, body].
            envelope, body = frames[:-1], frames[-1]
            try:
                if len(frames) not in (2, 3) or (len(frames) == 3 and frames[1] != b""):
                    reply: dict[str, Any] = {
                        "ok": False,
                        "error": "malformed: one body frame expected",
                    }
                else:
                    reply = handler(_unpack(body))
                data = msgpack.packb(reply)
            except Exception as err:
                log.error(
                    "control request failed inside the gateway: %s: %s", type(err).__name__, err
                )
                data = msgpack.packb(
                    {"ok": False, "error": f"internal error ({type(err).__name__}); see the log"}
                )
            self.sock.send_multipart([*envelope, data])
            served += 1

    def close(self) -> None:
        """Close the socket and stop the authenticator."""
        self.sock.close(linger=0)
        if self.auth is not None:
            self.auth.stop()
        self.ctx.term()


def _unpack(body: bytes) -> object:
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
