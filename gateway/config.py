# Over 400 lines: every section's checks stand beside the schema, so a field's rule and its error
# message are found together.
"""The gateway configuration file (TOML): parsed, checked and turned into typed settings.

Every error is a `ConfigError` naming the file, the line and the field, so an
operator can fix it without reading code ("gateway.toml:7: [link] down: rate
'20mbps' ..."). Nothing here touches the kernel.
"""

from __future__ import annotations

import ipaddress
import re
import socket
import tomllib
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

from desanet.errors import ConfigError, ValidationError
from desanet.shaper.leaf import LEAF_KINDS
from desanet.units import parse_duration_ms, parse_rate_bps
from desanet.validate import (
    check_endpoint,
    check_gateway_id,
    check_ifname,
    is_loopback,
    parse_host_port,
)

# What a suspended subscriber gets: a walled rate, or nothing (dropped in the datapath).
SUSPEND_MODES = ("wall", "block")
DELIVERED_READS = ("moved", "dump")
UNPROVISIONED_POLICIES = ("block", "wall", "allow")

T = TypeVar("T")
UTF8_BOM = b"\xef\xbb\xbf"


@dataclass(frozen=True)
class LinkConfig:
    """Capacity of the shared uplink in each direction."""

    down_bps: int
    up_bps: int


@dataclass(frozen=True)
class AdaptConfig:
    """`[link] adapt = true`: the shaped link rate follows the capacity within these bounds."""

    down_min_bps: int
    down_max_bps: int
    up_min_bps: int
    up_max_bps: int


@dataclass(frozen=True)
class LatencyConfig:
    """`[latency]`: passive RTT tracking in the datapath and the window status shows."""

    track: bool = True
    window_ms: int = 60_000


@dataclass(frozen=True)
class ShapingConfig:
    """Leaf qdisc wanted under every subscriber class and the path RTT the AQM is tuned for."""

    leaf: str
    rtt_ms: float
    headroom: float


@dataclass(frozen=True)
class PublishConfig:
    """Usage stream endpoints and their CURVE keys (plaintext only when asked, loopback only)."""

    usage: str
    replay: str
    secret_key: Path | None
    allowed_keys: Path | None
    plaintext: bool


@dataclass(frozen=True)
class ControlConfig:
    """The control endpoint, who may use it, and what suspension and fair use mean.

    `allowed_keys` are the client keys that may change things; the usage
    stream's `[publish] allowed_keys` may only read. None: nobody may (CURVE)
    or anyone on this machine may (plaintext, loopback only).
    """

    endpoint: str
    suspend: str
    wall_down_bps: int
    wall_up_bps: int
    fair_use_down_bps: int
    fair_use_up_bps: int
    allowed_keys: Path | None = None


@dataclass(frozen=True)
class FleetConfig:
    """The district hub the gateway forwards its journal to (docs/fleet.md)."""

    servers: tuple[str, ...]
    credentials: Path
    ca: Path | None = None
    window: int = 1024
    # Serve control requests from the hub's billing users on desanet.control.<id>.
    control: bool = True
    # The journal keeps this long (compacted past an hour) what the hub has not acknowledged.
    retention_ms: float = 7 * 86_400_000.0


@dataclass(frozen=True)
class CoaClientConfig:
    """A billing server allowed to send Disconnect/CoA requests, and its secret's file."""

    address: str  # an address or a prefix
    secret_file: Path


@dataclass(frozen=True)
class RadiusConfig:
    """RADIUS accounting servers and the dynamic authorization listener (docs/radius.md).

    The secrets stay in their files (mode 0600) until the service reads them.
    """

    servers: tuple[tuple[str, int], ...]  # primary first
    secret_file: Path
    interim_ms: int = 300_000
    nas_ip: str = ""  # empty: the gateway's address towards the primary server
    coa_listen: tuple[str, int] | None = None  # None: no dynamic authorization
    coa_clients: tuple[CoaClientConfig, ...] = ()
    disconnect: str | None = None  # None: the [control] suspend mode


