"""What billing may change at run time (plans, suspension, quotas), journaled across restarts.

`ControlState` holds every change billing made, per subscriber, and replays
them from an append-only journal in the state directory. `effective_plan`
turns a subscriber's declared plan plus those changes into what the shaper and
the datapath enforce. `handle` validates one request (a msgpack map) and
applies it; nothing is journaled unless the request is valid in full.

Requests (`op` and `sub` always present, rates tc-style strings or bit/s ints):
  plan {down_min, down_max, up_min, up_max} | plan_reset | suspend {mode?} |
  resume | quota {bytes: int|str|None} | quota_reset | show
"""

from __future__ import annotations

import json
import logging
import os
import time
import zlib
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import msgpack
import zmq

from desanet.ebpf.abi import SLOT_BLOCKED
from desanet.errors import ControlError, StreamError, ValidationError
from desanet.gateway.config import ControlConfig, LinkConfig
from desanet.gateway.registry import Plan, Subscriber
from desanet.meter.keys import (
    ClientSecurity,
    ServerSecurity,
    secure_client,
    secure_server,
    start_authenticator,
)
from desanet.units import format_rate, parse_bytes, parse_rate_bps

log = logging.getLogger(__name__)

OPS = ("plan", "plan_reset", "suspend", "resume", "quota", "quota_reset", "show")
_UNSET = -1  # quota_override value meaning "use the subscribers file"
MAX_REQUEST_BYTES = 4096


@dataclass
class SubscriberControl:
    """Billing's changes to one subscriber, plus where its current quota period began."""

    plan: Plan | None = None
    suspended: str | None = None  # None, "wall" or "block"
    quota_override: int | None = _UNSET
    period: str = ""  # "YYYY-MM" (UTC) of the current quota period
    period_base: int = 0  # up_total + down_total when the period began
    throttled: bool = False


@dataclass(frozen=True)
class Enforced:
    """What the gateway enforces on a subscriber right now, and why."""

    plan: Plan
    flags: int
    state: str  # "active", "suspended (wall)", "suspended (block)", "fair-use"


@dataclass
class Event:
    """A change the gateway made by itself (quota throttle, new period), for the log and stream."""

    t_ms: int
    sub: str
    kind: str
    detail: str = ""


def month_of(t_ms: int) -> str:
    """The UTC calendar month "YYYY-MM" quota periods are counted in."""
    return time.strftime("%Y-%m", time.gmtime(t_ms / 1000))


