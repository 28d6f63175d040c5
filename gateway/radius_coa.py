"""RADIUS dynamic authorization (RFC 5176): Disconnect-Request and CoA-Request from billing.

Each request becomes the same request map the control endpoint takes and is
answered by the injected `handle(request_map) -> reply_map`, so a cut-off or
a rate change from FreeRADIUS goes through the one journaled control path:

- Disconnect-Request -> {"op": "suspend", "sub": ...} (the [control] suspend
  mode, or `disconnect_mode`);
- CoA-Request with Mikrotik-Rate-Limit ("rx/tx", seen from the router: rx is
  what the router receives, the subscriber's upload; tx its download) or
  WISPr-Bandwidth-Max-Down/Up (bit/s) -> {"op": "plan", ...}; rates the
  request leaves out keep the subscriber's current ones (a "show" first).

The subscriber is named by User-Name, Acct-Session-Id or Framed-IP-Address,
through the injected `resolve`. Before any parsing a datagram must come from
a configured client, be at most 4096 bytes and fit the client's rate; then
its Request Authenticator and a Message-Authenticator (required: the
BlastRADIUS countermeasure) are verified with the client's secret. Anything
failing those checks is dropped without an answer (RFC 5176 section 3.5:
silently discarded). A valid request gets an ACK, or a NAK with Error-Cause
and Reply-Message. `serve_pending()` runs in the caller's thread, like the
control endpoint, so requests never race the service loop.
"""

from __future__ import annotations

import ipaddress
import logging
import re
import select
import socket
import time
from collections import OrderedDict
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from pyrad.dictionary import Dictionary
from pyrad.packet import (
    CoAACK,
    CoANAK,
    CoAPacket,
    CoARequest,
    DisconnectACK,
    DisconnectNAK,
    DisconnectRequest,
    PacketError,
)

from desanet.errors import ConfigError, ControlError

log = logging.getLogger(__name__)

MAX_PACKET = 4096  # RFC 2865 section 3: the largest RADIUS packet
DUPLICATE_WINDOW_S = 30.0  # a retransmission gets the cached answer (RFC 5080 2.2.2)
IDENTIFIERS = ("User-Name", "Acct-Session-Id", "Framed-IP-Address")
RATE_ATTRIBUTES = ("Mikrotik-Rate-Limit", "WISPr-Bandwidth-Max-Down", "WISPr-Bandwidth-Max-Up")
# Attributes a request may carry besides identifiers and rates; others get Unsupported-Attribute.
ACCEPTED = frozenset(
    {
        *IDENTIFIERS,
        *RATE_ATTRIBUTES,
        "NAS-Identifier",
        "NAS-IP-Address",
        "NAS-IPv6-Address",
        "Event-Timestamp",
        "Message-Authenticator",
        "Proxy-State",
        "Calling-Station-Id",
    }
)

Handle = Callable[[dict[str, Any]], dict[str, Any]]


@dataclass(frozen=True)
class Selector:
    """How a request names its subscriber; any of the three may be empty."""

    user_name: str = ""
    session_id: str = ""
    framed_ip: str = ""


Resolve = Callable[[Selector], str | None]


@dataclass(frozen=True)
class CoaClient:
    """A billing server allowed to send requests: its address (or prefix) and secret."""

    address: str
    secret: bytes
    rate_per_s: float = 10.0
    burst: int = 20

    def __post_init__(self) -> None:
        try:
            ipaddress.ip_network(self.address, strict=False)
        except ValueError as err:
            raise ConfigError(f"[radius] coa client {self.address!r}: not an address") from err
        if len(self.secret) < 8:
            raise ConfigError(f"[radius] coa client {self.address}: secret under 8 bytes")


@dataclass(frozen=True)
class CoaConfig:
    """Where to listen ([radius] coa_listen, UDP 3799) and who may send."""

    clients: tuple[CoaClient, ...]
    host: str = "0.0.0.0"
    port: int = 3799
    gateway_id: str = ""  # a request naming another NAS-Identifier is refused
    disconnect_mode: str | None = None  # None: the [control] suspend mode


@dataclass
class _Bucket:
    tokens: float
    stamp: float = field(default_factory=time.monotonic)

    def take(self, rate: float, burst: int) -> bool:
        now = time.monotonic()
        self.tokens = min(float(burst), self.tokens + (now - self.stamp) * rate)
        self.stamp = now
        if self.tokens < 1.0:
            return False
        self.tokens -= 1.0
        return True


class Refusal(ControlError):
    """A request that gets a NAK: `cause` is its Error-Cause value name."""

    def __init__(self, cause: str, message: str) -> None:
        super().__init__(message)
        self.cause = cause


_RATE = re.compile(r"^([0-9]+(?:\.[0-9]+)?)([kKmMgG]?)$")
_SCALE = {"": 1, "k": 1_000, "m": 1_000_000, "g": 1_000_000_000}