@dataclass(frozen=True)
class PolicyConfig:
    """What happens to forwarded traffic of addresses and MACs no subscriber owns.

    block: dropped in the datapath; wall: carried in one shared class at the
    wall rates; allow: carried in that class, bounded to `allow_share` of the
    link. Traffic with the gateway itself (DHCP, DNS, the console) always works.
    """

    unprovisioned: str = "block"
    wall_down_bps: int = 256_000
    wall_up_bps: int = 128_000
    allow_share: float = 0.1


@dataclass(frozen=True)
class Config:
    """Everything `desanet run` needs, checked."""

    path: Path
    gateway_id: str
    lan: str
    state_dir: Path
    capacity: int
    link: LinkConfig
    shaping: ShapingConfig
    interval_ms: int
    publish: PublishConfig
    control: ControlConfig
    metrics_listen: tuple[str, int] | None
    subscribers_file: Path
    policy: PolicyConfig = PolicyConfig()
    # A changed subscribers file is applied once unchanged for this long (see reload).
    settle_ms: int = 2_000
    # A subscriber gone from the file keeps its slot and control state this long.
    grace_ms: int = 7 * 86_400_000
    # How each tick reads what the leaves delivered: "moved" (only the leaves that can have
    # moved, by handle) or "dump" (every leaf, the way before; benchmarks compare the two).
    delivered_read: str = "moved"
    fleet: FleetConfig | None = None  # absent: no forwarding, the local endpoints only
    radius: RadiusConfig | None = None  # absent: no RADIUS accounting or CoA
    latency: LatencyConfig = LatencyConfig()
    adapt: AdaptConfig | None = None  # absent: the link rate is fixed


_SCHEMA: dict[str, tuple[set[str], set[str]]] = {
    # section: (required keys, optional keys)
    "gateway": ({"id", "lan", "state_dir"}, {"capacity"}),
    "link": ({"down", "up"}, {"adapt", "down_min", "down_max", "up_min", "up_max"}),
    "latency": (set(), {"track", "window"}),
    "shaping": (set(), {"leaf", "rtt", "headroom"}),
    "meter": (set(), {"interval", "delivered_read"}),
    "publish": (
        {"usage", "replay"},
        {"secret_key", "allowed_keys", "plaintext"},
    ),
    "control": (
        set(),
        {
            "endpoint",
            "suspend",
            "wall_down",
            "wall_up",
            "fair_use_down",
            "fair_use_up",
            "allowed_keys",
        },
    ),
    "metrics": (set(), {"listen", "allow_remote"}),
    "subscribers": ({"file"}, {"settle", "grace"}),
    "policy": (set(), {"unprovisioned", "wall_down", "wall_up", "allow_share"}),
    "fleet": ({"servers", "credentials"}, {"ca", "window", "control", "retention"}),
    "radius": (
        {"servers", "secret_file"},
        {"interim", "nas_ip", "coa_listen", "coa_clients", "disconnect"},
    ),
}
_REQUIRED_SECTIONS = ("gateway", "link", "publish", "subscribers")


class _Located:
    """Finds the line of a section or key in the raw TOML text, for error messages."""

    def __init__(self, path: Path, text: str) -> None:
        self.path = path
        self.lines = text.splitlines()

    def line_of(self, section: str, key: str | None = None) -> int | None:
        current = None
        header = re.compile(r"^\s*\[\s*([A-Za-z0-9_.-]+)\s*\]")
        for number, line in enumerate(self.lines, start=1):
            match = header.match(line)
            if match:
                current = match.group(1)
                if key is None and current == section:
                    return number
                continue
            if (
                key is not None
                and current == section
                and re.match(rf"^\s*{re.escape(key)}\s*=", line)
            ):
                return number
        return None

    def error(self, section: str, key: str | None, message: str) -> ConfigError:
        line = self.line_of(section, key) or (self.line_of(section) if key else None)
        where = f"{self.path}:{line}" if line else str(self.path)
        field = f"[{section}] {key}" if key else f"[{section}]"
        return ConfigError(f"{where}: {field}: {message}")


def load_config(path: str | Path) -> Config:
    """Read and check a gateway TOML file; raises ConfigError naming file, line and field."""
    path = Path(path)
    try:
        raw = path.read_bytes()
    except OSError as err:
        raise ConfigError(f"{path}: cannot read the configuration: {err.strerror}") from err
    return parse_config(decode_utf8(raw, path), path)


