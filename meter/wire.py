"""The usage stream's wire formats: the v1 usage message and the replay protocol.

Both sides (gateway and billing client) encode and decode through this module,
so docs/usage-stream.md and the code describe one format. Decoding checks
every key and type and raises `StreamError` naming what is wrong.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, NamedTuple

import msgpack

from desanet.errors import StreamError

VERSION = 1
TOPIC_PREFIX = "usage."

# Replay protocol: a client sends one frame (a msgpack request map); every reply
# is two frames, a kind and a msgpack payload (see docs/usage-stream.md).
OP_REPLAY = "replay"
OP_SNAPSHOT = "snapshot"
REPLY_MSG = b"msg"
REPLY_END = b"end"
REPLY_SNAPSHOT = b"snapshot"
REPLY_ERROR = b"error"
# A request is a small map: anything bigger is refused before it is parsed.
MAX_REQUEST_BYTES = 1024
# Messages sent per replay request; the client asks again from `next` for more.
MAX_REPLAY_BATCH = 256

COLUMNS = ("up", "down", "up_pkts", "down_pkts", "up_total", "down_total")
_REQUIRED = ("v", "gw", "seq", "t0", "t1", "sub", *COLUMNS)


def topic(gateway_id: str) -> bytes:
    """The PUB topic frame of a gateway: `usage.<gateway id>` in UTF-8."""
    return (TOPIC_PREFIX + gateway_id).encode()


class UsageRecord(NamedTuple):
    """One subscriber's row of a usage message."""

    gw: str
    seq: int
    t0: int
    t1: int
    sub: str
    up: int
    down: int
    up_pkts: int
    down_pkts: int
    up_total: int
    down_total: int


class UsageEvent(NamedTuple):
    """Something the gateway did to a subscriber by itself or on request (key `ev`).

    `kind` is one of EVENT_KINDS (clients must accept kinds they do not know);
    `detail` is a human-readable sentence; `t` is Unix milliseconds, UTC.
    """

    t: int
    sub: str
    kind: str
    detail: str


# "throttled": quota passed, fair-use plan applied; "period": a new quota month began;
# the rest echo the control request that caused them.
EVENT_KINDS = (
    "throttled",
    "period",
    "plan",
    "plan_reset",
    "suspend",
    "resume",
    "quota",
    "quota_reset",
)


@dataclass(frozen=True)
class UsageMessage:
    """A decoded v1 usage message: parallel columns over the subscribers in `sub`."""

    gw: str
    seq: int
    t0: int
    t1: int
    sub: list[str]
    up: list[int]
    down: list[int]
    up_pkts: list[int]
    down_pkts: list[int]
    up_total: list[int]
    down_total: list[int]
    snapshot: bool = False
    events: tuple[UsageEvent, ...] = ()
    unprovisioned: dict[str, int] | None = None

    def __len__(self) -> int:
        return len(self.sub)

    def records(self) -> Iterator[UsageRecord]:
        """The message's rows, one per subscriber."""
        for i, sub in enumerate(self.sub):
            yield UsageRecord(
                self.gw,
                self.seq,
                self.t0,
                self.t1,
                sub,
                self.up[i],
                self.down[i],
                self.up_pkts[i],
                self.down_pkts[i],
                self.up_total[i],
                self.down_total[i],
            )


def encode_usage(
    gw: str,
    seq: int,
    t0: int,
    t1: int,
    sub: Sequence[str],
    columns: Mapping[str, Sequence[int]],
    snapshot: bool = False,
    events: Sequence[UsageEvent] = (),
    unprovisioned: Mapping[str, int] | None = None,
) -> bytes:
    """The msgpack body of one v1 usage message (columns are plain int lists).

    `unprovisioned` (key `unprovisioned`): traffic of no subscriber, billed to
    nobody, as a flat map of counters (docs/usage-stream.md).
    """
    body: dict[str, Any] = {"v": VERSION, "gw": gw, "seq": seq, "t0": t0, "t1": t1, "sub": sub}
    for name in COLUMNS:
        body[name] = columns[name]
    if snapshot:
        body["snapshot"] = True
    if events:
        body["ev"] = [{"t": e.t, "sub": e.sub, "kind": e.kind, "detail": e.detail} for e in events]
    if unprovisioned:
        body["unprovisioned"] = dict(unprovisioned)
    return msgpack.packb(body)


