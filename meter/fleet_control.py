"""Control requests that reach the gateway over the hub (NATS request/reply), queued for its loop.

Billing behind the hub cannot connect to a gateway behind CGNAT, so the
gateway's forwarder subscribes to `desanet.control.<gateway id>` on its own
outbound connection. Each request's data is one msgpack request map, exactly
the body the ZeroMQ control endpoint takes; the reply (to the request's reply
subject) is the same reply map. Who may send: nats-server authenticates the
sender's NKEY as ZAP does a CURVE key, and only the hub's billing users may
publish to control subjects (`desanet hub init --billing`): that permission is
the control role over NATS, as `[control] allowed_keys` is on ZeroMQ.

Bounded before anything else: the subscription holds at most a few batches
(`MAX_PENDING` messages), and a request over `max_request_bytes` or beyond a
full queue is answered with an error at once, never decoded or queued. The
forwarder's event loop calls `offer()`; the service loop's thread `take()`s
a batch, answers it through the same journaled control path as a ZeroMQ
batch, and `reply()` hands each reply back to the event loop.
"""

from __future__ import annotations

import collections
import contextlib
import os
import threading
from collections.abc import Callable
from dataclasses import dataclass

import msgpack

MAX_PENDING = 1024
# nats-py's own buffer of a subscription: a flood stays in the server, not in our memory.
PENDING_BYTES = 4 << 20

Send = Callable[[int, str, bytes], None]


@dataclass(frozen=True)
class ControlRequest:
    """One request as it arrived: its bytes, where to reply, on which hub connection."""

    data: bytes
    reply_to: str
    connection: int


def refusal(error: str) -> bytes:
    """A packed error reply, as the ZeroMQ endpoint sends for a request it cannot take."""
    return bytes(msgpack.packb({"ok": False, "error": error}))


class ControlInbox:
    """The queue between the forwarder's event loop and the service loop (see the module doc)."""

    def __init__(self, max_request_bytes: int, max_pending: int = MAX_PENDING) -> None:
        self.max_request_bytes = max_request_bytes
        self.max_pending = max_pending
        self._lock = threading.Lock()
        self._queue: collections.deque[ControlRequest] = collections.deque()
        self._send: Send | None = None
        # Readable while requests wait: the service loop polls it beside its ZeroMQ socket.
        self.wake_fd = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)

    def bind(self, send: Send) -> None:
        """The forwarder's reply path: `send(connection, subject, data)`, safe from any thread."""
        self._send = send

    def offer(self, data: bytes, reply_to: str, connection: int) -> bytes | None:
        """Queue one request (event loop); returns the error reply to send at once instead."""
        if len(data) > self.max_request_bytes:
            return refusal(f"malformed: request over {self.max_request_bytes} bytes")
        with self._lock:
            if len(self._queue) >= self.max_pending:
                return refusal("busy: too many control requests waiting; send again later")
            self._queue.append(ControlRequest(data, reply_to, connection))
        os.eventfd_write(self.wake_fd, 1)
        return None

    def pending(self) -> int:
        """How many requests wait for the service loop."""
        with self._lock:
            return len(self._queue)

    def take(self, limit: int) -> list[ControlRequest]:
        """Up to `limit` waiting requests, in arrival order (service loop)."""
        with self._lock:
            batch = [self._queue.popleft() for _ in range(min(limit, len(self._queue)))]
            if not self._queue:
                # Nothing may have been signalled since the last drain.
                with contextlib.suppress(BlockingIOError):
                    os.eventfd_read(self.wake_fd)
        return batch

    def reply(self, request: ControlRequest, data: bytes) -> None:
        """Send `data` as the reply to `request` (lost with the connection it came on)."""
        if self._send is not None:
            self._send(request.connection, request.reply_to, data)

    def close(self) -> None:
        """Release the wake-up descriptor."""
        os.close(self.wake_fd)