def decode_utf8(raw: bytes, path: Path) -> str:
    """The text of a file operators edit; ConfigError naming the line if it is not UTF-8.

    A leading byte-order mark is skipped: spreadsheets save "CSV UTF-8" with one.
    """
    skip = len(UTF8_BOM) if raw.startswith(UTF8_BOM) else 0
    try:
        return raw[skip:].decode("utf-8")
    except UnicodeDecodeError as err:
        offset = skip + err.start
        line = raw[:offset].count(b"\n") + 1
        raise ConfigError(
            f"{path}:{line}: byte {offset} is not UTF-8: save the file as UTF-8"
        ) from None


def require_lan(config: Config) -> None:
    """Refuse a LAN interface missing from this network namespace (before anything is changed)."""
    try:
        socket.if_nametoindex(config.lan)
    except OSError:
        try:
            loc = _Located(config.path, config.path.read_text())
        except OSError:
            loc = _Located(config.path, "")
        raise loc.error(
            "gateway", "lan", f"interface {config.lan!r} does not exist in this network namespace"
        ) from None


def parse_config(text: str, path: Path) -> Config:
    """Check configuration text read from `path` (relative paths resolve against its folder)."""
    try:
        doc = tomllib.loads(text)
    except tomllib.TOMLDecodeError as err:
        line = re.search(r"at line (\d+)", str(err))
        where = f"{path}:{line.group(1)}" if line else str(path)
        raise ConfigError(f"{where}: not valid TOML: {err}") from err
    loc = _Located(path, text)
    for section, value in doc.items():
        if section not in _SCHEMA:
            known = ", ".join(f"[{s}]" for s in _SCHEMA)
            raise loc.error(section, None, f"unknown section (known: {known})")
        if not isinstance(value, dict):
            raise ConfigError(f"{path}: {section} must be a [section], not a value")
        required, optional = _SCHEMA[section]
        for key in value:
            if key not in required | optional:
                allowed = ", ".join(sorted(required | optional))
                raise loc.error(section, key, f"unknown field (allowed: {allowed})")
        for key in sorted(required - value.keys()):
            raise loc.error(section, None, f"missing field {key!r}")
    for section in _REQUIRED_SECTIONS:
        if section not in doc:
            raise ConfigError(f"{path}: missing section [{section}]")
    return _build(doc, loc, path)