def decode_usage(data: bytes) -> UsageMessage:
    """Decode and check one usage message body; raises StreamError if it is not valid v1."""
    body = _unpack_map(data, "usage message")
    missing = [k for k in _REQUIRED if k not in body]
    if missing:
        raise StreamError(f"usage message lacks {', '.join(missing)}")
    if body["v"] != VERSION:
        raise StreamError(f"usage message has schema version {body['v']!r}, this client reads 1")
    if not isinstance(body["gw"], str):
        raise StreamError("usage message: gw is not a string")
    for key in ("seq", "t0", "t1"):
        if not isinstance(body[key], int) or isinstance(body[key], bool):
            raise StreamError(f"usage message: {key} is not an integer")
    sub = body["sub"]
    if not isinstance(sub, list) or not all(isinstance(s, str) for s in sub):
        raise StreamError("usage message: sub is not a list of strings")
    for name in COLUMNS:
        col = body[name]
        if not isinstance(col, list) or len(col) != len(sub):
            raise StreamError(f"usage message: {name} is not a list as long as sub")
    return UsageMessage(
        gw=body["gw"],
        seq=body["seq"],
        t0=body["t0"],
        t1=body["t1"],
        sub=sub,
        up=body["up"],
        down=body["down"],
        up_pkts=body["up_pkts"],
        down_pkts=body["down_pkts"],
        up_total=body["up_total"],
        down_total=body["down_total"],
        snapshot=bool(body.get("snapshot", False)),
        events=_decode_events(body.get("ev", [])),
        unprovisioned=_decode_unprovisioned(body.get("unprovisioned")),
    )


def _decode_unprovisioned(raw: object) -> dict[str, int] | None:
    if raw is None:
        return None
    if not isinstance(raw, dict) or not all(
        isinstance(k, str) and isinstance(v, int) and not isinstance(v, bool) and v >= 0
        for k, v in raw.items()
    ):
        raise StreamError("usage message: unprovisioned is not a map of counters")
    return raw


def _decode_events(raw: object) -> tuple[UsageEvent, ...]:
    if not isinstance(raw, list):
        raise StreamError("usage message: ev is not a list")
    events = []
    for item in raw:
        if not isinstance(item, dict):
            raise StreamError("usage message: an ev entry is not a map")
        t, sub, kind, detail = (item.get(k) for k in ("t", "sub", "kind", "detail"))
        if not isinstance(t, int) or isinstance(t, bool):
            raise StreamError("usage message: an ev entry's t is not an integer")
        if not (isinstance(sub, str) and isinstance(kind, str) and isinstance(detail, str)):
            raise StreamError("usage message: an ev entry's sub, kind or detail is not a string")
        events.append(UsageEvent(t, sub, kind, detail))
    return tuple(events)


@dataclass(frozen=True)
class ReplayRequest:
    """A checked replay-endpoint request: `op` is replay (from `from_seq`) or snapshot."""

    op: str
    from_seq: int = 0


def encode_request(op: str, from_seq: int = 0) -> bytes:
    """The single request frame a client sends to the replay endpoint."""
    body: dict[str, Any] = {"v": VERSION, "op": op}
    if op == OP_REPLAY:
        body["from"] = from_seq
    return msgpack.packb(body)


def decode_request(data: bytes) -> ReplayRequest:
    """Check a request frame; raises StreamError with the reason sent back to the client."""
    if len(data) > MAX_REQUEST_BYTES:
        raise StreamError(f"request of {len(data)} bytes, the limit is {MAX_REQUEST_BYTES}")
    body = _unpack_map(data, "request")
    if body.get("v") != VERSION:
        raise StreamError(f"unsupported request version {body.get('v')!r}, this server speaks 1")
    op = body.get("op")
    if op == OP_SNAPSHOT:
        return ReplayRequest(OP_SNAPSHOT)
    if op != OP_REPLAY:
        raise StreamError(f"unknown op {op!r}: expected 'replay' or 'snapshot'")
    start = body.get("from")
    if not isinstance(start, int) or isinstance(start, bool) or not 0 <= start < 2**63:
        raise StreamError("replay needs 'from': a sequence number, 0 <= from < 2**63")
    return ReplayRequest(OP_REPLAY, start)


def pack(body: Mapping[str, Any]) -> bytes:
    """msgpack a reply payload."""
    return msgpack.packb(body)


def unpack_reply(data: bytes) -> dict[str, Any]:
    """Decode a reply payload (end, snapshot or error) into a map."""
    return _unpack_map(data, "reply")


def _unpack_map(data: bytes, what: str) -> dict[str, Any]:
    try:
        body = msgpack.unpackb(data, raw=False, strict_map_key=True)
    except (ValueError, TypeError, msgpack.UnpackException) as err:
        raise StreamError(f"{what} is not valid msgpack: {err}") from None
    if not isinstance(body, dict):
        raise StreamError(f"{what} is not a msgpack map")
    return body