class ControlState:
    """Every subscriber's control changes, replayed from and appended to a crash-safe journal.

    Journal lines are `<crc32 hex> <json>`; a torn or corrupt line (a crash
    mid-write) is detected by its checksum and dropped with a warning.
    """

    def __init__(self, path: Path, control: ControlConfig, link: LinkConfig) -> None:
        self.path = path
        self.control = control
        self.link = link
        self.subs: dict[str, SubscriberControl] = {}
        self._file: Any = None
        if path.exists():
            self._replay()

    def _replay(self) -> None:
        with open(self.path, "rb") as f:
            for number, raw in enumerate(f, start=1):
                record = _decode(raw)
                if record is None:
                    log.warning(
                        "%s:%d: dropped a torn or corrupt control record", self.path, number
                    )
                    continue
                self._apply_record(record)

    def _apply_record(self, record: Mapping[str, Any]) -> None:
        if record.get("kind") == "snapshot":
            self.subs = {k: _load_sub(v) for k, v in record["subs"].items()}
            return
        sub = self.subs.setdefault(record["sub"], SubscriberControl())
        for key, value in record["set"].items():
            setattr(sub, key, Plan(**value) if key == "plan" and value else value)

    def open(self) -> None:
        """Compact the journal into one snapshot record and keep it open for appends."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_suffix(".tmp")
        snapshot = {"kind": "snapshot", "subs": {k: _dump_sub(v) for k, v in self.subs.items()}}
        with open(tmp, "wb") as f:
            f.write(_encode(snapshot))
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, self.path)
        # Held open for the service's life: every record is appended and fsynced on its own.
        self._file = open(self.path, "ab")  # noqa: SIM115

    def close(self) -> None:
        """Close the journal (every record is already on disk)."""
        if self._file is not None:
            self._file.close()
            self._file = None

    def record(self, sub_id: str, sync: bool = True, **changes: Any) -> None:
        """Apply and journal changes to one subscriber (durable on return unless `sync=False`)."""
        if self._file is None:
            raise StreamError(f"{self.path}: control journal is not open")
        stored = {k: asdict(v) if isinstance(v, Plan) else v for k, v in changes.items()}
        self._file.write(_encode({"kind": "set", "sub": sub_id, "set": stored}))
        if sync:
            self.sync()
        self._apply_record({"sub": sub_id, "set": stored})

    def sync(self) -> None:
        """Make every record written so far durable."""
        if self._file is not None:
            self._file.flush()
            os.fsync(self._file.fileno())

    def get(self, sub_id: str) -> SubscriberControl:
        """A subscriber's control state (defaults when billing never touched it)."""
        return self.subs.get(sub_id, SubscriberControl())

    def forget(self, sub_id: str) -> None:
        """Drop a subscriber removed from the registry (journaled)."""
        if sub_id in self.subs:
            self.record(sub_id, **asdict(SubscriberControl()))
            del self.subs[sub_id]

    def quota_of(self, sub: Subscriber) -> int | None:
        """The quota in force: billing's override, else the subscribers file's."""
        override = self.get(sub.id).quota_override
        return sub.quota_bytes if override == _UNSET else override

    def enforced(self, sub: Subscriber) -> Enforced:
        """The plan and datapath flags to enforce on `sub` now."""
        state = self.get(sub.id)
        base = state.plan or sub.plan
        c = self.control
        if state.suspended == "block":
            return Enforced(base, SLOT_BLOCKED, "suspended (block)")
        if state.suspended == "wall":
            return Enforced(_capped(base, c.wall_down_bps, c.wall_up_bps), 0, "suspended (wall)")
        if state.throttled:
            return Enforced(_capped(base, c.fair_use_down_bps, c.fair_use_up_bps), 0, "fair-use")
        return Enforced(base, 0, "active")

    def check_quotas(
        self, subscribers: Mapping[str, Subscriber], totals: Mapping[str, int], t_ms: int
    ) -> list[Event]:
        """Start new monthly periods and throttle subscribers past their quota.

        `totals` is each subscriber's up_total + down_total. Returns the events,
        whose subscribers need their plan re-applied.
        """
        events = []
        month = month_of(t_ms)
        # One fsync for the whole pass: a new month touches every subscriber at once.
        written = False
        for sub_id, total in totals.items():
            sub = subscribers.get(sub_id)
            if sub is None:
                continue
            state = self.get(sub_id)
            if state.period != month:
                self.record(sub_id, sync=False, period=month, period_base=total, throttled=False)
                written = True
                if state.period:
                    events.append(Event(t_ms, sub_id, "period", f"new quota period {month}"))
                state = self.get(sub_id)
            quota = self.quota_of(sub)
            used = total - state.period_base
            if quota is not None and used >= quota and not state.throttled:
                self.record(sub_id, sync=False, throttled=True)
                written = True
                events.append(
                    Event(
                        t_ms,
                        sub_id,
                        "throttled",
                        f"quota {quota} B passed ({used} B used): fair-use plan "
                        f"{format_rate(self.control.fair_use_down_bps)} down, "
                        f"{format_rate(self.control.fair_use_up_bps)} up",
                    )
                )
        if written:
            self.sync()
        return events

    def handle(
        self,
        request: object,
        subscribers: Mapping[str, Subscriber],
        total_of: Callable[[str], int],
        check_plans: Callable[[str, Plan], None],
    ) -> tuple[dict[str, Any], str | None]:
        """Validate and apply one request; returns (reply, subscriber whose enforcement changed).

        `check_plans(sub_id, plan)` raises ValidationError when the plan does not
        fit the link beside everyone else's; `total_of` gives a subscriber's bytes.
        """
        try:
            op, sub_id, args = _parse(request, subscribers)
            changes = self._changes(op, sub_id, args, subscribers, total_of, check_plans)
        except (ControlError, ValidationError) as err:
            return {"ok": False, "error": str(err)}, None
        if changes:
            self.record(sub_id, **changes)
        sub = subscribers[sub_id]
        state = self.get(sub_id)
        enforced = self.enforced(sub)
        reply = {
            "ok": True,
            "sub": sub_id,
            "state": enforced.state,
            "plan": asdict(enforced.plan),
            "quota": self.quota_of(sub),
            "used": total_of(sub_id) - state.period_base,
            "period": state.period,
        }
        return reply, (sub_id if changes else None)

    def _changes(
        self,
        op: str,
        sub_id: str,
        args: Mapping[str, Any],
        subscribers: Mapping[str, Subscriber],
        total_of: Callable[[str], int],
        check_plans: Callable[[str, Plan], None],
    ) -> dict[str, Any]:
        state = self.get(sub_id)
        if op == "plan":
            plan = _plan(args, self.link)
            check_plans(sub_id, plan)
            return {"plan": plan}
        if op == "plan_reset":
            check_plans(sub_id, subscribers[sub_id].plan)
            return {"plan": None}
        if op == "suspend":
            mode = args.get("mode", self.control.suspend)
            if mode not in ("wall", "block"):
                raise ControlError(f"suspend mode {mode!r} is not one of wall, block")
            return {"suspended": mode}
        if op == "resume":
            return {"suspended": None}
        if op == "quota":
            quota = args.get("bytes", _MISSING)
            if quota is _MISSING:
                raise ControlError("quota: give 'bytes' (an int, a size like '50GB', or nil)")
            if isinstance(quota, str):
                quota = parse_bytes(quota)
            if quota is not None and (not isinstance(quota, int) or isinstance(quota, bool)):
                raise ControlError(f"quota: bytes must be an int, a size or nil, not {quota!r}")
            if quota is not None and quota <= 0:
                raise ControlError("quota: bytes must be above zero (nil removes the quota)")
            used = total_of(sub_id) - state.period_base
            return {"quota_override": quota, "throttled": quota is not None and used >= quota}
        if op == "quota_reset":
            return {"period_base": total_of(sub_id), "throttled": False}
        return {}