def _build(doc: Mapping[str, Any], loc: _Located, path: Path) -> Config:
    def get(section: str, key: str, kind: type[T], default: T | None = None) -> T:
        value = doc.get(section, {}).get(key, default)
        if (
            value is None
            or not isinstance(value, kind)
            or isinstance(value, bool) != (kind is bool)
        ):
            raise loc.error(section, key, f"expected a {kind.__name__}, got {value!r}")
        return value

    def parsed(section: str, key: str, parse: Callable[[str], T], default: str | None = None) -> T:
        text = get(section, key, str, default)
        try:
            return parse(text)
        except ValidationError as err:
            raise loc.error(section, key, str(err)) from err

    gateway_id = parsed("gateway", "id", check_gateway_id)
    lan = parsed("gateway", "lan", check_ifname)
    capacity = get("gateway", "capacity", int, 65536)
    if not 1 <= capacity <= 1 << 20:
        raise loc.error("gateway", "capacity", f"{capacity} must be between 1 and 1048576")
    base = path.parent
    leaf = get("shaping", "leaf", str, "fq_codel")
    if leaf not in LEAF_KINDS:
        raise loc.error("shaping", "leaf", f"{leaf!r} is not one of {', '.join(LEAF_KINDS)}")
    headroom = doc.get("shaping", {}).get("headroom", 0.05)
    if isinstance(headroom, bool) or not isinstance(headroom, int | float):
        raise loc.error("shaping", "headroom", f"expected a number, got {headroom!r}")
    if not 0 <= headroom < 0.5:
        raise loc.error("shaping", "headroom", f"{headroom} must be in [0, 0.5)")
    interval_ms = parsed("meter", "interval", parse_duration_ms, "1s")
    if not 100 <= interval_ms <= 3_600_000:
        raise loc.error("meter", "interval", f"{interval_ms:g} ms must be between 100ms and 1h")
    delivered_read = get("meter", "delivered_read", str, "moved")
    if delivered_read not in DELIVERED_READS:
        raise loc.error("meter", "delivered_read", f"{delivered_read!r} is not one of moved, dump")
    suspend = get("control", "suspend", str, "wall")
    if suspend not in SUSPEND_MODES:
        raise loc.error(
            "control", "suspend", f"{suspend!r} is not one of {', '.join(SUSPEND_MODES)}"
        )
    control_endpoint = parsed("control", "endpoint", check_endpoint, "tcp://127.0.0.1:7572")
    publish = _publish(doc, loc, base, get, parsed)
    if publish.plaintext and not is_loopback(control_endpoint):
        raise loc.error(
            "control", "endpoint", f"{control_endpoint!r}: plaintext is only allowed on loopback"
        )
    control_keys = None
    if "allowed_keys" in doc.get("control", {}):
        control_keys = base / get("control", "allowed_keys", str)
        if publish.plaintext:
            raise loc.error(
                "control", "allowed_keys", "needs CURVE: remove it, or plaintext from [publish]"
            )
    metrics_listen = _metrics_listen(doc, loc, get, parsed)
    settle_ms = parsed("subscribers", "settle", parse_duration_ms, "2s")
    if not 100 <= settle_ms <= 600_000:
        raise loc.error("subscribers", "settle", f"{settle_ms:g} ms must be between 100ms and 10m")
    grace_ms = parsed("subscribers", "grace", parse_duration_ms, "7d")
    if grace_ms < 60_000:
        raise loc.error("subscribers", "grace", f"{grace_ms:g} ms is under a minute")
    return Config(
        path=path,
        gateway_id=gateway_id,
        lan=lan,
        state_dir=base / get("gateway", "state_dir", str),
        capacity=capacity,
        link=LinkConfig(
            down_bps=parsed("link", "down", parse_rate_bps),
            up_bps=parsed("link", "up", parse_rate_bps),
        ),
        shaping=ShapingConfig(
            leaf=leaf,
            rtt_ms=parsed("shaping", "rtt", parse_duration_ms, "100ms"),
            headroom=headroom,
        ),
        interval_ms=int(interval_ms),
        delivered_read=delivered_read,
        publish=publish,
        control=ControlConfig(
            endpoint=control_endpoint,
            suspend=suspend,
            wall_down_bps=parsed("control", "wall_down", parse_rate_bps, "64kbit"),
            wall_up_bps=parsed("control", "wall_up", parse_rate_bps, "32kbit"),
            fair_use_down_bps=parsed("control", "fair_use_down", parse_rate_bps, "1mbit"),
            fair_use_up_bps=parsed("control", "fair_use_up", parse_rate_bps, "256kbit"),
            allowed_keys=control_keys,
        ),
        metrics_listen=metrics_listen,
        subscribers_file=base / get("subscribers", "file", str),
        settle_ms=int(settle_ms),
        grace_ms=int(grace_ms),
        policy=_policy(doc, loc, get, parsed),
        fleet=_fleet(doc, loc, base, get) if "fleet" in doc else None,
        radius=_radius(doc, loc, base, get, parsed) if "radius" in doc else None,
        **_latency_and_adapt(loc, get, parsed),
    )


def _latency_and_adapt(
    loc: _Located, get: Callable[..., Any], parsed: Callable[..., Any]
) -> dict[str, Any]:
    latency = LatencyConfig(
        track=get("latency", "track", bool, True),
        window_ms=int(parsed("latency", "window", parse_duration_ms, "60s")),
    )
    if not 10_000 <= latency.window_ms <= 3_600_000:
        raise loc.error("latency", "window", f"{latency.window_ms} ms must be 10s to 1h")
    if not get("link", "adapt", bool, False):
        return {"latency": latency}
    if not latency.track:
        raise loc.error("link", "adapt", "follows the passive RTT: needs [latency] track = true")
    bounds = {}
    for direction in ("down", "up"):
        rate = parsed("link", direction, parse_rate_bps)
        # Defaults: down to a quarter of the configured rate, never above it.
        low = parsed("link", f"{direction}_min", parse_rate_bps, f"{max(rate // 4, 64_000)}bit")
        high = parsed("link", f"{direction}_max", parse_rate_bps, f"{rate}bit")
        if not low <= rate <= high:
            raise loc.error(
                "link",
                f"{direction}_min",
                f"needs {direction}_min <= {direction} <= {direction}_max",
            )
        bounds[direction] = (low, high)
    adapt = AdaptConfig(*bounds["down"], *bounds["up"])
    return {"latency": latency, "adapt": adapt}


