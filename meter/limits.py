"""Limits that hold before authentication on the usage and replay endpoints.

libzmq reads a peer's bytes before CURVE and ZAP decide who the peer is, so a
stranger must not be able to make the gateway allocate or hold much:

- `max_message_bytes` (ZMQ_MAXMSGSIZE): the largest frame accepted, handshake
  commands included; a bigger one drops the connection when its header
  arrives, before any of its body is read;
- `handshake_ms`: a connection that has not finished its handshake by then is
  dropped (an idle TCP connection holds a descriptor for at most that long);
- `receive_hwm`, `send_hwm`: queue depth per peer, in messages;
- `max_connections`: TCP connections accepted beyond this are shut down at
  once by a `ConnectionLimiter`, so a flood of connections (1,100 idle ones
  exhausted the default 1,024 descriptors) cannot use up the process's
  descriptors: the service keeps its files, and clients already connected
  keep their connections.

What authenticated peers can do is bounded by who holds an allowed key: one
may, for instance, send a multipart message that never ends, which libzmq
buffers whole (its queue limits count complete messages).
"""

from __future__ import annotations

import logging
import socket
import time
from dataclasses import dataclass

import zmq
from zmq.utils.monitor import recv_monitor_message

log = logging.getLogger(__name__)

_RECONCILE_S = 5.0
_LOG_EVERY_S = 60.0


@dataclass(frozen=True)
class EndpointLimits:
    """What one endpoint accepts from each peer, and how many peers."""

    max_message_bytes: int
    max_connections: int = 64
    receive_hwm: int = 16
    send_hwm: int = 1000
    handshake_ms: int = 10_000


def apply_limits(sock: zmq.Socket[bytes], limits: EndpointLimits) -> None:
    """Set `limits` on `sock`; call before bind, they apply to connections made after."""
    sock.maxmsgsize = limits.max_message_bytes
    sock.rcvhwm = limits.receive_hwm
    sock.sndhwm = limits.send_hwm
    sock.handshake_ivl = limits.handshake_ms


def bound_port(endpoint: str) -> int | None:
    """The TCP port of a bound endpoint (`tcp://host:port`, IPv6 in brackets); None for ipc."""
    if not endpoint.startswith("tcp://"):
        return None
    _host, _sep, port = endpoint.rpartition(":")
    return int(port) if port.isdigit() else None


def _accepted_on(fd: int, port: int, shutdown: bool) -> bool:
    """True if `fd` is a TCP connection accepted on `port`; it is shut down when asked.

    libzmq owns the descriptor and may have closed it, and the number may since
    name something else (a file, a listener, a connection the gateway made):
    only an accepted TCP connection on the endpoint's own port is touched.
    """
    try:
        sock = socket.socket(fileno=fd)
    except OSError:
        return False  # closed meanwhile, and the number names no socket now
    try:
        if sock.type != socket.SOCK_STREAM or sock.family not in (socket.AF_INET, socket.AF_INET6):
            return False
        if sock.getsockopt(socket.SOL_SOCKET, socket.SO_ACCEPTCONN):
            return False
        if sock.getsockname()[1] != port:
            return False
        if shutdown:
            sock.shutdown(socket.SHUT_RDWR)
        return True
    except OSError:
        return False  # the connection closed while it was looked at
    finally:
        sock.detach()  # the descriptor stays libzmq's


class ConnectionLimiter:
    """Counts one TCP endpoint's connections and shuts down those beyond `max_connections`.

    libzmq has no connection limit, but its monitor reports each accepted
    connection with its descriptor; the connection that goes over the limit is
    shut down, libzmq sees it end and releases it. `handle()` runs in the
    thread that polls `monitor`.
    """

    def __init__(self, sock: zmq.Socket[bytes], name: str, max_connections: int) -> None:
        self.name = name
        self.max_connections = max_connections
        self.monitor: zmq.Socket[bytes] = sock.get_monitor_socket(
            zmq.EVENT_ACCEPTED | zmq.EVENT_DISCONNECTED
        )
        self.port: int | None = None
        self.accepted = 0
        self.refused = 0
        self._open: set[int] = set()
        self._reconciled = time.monotonic()
        self._logged = 0.0
        self._unlogged = 0

    @property
    def connections(self) -> int:
        """Connections open now (as far as the monitor has told)."""
        return len(self._open)

    def bound(self, endpoint: str) -> None:
        """The endpoint was bound (LAST_ENDPOINT): only its TCP port is limited."""
        self.port = bound_port(endpoint)

    def handle(self) -> None:
        """Take every pending monitor event; refuse connections beyond the limit."""
        while True:
            try:
                event = recv_monitor_message(self.monitor, zmq.NOBLOCK)
            except zmq.Again:
                break
            fd = int(event["value"])
            if event["event"] == zmq.EVENT_DISCONNECTED:
                self._open.discard(fd)
                continue
            self.accepted += 1
            self._open.add(fd)
            if self.port is not None and len(self._open) > self.max_connections:
                self._open.discard(fd)
                if _accepted_on(fd, self.port, shutdown=True):
                    self.refused += 1
                    self._complain()
        self._reconcile()

    def _reconcile(self) -> None:
        # A lost event must not leave a closed connection counted against the limit forever.
        now = time.monotonic()
        if self.port is None or now - self._reconciled < _RECONCILE_S:
            return
        self._reconciled = now
        port = self.port
        self._open = {fd for fd in self._open if _accepted_on(fd, port, shutdown=False)}

    def _complain(self) -> None:
        now = time.monotonic()
        if now - self._logged < _LOG_EVERY_S:
            self._unlogged += 1
            return
        extra = f" (and {self._unlogged} more since the last report)" if self._unlogged else ""
        log.warning(
            "%s endpoint: refused a connection, %d are open (limit %d)%s",
            self.name,
            len(self._open),
            self.max_connections,
            extra,
        )
        self._logged, self._unlogged = now, 0

    def close(self) -> None:
        """Close the monitor socket, in the thread that polled it.

        Call it only after the watched socket's `disable_monitor()` (or close):
        libzmq blocks on a monitor event that has no reader.
        """
        self.monitor.close(0)