_MISSING = object()
_MALFORMED = object()


def _parse(
    request: object, subscribers: Mapping[str, Subscriber]
) -> tuple[str, str, Mapping[str, Any]]:
    if request is _MALFORMED:
        raise ControlError("malformed: the body is not msgpack")
    if not isinstance(request, dict):
        raise ControlError("a request is a map with 'op' and 'sub'")
    op, sub_id = request.get("op"), request.get("sub")
    if op not in OPS:
        raise ControlError(f"unknown op {op!r} (known: {', '.join(OPS)})")
    if not isinstance(sub_id, str):
        raise ControlError("'sub' must be a subscriber id string")
    if sub_id not in subscribers:
        raise ControlError(f"unknown subscriber {sub_id!r}")
    return op, sub_id, request


def _plan(args: Mapping[str, Any], link: LinkConfig) -> Plan:
    rates = {}
    for key in ("down_min", "down_max", "up_min", "up_max"):
        value = args.get(key)
        if isinstance(value, str):
            rates[key] = parse_rate_bps(value)
        elif isinstance(value, int) and not isinstance(value, bool) and value > 0:
            rates[key] = value
        else:
            raise ControlError(f"plan: {key} must be a rate ('2mbit') or bit/s above zero")
    for direction, limit in (("down", link.down_bps), ("up", link.up_bps)):
        low, high = rates[f"{direction}_min"], rates[f"{direction}_max"]
        if low > high:
            raise ControlError(f"plan: {direction}_min is above {direction}_max")
        if high > limit:
            raise ControlError(f"plan: {direction}_max is above the link's {format_rate(limit)}")
    return Plan(rates["down_min"], rates["down_max"], rates["up_min"], rates["up_max"])


def _capped(plan: Plan, down_bps: int, up_bps: int) -> Plan:
    down_max, up_max = min(plan.down_max_bps, down_bps), min(plan.up_max_bps, up_bps)
    return replace(
        plan,
        down_min_bps=min(plan.down_min_bps, down_max),
        down_max_bps=down_max,
        up_min_bps=min(plan.up_min_bps, up_max),
        up_max_bps=up_max,
    )


def _dump_sub(sub: SubscriberControl) -> dict[str, Any]:
    return asdict(sub)


def _load_sub(doc: Mapping[str, Any]) -> SubscriberControl:
    plan = doc.get("plan")
    return SubscriberControl(**{**doc, "plan": Plan(**plan) if plan else None})


def _encode(record: Mapping[str, Any]) -> bytes:
    body = json.dumps(record, separators=(",", ":"), sort_keys=True).encode()
    return b"%08x %s\n" % (zlib.crc32(body), body)


def _decode(raw: bytes) -> dict[str, Any] | None:
    if not raw.endswith(b"\n") or len(raw) < 10 or raw[8:9] != b" ":
        return None
    body = raw[9:-1]
    try:
        if int(raw[:8], 16) != zlib.crc32(body):
            return None
        record = json.loads(body)
    except ValueError:
        return None
    return record if isinstance(record, dict) else None


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

    def serve_pending(self, handler: Callable[[object], dict[str, Any]]) -> int:
        """Answer every request waiting on the socket; returns how many were answered."""
        served = 0
        while True:
            try:
                frames = self.sock.recv_multipart(zmq.NOBLOCK)
            except zmq.Again:
                return served
            # REQ peers send [identity, "", body], DEALER peers [identity, body].
            envelope, body = frames[:-1], frames[-1]
            if len(frames) not in (2, 3) or (len(frames) == 3 and frames[1] != b""):
                reply: dict[str, Any] = {"ok": False, "error": "malformed: one body frame expected"}
            else:
                reply = handler(_unpack(body))
            self.sock.send_multipart([*envelope, msgpack.packb(reply)])
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
        return _MALFORMED


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