def parse_mikrotik_rate(text: str) -> dict[str, int]:
    """Plan fields from a Mikrotik-Rate-Limit string, e.g. "2M/10M 0/0 0/0 0/0 8 256k/1M".

    The first pair is rx/tx max, the sixth rx/tx min (limit-at); rx is the
    router's receive side (the subscriber's upload), tx its transmit side.
    """
    fields = text.split()
    if not fields:
        raise Refusal("Invalid-Attribute-Value", "Mikrotik-Rate-Limit is empty")
    out: dict[str, int] = {}
    for index, (up_key, down_key) in ((0, ("up_max", "down_max")), (5, ("up_min", "down_min"))):
        if index >= len(fields):
            continue
        pair = fields[index].split("/")
        if len(pair) > 2:
            raise Refusal("Invalid-Attribute-Value", f"Mikrotik-Rate-Limit {text!r}: bad {pair}")
        rx = _mikrotik_bps(pair[0], text)
        tx = _mikrotik_bps(pair[1], text) if len(pair) == 2 else rx
        if rx:
            out[up_key] = rx
        if tx:
            out[down_key] = tx
    return out


def _mikrotik_bps(value: str, text: str) -> int:
    match = _RATE.match(value)
    if not match:
        raise Refusal("Invalid-Attribute-Value", f"Mikrotik-Rate-Limit {text!r}: {value!r}")
    return round(float(match.group(1)) * _SCALE[match.group(2).lower()])


class DynamicAuthServer:
    """The UDP listener of RFC 5176 requests; answer them with `serve_pending()`."""

    def __init__(
        self, config: CoaConfig, handle: Handle, resolve: Resolve, dictionary: Dictionary
    ) -> None:
        if not config.clients:
            raise ConfigError("[radius] coa: no client may send requests (add coa_clients)")
        self.config = config
        self.handle = handle
        self.resolve = resolve
        self.dictionary = dictionary
        self._clients = [(ipaddress.ip_network(c.address, strict=False), c) for c in config.clients]
        self._buckets: dict[str, _Bucket] = {}
        self._recent: OrderedDict[tuple[str, int, int, bytes], tuple[float, bytes]] = OrderedDict()
        self.dropped = 0
        family = socket.AF_INET6 if ":" in config.host else socket.AF_INET
        self.sock = socket.socket(family, socket.SOCK_DGRAM)
        self.sock.setblocking(False)
        try:
            self.sock.bind((config.host, config.port))
        except OSError as err:
            self.sock.close()
            raise ConfigError(
                f"cannot listen for CoA on {config.host}:{config.port}: {err.strerror}"
            ) from err
        self.port = int(self.sock.getsockname()[1])

    def close(self) -> None:
        """Stop listening."""
        self.sock.close()

    def serve_pending(self, timeout_s: float = 0.0) -> int:
        """Answer every datagram waiting (waiting up to `timeout_s` for one); returns answers."""
        answered = 0
        readable, _, _ = select.select([self.sock], [], [], timeout_s)
        while readable:
            try:
                data, peer = self.sock.recvfrom(MAX_PACKET + 1)
            except (BlockingIOError, InterruptedError):
                break
            reply = self._datagram(data, peer[0], int(peer[1]))
            if reply is None:
                self.dropped += 1
                continue
            self.sock.sendto(reply, peer)
            answered += 1
        return answered

    def _client(self, address: str) -> CoaClient | None:
        ip = ipaddress.ip_address(address.split("%")[0])
        if ip.version == 6 and ip.ipv4_mapped is not None:
            ip = ip.ipv4_mapped
        return next((c for net, c in self._clients if ip in net), None)

    def _datagram(self, data: bytes, address: str, port: int) -> bytes | None:
        # Every check before authentication is cheap: size, source, rate.
        if len(data) > MAX_PACKET or len(data) < 20:
            return None
        client = self._client(address)
        if client is None:
            log.debug("CoA from %s: not a configured client, dropped", address)
            return None
        bucket = self._buckets.setdefault(client.address, _Bucket(float(client.burst)))
        if not bucket.take(client.rate_per_s, client.burst):
            log.warning("CoA from %s: over %s requests/s, dropped", address, client.rate_per_s)
            return None
        key = (address, port, data[1], data[4:20])
        cached = self._recent.get(key)
        if cached is not None and time.monotonic() - cached[0] < DUPLICATE_WINDOW_S:
            return cached[1]
        try:
            request = CoAPacket(secret=client.secret, dict=self.dictionary, packet=data)
        except (PacketError, ValueError, KeyError, IndexError) as err:
            log.warning("CoA from %s: undecodable (%s), dropped", address, err)
            return None
        if request.code not in (CoARequest, DisconnectRequest):
            return None
        if not request.VerifyCoARequest():
            log.warning("CoA from %s: wrong Request Authenticator (secret?), dropped", address)
            return None
        if not request.message_authenticator or not request.verify_message_authenticator():
            log.warning("CoA from %s: no valid Message-Authenticator, dropped", address)
            return None
        reply = self._answer(request)
        self._remember(key, reply)
        return reply

    def _remember(self, key: tuple[str, int, int, bytes], reply: bytes) -> None:
        now = time.monotonic()
        self._recent[key] = (now, reply)
        while self._recent:
            oldest = next(iter(self._recent.values()))
            if now - oldest[0] < DUPLICATE_WINDOW_S and len(self._recent) <= 1024:
                break
            self._recent.popitem(last=False)

    def _answer(self, request: CoAPacket) -> bytes:
        disconnect = request.code == DisconnectRequest
        reply = request.CreateReply()
        try:
            sub = self._subscriber(request)
            outcome = self._apply(request, sub, disconnect)
        except Refusal as err:
            log.info("CoA refused: %s", err)
            reply.code = DisconnectNAK if disconnect else CoANAK
            reply["Error-Cause"] = err.cause
            reply["Reply-Message"] = str(err)[:253]
        else:
            reply.code = DisconnectACK if disconnect else CoAACK
            log.info("CoA: subscriber %s now %s", sub, outcome.get("state", "changed"))
        reply.add_message_authenticator()
        return bytes(reply.ReplyPacket())

    def _subscriber(self, request: CoAPacket) -> str:
        # pyrad's keys() gives dictionary names (iterating the packet gives raw codes).
        names = request.keys()
        unknown = sorted(str(k) for k in names if str(k) not in ACCEPTED)
        if unknown:
            raise Refusal("Unsupported-Attribute", f"unsupported attributes: {', '.join(unknown)}")
        nas_id = _first(request, "NAS-Identifier")
        if nas_id and self.config.gateway_id and nas_id != self.config.gateway_id:
            raise Refusal(
                "NAS-Identification-Mismatch",
                f"NAS-Identifier {nas_id!r}: this gateway is {self.config.gateway_id!r}",
            )
        selector = Selector(
            _first(request, "User-Name"),
            _first(request, "Acct-Session-Id"),
            _first(request, "Framed-IP-Address"),
        )
        if not (selector.user_name or selector.session_id or selector.framed_ip):
            raise Refusal(
                "Missing-Attribute",
                "name the subscriber: User-Name, Acct-Session-Id or Framed-IP-Address",
            )
        sub = self.resolve(selector)
        if sub is None:
            raise Refusal("Session-Context-Not-Found", f"no subscriber matches {selector}")
        return sub

    def _apply(self, request: CoAPacket, sub: str, disconnect: bool) -> dict[str, Any]:
        if disconnect:
            body: dict[str, Any] = {"op": "suspend", "sub": sub}
            if self.config.disconnect_mode:
                body["mode"] = self.config.disconnect_mode
            return self._call(body, "Session-Context-Not-Removable")
        rates = _rates(request)
        if not rates:
            raise Refusal(
                "Unsupported-Service",
                "a CoA-Request needs Mikrotik-Rate-Limit or WISPr-Bandwidth-Max-Down/Up",
            )
        current = self._call({"op": "show", "sub": sub}, "Session-Context-Not-Found")
        plan = current.get("plan") or {}
        body = {"op": "plan", "sub": sub}
        for key in ("down_max", "up_max", "down_min", "up_min"):
            value = rates.get(key, plan.get(f"{key}_bps"))
            if not isinstance(value, int):
                raise Refusal("Missing-Attribute", f"no {key} rate for subscriber {sub}")
            body[key] = value
        # A lower maximum pulls the guaranteed rate down with it.
        body["down_min"] = min(body["down_min"], body["down_max"])
        body["up_min"] = min(body["up_min"], body["up_max"])
        return self._call(body, "Invalid-Attribute-Value")

    def _call(self, body: dict[str, Any], cause: str) -> dict[str, Any]:
        reply = self.handle(body)
        if not reply.get("ok"):
            raise Refusal(cause, str(reply.get("error", "refused")))
        return reply


