"""Sending Accounting-Requests over UDP until each one is answered: window, backoff, failover.

Packets are built and checked by pyrad (attribute names from the FreeRADIUS
dictionaries, the Request Authenticator, a Message-Authenticator in every
request, and for each reply the Response Authenticator and any
Message-Authenticator). This module only decides when to send what where:

- at most `window` requests are in flight, never two of one session (a
  later Interim-Update must not overtake an earlier one), and a barrier
  request (Accounting-On/Off) travels alone;
- an unanswered request is sent again after 2 s, then 4, 8, 16 s (RFC 5080
  section 2.2.1, capped at `max_timeout_s`), and after `tries_per_server`
  sends it moves to the next server; a server that failed is skipped for
  `retry_failed_s`, after which the primary is preferred again;
- nothing is ever dropped: when every server is down, requests cycle over
  them at the capped interval until one answers.
"""

from __future__ import annotations

import logging
import random
import select
import socket
import stat
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

from pyrad.dictionary import Dictionary
from pyrad.packet import AccountingRequest, AccountingResponse, AcctPacket, PacketError

from desanet.errors import ConfigError, StreamError
from desanet.meter.radius_sessions import AcctRequest

log = logging.getLogger(__name__)

MAX_PACKET = 4096
ID_SPACE = 256


@dataclass(frozen=True)
class RadiusServer:
    """One accounting server: address, UDP port and the shared secret."""

    host: str
    port: int = 1813
    secret: bytes = b""

    def __post_init__(self) -> None:
        if not self.secret:
            raise ConfigError(f"RADIUS server {self.host}:{self.port}: a secret is required")
        if not 0 < self.port < 65536:
            raise ConfigError(f"RADIUS server {self.host}: port {self.port} is not 1-65535")


def read_secret(path: Path, what: str) -> bytes:
    """A shared secret from its own file: refused when group or others may read it.

    `what` names the setting in errors ("[radius] secret_file"). A trailing newline
    is not part of the secret (editors add one).
    """
    try:
        mode = path.stat().st_mode
        if mode & 0o077:
            raise ConfigError(
                f"{what} {path}: readable by group or others (mode {stat.S_IMODE(mode):o}); "
                f"chmod 600 {path}"
            )
        secret = path.read_bytes().rstrip(b"\r\n")
    except OSError as err:
        raise ConfigError(f"{what} {path}: cannot read the secret: {err.strerror}") from err
    if len(secret) < 8:
        raise ConfigError(f"{what} {path}: the secret is under 8 bytes")
    return secret


@dataclass
class _InFlight:
    request: AcctRequest
    server: int
    packet: AcctPacket
    raw: bytes
    sends: int
    timeout_s: float
    deadline: float


class _Endpoint:
    """A connected UDP socket to one server and the packet ids in use on it."""

    def __init__(self, server: RadiusServer) -> None:
        self.server = server
        try:
            family, kind, proto, _name, address = socket.getaddrinfo(
                server.host, server.port, type=socket.SOCK_DGRAM
            )[0]
            self.sock = socket.socket(family, kind, proto)
            self.sock.setblocking(False)
            self.sock.connect(address)
        except OSError as err:
            raise ConfigError(f"RADIUS server {server.host}:{server.port}: {err}") from err
        self.next_id = random.randrange(ID_SPACE)
        self.used: set[int] = set()
        self.failed_at: float | None = None

    def allocate(self) -> int:
        for _ in range(ID_SPACE):
            ident = self.next_id
            self.next_id = (self.next_id + 1) % ID_SPACE
            if ident not in self.used:
                self.used.add(ident)
                return ident
        raise StreamError("RADIUS: all 256 packet ids in flight (window too large)")

    def close(self) -> None:
        self.sock.close()