def _fleet(
    doc: Mapping[str, Any], loc: _Located, base: Path, get: Callable[..., Any]
) -> FleetConfig:
    servers = doc["fleet"].get("servers")
    if not isinstance(servers, list) or not servers:
        raise loc.error("fleet", "servers", 'a list of hub servers, e.g. ["tls://hub-1:4222"]')
    for server in servers:
        scheme, _, rest = str(server).partition("://")
        try:
            if scheme not in ("tls", "nats") or not isinstance(server, str):
                raise ValidationError(f"{server!r}: use tls://host:port (or nats://host:port)")
            parse_host_port(rest)
        except ValidationError as err:
            raise loc.error("fleet", "servers", str(err)) from None
    window = get("fleet", "window", int, 1024)
    if not 1 <= window <= 65_536:
        raise loc.error("fleet", "window", f"{window} must be 1 to 65536 publishes in flight")
    ca = doc["fleet"].get("ca")
    try:
        retention_ms = parse_duration_ms(get("fleet", "retention", str, "7d"))
    except ValidationError as err:
        raise loc.error("fleet", "retention", str(err)) from None
    if retention_ms < 86_400_000:
        raise loc.error("fleet", "retention", "keep at least 1d: an outage lasts a weekend")
    return FleetConfig(
        servers=tuple(servers),
        credentials=base / get("fleet", "credentials", str),
        ca=base / get("fleet", "ca", str) if ca is not None else None,
        window=window,
        control=get("fleet", "control", bool, True),
        retention_ms=retention_ms,
    )


def _radius(
    doc: Mapping[str, Any],
    loc: _Located,
    base: Path,
    get: Callable[..., Any],
    parsed: Callable[..., Any],
) -> RadiusConfig:
    section = doc["radius"]
    servers = section["servers"]
    if not isinstance(servers, list) or not 1 <= len(servers) <= 2:
        raise loc.error(
            "radius", "servers", 'a list of one or two host:port, e.g. ["10.9.0.1:1813"]'
        )
    addresses = []
    for server in servers:
        try:
            hp = parse_host_port(server)
        except ValidationError as err:
            raise loc.error("radius", "servers", str(err)) from None
        addresses.append((hp.host, hp.port))
    interim_ms = parsed("radius", "interim", parse_duration_ms, "5m")
    if not 60_000 <= interim_ms <= 86_400_000:
        raise loc.error(
            "radius", "interim", f"{interim_ms:g} ms must be between 1m (RFC 2869) and 1d"
        )
    nas_ip = get("radius", "nas_ip", str, "")
    if nas_ip:
        try:
            ipaddress.IPv4Address(nas_ip)
        except ValueError:
            raise loc.error("radius", "nas_ip", f"{nas_ip!r} is not an IPv4 address") from None
    disconnect = section.get("disconnect")
    if disconnect is not None and disconnect not in SUSPEND_MODES:
        raise loc.error(
            "radius", "disconnect", f"{disconnect!r} is not one of {', '.join(SUSPEND_MODES)}"
        )
    listen = None
    if "coa_listen" in section:
        listen_at = parsed("radius", "coa_listen", lambda t: parse_host_port(t, any_port=True))
        listen = (listen_at.host, listen_at.port)
    clients = _coa_clients(section.get("coa_clients", []), loc, base)
    if listen is not None and not clients:
        raise loc.error(
            "radius", "coa_listen", "no coa_clients: list the billing servers that may send"
        )
    if clients and listen is None:
        raise loc.error("radius", "coa_clients", 'set coa_listen too, e.g. "0.0.0.0:3799"')
    return RadiusConfig(
        servers=tuple(addresses),
        secret_file=base / get("radius", "secret_file", str),
        interim_ms=int(interim_ms),
        nas_ip=nas_ip,
        coa_listen=listen,
        coa_clients=clients,
        disconnect=disconnect,
    )