def _first(request: CoAPacket, name: str) -> str:
    values: Sequence[Any] = request.get(name) or []
    return str(values[0]) if values else ""


def _rates(request: CoAPacket) -> dict[str, int]:
    rates: dict[str, int] = {}
    mikrotik = _first(request, "Mikrotik-Rate-Limit")
    if mikrotik:
        rates.update(parse_mikrotik_rate(mikrotik))
    wispr = (("WISPr-Bandwidth-Max-Down", "down_max"), ("WISPr-Bandwidth-Max-Up", "up_max"))
    for name, key in wispr:
        value = request.get(name)
        if value:
            rates[key] = int(value[0])
    return rates


def resolver(
    user_names: Mapping[str, str],
    addresses: Mapping[str, str],
    session_owner: Callable[[str], str | None] = lambda session_id: None,
) -> Resolve:
    """A `resolve` from RADIUS user name -> subscriber, address -> subscriber, and open sessions.

    When a request names the subscriber more than once, every name must agree.
    """

    def resolve(selector: Selector) -> str | None:
        found = set()
        for value, lookup in (
            (selector.user_name, user_names.get),
            (selector.session_id, session_owner),
            (selector.framed_ip, addresses.get),
        ):
            if value:
                sub = lookup(value)
                if sub is None:
                    return None
                found.add(sub)
        return found.pop() if len(found) == 1 else None

    return resolve
