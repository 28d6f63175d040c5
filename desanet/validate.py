"""The rules for names and addresses that several parts of desanet accept: one definition each.

Gateway ids appear in NATS subjects, bpffs paths and RADIUS NAS-Identifier, so
they are DNS-label-like: lowercase letters, digits and '-'. Subscriber ids
appear in usage messages and as RADIUS User-Name. Endpoints are ZeroMQ's
`tcp://host:port` (IPv6 in brackets) or `ipc://path`.
"""

from __future__ import annotations

import ipaddress
import re
from dataclasses import dataclass

from desanet.errors import ValidationError

GATEWAY_ID_RE = re.compile(r"^[a-z0-9][a-z0-9-]{0,62}$")
SUBSCRIBER_ID_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")
IFNAME_RE = re.compile(r"^[A-Za-z0-9._-]{1,15}$")
_HOSTNAME_RE = re.compile(r"^[A-Za-z0-9*]([A-Za-z0-9.*-]{0,252})$")
_HOST_PORT_RE = re.compile(
    r"^(\[(?P<v6>[0-9A-Fa-f:.%a-zA-Z0-9]+)\]|(?P<host>[^\s:\[\]]+)):(?P<port>[0-9]{1,5}|\*)$"
)


def check_gateway_id(text: str) -> str:
    """`text` if it is a valid gateway id (1-63 of a-z, 0-9, '-', not starting with '-')."""
    if not isinstance(text, str) or not GATEWAY_ID_RE.match(text):
        raise ValidationError(
            f"{text!r}: a gateway id is lowercase letters, digits and '-' (at most 63, "
            "starting with a letter or digit)"
        )
    return text


def check_subscriber_id(text: str) -> str:
    """`text` if it is a valid subscriber id (1-64 of letters, digits, '_', '.', '-')."""
    if not isinstance(text, str) or not SUBSCRIBER_ID_RE.match(text):
        raise ValidationError(
            f"{text!r}: a subscriber id is letters, digits, '_', '.' or '-' "
            "(at most 64, starting with a letter or digit)"
        )
    return text


def check_ifname(text: str) -> str:
    """`text` if it can be a Linux interface name (1-15 of letters, digits, '.', '_', '-')."""
    if not isinstance(text, str) or not IFNAME_RE.match(text):
        raise ValidationError(
            f"{text!r} is not an interface name (1 to 15 of letters, digits, '.', '_', '-')"
        )
    return text


@dataclass(frozen=True)
class HostPort:
    """A host (name, IPv4 or IPv6 address without brackets) and a TCP port."""

    host: str
    port: int

    def __str__(self) -> str:
        return f"[{self.host}]:{self.port}" if ":" in self.host else f"{self.host}:{self.port}"

    @property
    def is_loopback(self) -> bool:
        """True when only this machine can reach the address."""
        if self.host == "localhost":
            return True
        try:
            return ipaddress.ip_address(self.host).is_loopback
        except ValueError:
            return False


def parse_host_port(text: str, any_port: bool = False) -> HostPort:
    """Parse `host:port` or `[v6]:port`; the port must be 1-65535.

    With `any_port`, ZeroMQ's `*` (a port the kernel picks, at bind) is port 0.
    """
    match = _HOST_PORT_RE.match(text) if isinstance(text, str) else None
    if not match or (match.group("port") == "*" and not any_port):
        raise ValidationError(f"{text!r}: use host:port, e.g. 127.0.0.1:7570 or [::1]:7570")
    port = 0 if match.group("port") == "*" else int(match.group("port"))
    if not 1 <= port <= 65535 and match.group("port") != "*":
        raise ValidationError(f"{text!r}: port {port} is not in 1-65535")
    v6 = match.group("v6")
    if v6 is not None:
        try:
            ipaddress.IPv6Address(v6.split("%", 1)[0])
        except ValueError:
            raise ValidationError(f"{text!r}: {v6!r} is not an IPv6 address") from None
        return HostPort(v6, port)
    host = match.group("host")
    if not _HOSTNAME_RE.match(host):
        raise ValidationError(f"{text!r}: {host!r} is not a host name or address")
    return HostPort(host, port)


def check_endpoint(text: str) -> str:
    """`text` if it is a ZeroMQ endpoint desanet binds or connects: tcp://host:port or ipc://path."""
    if isinstance(text, str) and text.startswith("ipc://") and len(text) > len("ipc://"):
        if any(c.isspace() for c in text):
            raise ValidationError(f"{text!r}: an ipc path has no white space")
        return text
    if isinstance(text, str) and text.startswith("tcp://"):
        parse_host_port(text[len("tcp://") :], any_port=True)
        return text
    raise ValidationError(f"{text!r}: use tcp://host:port, tcp://[v6]:port or ipc://path")


def is_loopback(endpoint: str) -> bool:
    """True when an endpoint cannot be reached from another machine (loopback, ipc, inproc)."""
    if endpoint.startswith(("ipc://", "inproc://")):
        return True
    if not endpoint.startswith("tcp://"):
        return False
    try:
        return parse_host_port(endpoint[len("tcp://") :], any_port=True).is_loopback
    except ValidationError:
        return False