class AccountingSender:
    """Delivers batches of AcctRequests to the primary (else secondary ...) server."""

    def __init__(
        self,
        servers: Sequence[RadiusServer],
        dictionary: Dictionary,
        timeout_s: float = 2.0,
        max_timeout_s: float = 16.0,
        tries_per_server: int = 3,
        window: int = 32,
        retry_failed_s: float = 60.0,
        wall_clock: Callable[[], float] = time.time,
    ) -> None:
        if not servers:
            raise ConfigError("RADIUS accounting needs at least one server")
        if not 1 <= window < ID_SPACE:
            raise ConfigError(f"RADIUS window {window}: must be 1-{ID_SPACE - 1}")
        self.dictionary = dictionary
        self.timeout_s = timeout_s
        self.max_timeout_s = max_timeout_s
        self.tries_per_server = tries_per_server
        self.window = window
        self.retry_failed_s = retry_failed_s
        self.wall_clock = wall_clock
        self.endpoints = [_Endpoint(s) for s in servers]
        self.sent = 0
        self.retransmitted = 0

    def local_address(self) -> str:
        """The gateway's address towards the primary server (the default NAS-IP-Address)."""
        return str(self.endpoints[0].sock.getsockname()[0])

    def close(self) -> None:
        """Close the sockets."""
        for endpoint in self.endpoints:
            endpoint.close()

    def send_all(self, requests: Sequence[AcctRequest], stop: threading.Event) -> bool:
        """Send every request until each got an Accounting-Response; False if `stop` came first."""
        queue = list(requests)
        flying: dict[tuple[int, int], _InFlight] = {}
        while queue or flying:
            if stop.is_set():
                for key in flying:
                    self.endpoints[key[0]].used.discard(key[1])
                return False
            queue = self._fill(queue, flying)
            self._receive(flying, self._wait_s(flying))
            self._expire(flying)
        return True

    def _fill(
        self, queue: list[AcctRequest], flying: dict[tuple[int, int], _InFlight]
    ) -> list[AcctRequest]:
        if any(f.request.barrier for f in flying.values()):
            return queue
        busy = {f.request.key for f in flying.values()}
        sent: set[int] = set()
        for index, request in enumerate(queue):
            if len(flying) >= self.window:
                break
            if request.barrier:
                if not flying and index == 0:
                    self._launch(request, self._choose(), flying)
                    sent.add(index)
                break
            if request.key in busy:
                continue
            # Later requests of the same session wait for this one: `busy` holds it either way.
            busy.add(request.key)
            self._launch(request, self._choose(), flying)
            sent.add(index)
        return [r for i, r in enumerate(queue) if i not in sent] if sent else queue

    def _choose(self) -> int:
        now = time.monotonic()
        for index, endpoint in enumerate(self.endpoints):
            if endpoint.failed_at is None or now - endpoint.failed_at >= self.retry_failed_s:
                return index
        # Every server failed recently: the one that failed longest ago.
        return min(range(len(self.endpoints)), key=lambda i: self.endpoints[i].failed_at or 0.0)

    def _launch(
        self,
        request: AcctRequest,
        server: int,
        flying: dict[tuple[int, int], _InFlight],
        timeout_s: float | None = None,
    ) -> None:
        endpoint = self.endpoints[server]
        ident = endpoint.allocate()
        packet = AcctPacket(
            code=AccountingRequest,
            id=ident,
            secret=endpoint.server.secret,
            dict=self.dictionary,
        )
        for name, value in request.attributes.items():
            packet.AddAttribute(name, value)
        # A new Acct-Delay-Time needs a new packet id (RFC 2866 5.2): set once per id.
        delay = max(0, int(self.wall_clock()) - request.event_s)
        packet.AddAttribute("Acct-Delay-Time", min(delay, 0xFFFFFFFF))
        packet.add_message_authenticator()
        raw = packet.RequestPacket()
        timeout = self.timeout_s if timeout_s is None else timeout_s
        entry = _InFlight(request, server, packet, raw, 0, timeout, 0.0)
        flying[(server, ident)] = entry
        self._transmit(entry)

    def _transmit(self, entry: _InFlight) -> None:
        endpoint = self.endpoints[entry.server]
        entry.sends += 1
        # Jitter of +-10 % keeps many gateways from retrying in step (RFC 5080 2.2.1).
        entry.deadline = time.monotonic() + entry.timeout_s * random.uniform(0.9, 1.1)
        self.sent += 1
        if entry.sends > 1:
            self.retransmitted += 1
        try:
            endpoint.sock.send(entry.raw)
        except OSError as err:
            # A refused or unreachable server looks like no answer: retried on the timer.
            log.debug("RADIUS %s: send failed: %s", endpoint.server.host, err)

    def _wait_s(self, flying: dict[tuple[int, int], _InFlight]) -> float:
        if not flying:
            return 0.0
        return max(0.0, min(f.deadline for f in flying.values()) - time.monotonic())

    def _receive(self, flying: dict[tuple[int, int], _InFlight], wait_s: float) -> None:
        socks = [e.sock for e in self.endpoints]
        readable, _, _ = select.select(socks, [], [], wait_s)
        for sock in readable:
            server = socks.index(sock)
            while True:
                try:
                    data = sock.recv(MAX_PACKET)
                except (BlockingIOError, InterruptedError):
                    break
                except OSError as err:
                    log.debug("RADIUS %s: %s", self.endpoints[server].server.host, err)
                    break
                self._answer(server, data, flying)

    def _answer(self, server: int, data: bytes, flying: dict[tuple[int, int], _InFlight]) -> None:
        endpoint = self.endpoints[server]
        if len(data) < 20:
            return
        entry = flying.get((server, data[1]))
        if entry is None:
            return  # an answer to a retransmission already answered
        try:
            reply = entry.packet.CreateReply(packet=data)
        except PacketError as err:
            log.warning("RADIUS %s: undecodable reply dropped: %s", endpoint.server.host, err)
            return
        if reply.code != AccountingResponse or not entry.packet.VerifyReply(reply, data):
            log.warning(
                "RADIUS %s: reply with a wrong authenticator dropped (shared secret differs?)",
                endpoint.server.host,
            )
            return
        del flying[(server, data[1])]
        endpoint.used.discard(data[1])
        endpoint.failed_at = None

    def _expire(self, flying: dict[tuple[int, int], _InFlight]) -> None:
        now = time.monotonic()
        for key, entry in list(flying.items()):
            if entry.deadline > now:
                continue
            timeout = min(entry.timeout_s * 2, self.max_timeout_s)
            if entry.sends < self.tries_per_server:
                entry.timeout_s = timeout
                self._transmit(entry)
                continue
            endpoint = self.endpoints[key[0]]
            if endpoint.failed_at is None:
                log.warning(
                    "RADIUS %s:%d does not answer (%d sends): trying the next server",
                    endpoint.server.host,
                    endpoint.server.port,
                    entry.sends,
                )
            endpoint.failed_at = now
            del flying[key]
            endpoint.used.discard(key[1])
            self._launch(entry.request, self._choose(), flying, timeout)