def _coa_clients(clients: Any, loc: _Located, base: Path) -> tuple[CoaClientConfig, ...]:
    example = '[{address = "10.9.0.1", secret_file = "keys/coa.secret"}]'
    if not isinstance(clients, list):
        raise loc.error("radius", "coa_clients", f"a list of clients, e.g. {example}")
    out = []
    for client in clients:
        if (
            not isinstance(client, dict)
            or set(client) != {"address", "secret_file"}
            or not all(isinstance(v, str) for v in client.values())
        ):
            raise loc.error("radius", "coa_clients", f"{client!r}: use {example}")
        try:
            ipaddress.ip_network(client["address"], strict=False)
        except ValueError:
            raise loc.error(
                "radius", "coa_clients", f"{client['address']!r} is not an address or prefix"
            ) from None
        out.append(CoaClientConfig(client["address"], base / client["secret_file"]))
    return tuple(out)


def _policy(
    doc: Mapping[str, Any], loc: _Located, get: Callable[..., Any], parsed: Callable[..., Any]
) -> PolicyConfig:
    defaults = PolicyConfig()
    unprovisioned = get("policy", "unprovisioned", str, defaults.unprovisioned)
    if unprovisioned not in UNPROVISIONED_POLICIES:
        raise loc.error(
            "policy",
            "unprovisioned",
            f"{unprovisioned!r} is not one of {', '.join(UNPROVISIONED_POLICIES)}",
        )
    share = doc.get("policy", {}).get("allow_share", defaults.allow_share)
    if isinstance(share, bool) or not isinstance(share, int | float):
        raise loc.error("policy", "allow_share", f"expected a number, got {share!r}")
    if not 0 < share <= 0.5:
        raise loc.error(
            "policy", "allow_share", f"{share} must be above 0 and at most 0.5 of the link"
        )
    return PolicyConfig(
        unprovisioned=unprovisioned,
        wall_down_bps=parsed("policy", "wall_down", parse_rate_bps, "256kbit"),
        wall_up_bps=parsed("policy", "wall_up", parse_rate_bps, "128kbit"),
        allow_share=float(share),
    )


def _metrics_listen(
    doc: Mapping[str, Any], loc: _Located, get: Callable[..., Any], parsed: Callable[..., Any]
) -> tuple[str, int] | None:
    section = doc.get("metrics", {})
    allow_remote = get("metrics", "allow_remote", bool, False)
    if section.get("listen") is None:
        return None
    listen = parsed("metrics", "listen", parse_host_port)
    # Metrics have no authentication and name every subscriber with its usage.
    if not listen.is_loopback and not allow_remote:
        raise loc.error(
            "metrics",
            "listen",
            f"{listen} is reachable from other machines and metrics are not authenticated: "
            "listen on 127.0.0.1 (scrape through an SSH tunnel or a reverse proxy with "
            "authentication), or set allow_remote = true to expose them",
        )
    return (listen.host, listen.port)


def _publish(
    doc: Mapping[str, Any],
    loc: _Located,
    base: Path,
    get: Callable[..., Any],
    parsed: Callable[..., Any],
) -> PublishConfig:
    usage = parsed("publish", "usage", check_endpoint)
    replay = parsed("publish", "replay", check_endpoint)
    plaintext = get("publish", "plaintext", bool, False)
    section = doc.get("publish", {})
    secret = section.get("secret_key")
    allowed = section.get("allowed_keys")
    if plaintext:
        for key, endpoint in (("usage", usage), ("replay", replay)):
            if not is_loopback(endpoint):
                raise loc.error(
                    "publish", key, f"{endpoint!r}: plaintext is only allowed on loopback or ipc"
                )
    elif secret is None or allowed is None:
        raise loc.error(
            "publish",
            None,
            "set secret_key and allowed_keys (see `desanet keygen`), "
            "or plaintext = true on loopback",
        )
    return PublishConfig(
        usage=usage,
        replay=replay,
        secret_key=base / get("publish", "secret_key", str) if secret is not None else None,
        allowed_keys=base / get("publish", "allowed_keys", str) if allowed is not None else None,
        plaintext=plaintext,
    )
