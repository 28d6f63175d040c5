# Over 400 lines: the usage message and the replay protocol are one contract and share their
# checks.
"""The usage stream's wire formats: the v1 usage message and the replay protocol.

Both sides (gateway and billing client) encode and decode through this module,
so docs/usage-stream.md and the code describe one format. Decoding checks
every key and type and raises `StreamError` naming what is wrong; decoding a
request never raises anything else, whatever the bytes.
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
# Refusal codes: the seqs were removed by retention; the epoch is not the one served.
CODE_GONE = "gone"
CODE_EPOCH = "epoch"
# Epoch ids are 32 hex digits (meter.epoch); anything up to this length is accepted.
MAX_EPOCH_CHARS = 64

COLUMNS = ("up", "down", "up_pkts", "down_pkts", "up_total", "down_total")
_REQUIRED = ("v", "gw", "seq", "t0", "t1", "sub", *COLUMNS)


def topic(gateway_id: str) -> bytes:
    """The PUB topic frame of a gateway: `usage.<gateway id>` in UTF-8."""
    return (TOPIC_PREFIX + gateway_id).encode()


class UsageRecord(NamedTuple):
    """One subscriber's row of a usage message."""

    gw: str
    epoch: str
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
    "link_rate",
)


@dataclass(frozen=True)
class UsageMessage:
    """A decoded v1 usage message: parallel columns over the subscribers in `sub`.

    `epoch` is "" for a message of a gateway from before stream epochs.
    """

    gw: str
    epoch: str
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
                self.epoch,
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
    *,
    epoch: str,
    snapshot: bool = False,
    events: Sequence[UsageEvent] = (),
    unprovisioned: Mapping[str, int] | None = None,
) -> bytes:
    """The msgpack body of one v1 usage message (columns are plain int lists).

    `unprovisioned` (key `unprovisioned`): traffic of no subscriber, billed to
    nobody, as a flat map of counters (docs/usage-stream.md).
    """
    body: dict[str, Any] = {
        "v": VERSION,
        "gw": gw,
        "epoch": epoch,
        "seq": seq,
        "t0": t0,
        "t1": t1,
        "sub": sub,
    }
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
    epoch = _epoch(body.get("epoch", ""), "usage message")
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
        epoch=epoch,
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


def _epoch(value: object, what: str) -> str:
    if not isinstance(value, str) or len(value) > MAX_EPOCH_CHARS:
        raise StreamError(f"{what}: epoch is not a string of at most {MAX_EPOCH_CHARS} characters")
    return value


def _seq(value: object, what: str) -> int:
    if not isinstance(value, int) or isinstance(value, bool) or not 0 <= value < 2**63:
        raise StreamError(f"{what}: a sequence number, 0 <= seq < 2**63")
    return value


@dataclass(frozen=True)
class ReplayRequest:
    """A checked replay-endpoint request: `op` is replay (from `from_seq`) or snapshot.

    `epoch` None asks for the epoch the gateway publishes in now.
    """

    op: str
    from_seq: int = 0
    epoch: str | None = None


def encode_request(op: str, from_seq: int = 0, epoch: str | None = None) -> bytes:
    """The single request frame a client sends to the replay endpoint."""
    body: dict[str, Any] = {"v": VERSION, "op": op}
    if op == OP_REPLAY:
        body["from"] = from_seq
        if epoch is not None:
            body["epoch"] = epoch
    return msgpack.packb(body)


def decode_request(data: bytes) -> ReplayRequest:
    """Check a request frame; raises StreamError with the reason sent back to the client."""
    if len(data) > MAX_REQUEST_BYTES:
        raise StreamError(f"request of {len(data)} bytes, the limit is {MAX_REQUEST_BYTES}")
    body = _unpack_map(data, "request")
    if body.get("v") != VERSION:
        raise StreamError(
            f"unsupported request version {_short(body.get('v'))}, this server speaks 1"
        )
    op = body.get("op")
    if op == OP_SNAPSHOT:
        return ReplayRequest(OP_SNAPSHOT)
    if op != OP_REPLAY:
        raise StreamError(f"unknown op {_short(op)}: expected 'replay' or 'snapshot'")
    if "from" not in body:
        raise StreamError("replay needs 'from': a sequence number, 0 <= from < 2**63")
    start = _seq(body["from"], "replay 'from'")
    epoch = body.get("epoch")
    return ReplayRequest(OP_REPLAY, start, None if epoch is None else _epoch(epoch, "replay"))


def _short(value: object) -> str:
    text = repr(value)
    return text if len(text) <= 40 else text[:37] + "..."


@dataclass(frozen=True)
class PreviousEpoch:
    """The epoch a new one followed: its state holds `epoch` up to `seq`.

    `published` is the newest seq of `epoch` that left the gateway, when known;
    seqs between `seq` and `published` were published but are lost to the gateway.
    """

    epoch: str
    seq: int
    published: int | None = None


@dataclass(frozen=True)
class ReplayEnd:
    """The end of one replay answer: ask from `next` while `next <= last`."""

    epoch: str
    next: int
    last: int


@dataclass(frozen=True)
class Refusal:
    """An `error` reply. `code` "gone": seqs before `oldest` were removed by retention;
    "epoch": the gateway publishes in `epoch` now, not in the epoch asked for."""

    error: str
    code: str | None = None
    epoch: str | None = None
    oldest: int | None = None
    last: int | None = None
    previous: PreviousEpoch | None = None


def encode_refusal(refusal: Refusal) -> bytes:
    """The payload of an `error` reply."""
    body: dict[str, Any] = {"v": VERSION, "error": refusal.error}
    for key in ("code", "epoch", "oldest", "last"):
        value = getattr(refusal, key)
        if value is not None:
            body[key] = value
    prev = refusal.previous
    if prev is not None:
        body["previous"] = {"epoch": prev.epoch, "seq": prev.seq}
        if prev.published is not None:
            body["previous"]["published"] = prev.published
    return msgpack.packb(body)


def decode_refusal(data: bytes) -> Refusal:
    """Check an `error` reply payload."""
    body = _unpack_map(data, "error reply")
    error, code, epoch = body.get("error"), body.get("code"), body.get("epoch")
    if not isinstance(error, str) or not (code is None or isinstance(code, str)):
        raise StreamError("error reply without an error text")
    prev = body.get("previous")
    previous = None
    if isinstance(prev, dict):
        published = prev.get("published")
        previous = PreviousEpoch(
            _epoch(prev.get("epoch"), "error reply previous"),
            _seq(prev.get("seq"), "error reply previous"),
            None if published is None else _seq(published, "error reply previous"),
        )
    oldest, last = body.get("oldest"), body.get("last")
    return Refusal(
        error,
        code,
        None if epoch is None else _epoch(epoch, "error reply"),
        None if oldest is None else _seq(oldest, "error reply 'oldest'"),
        None if last is None else _seq(last, "error reply 'last'"),
        previous,
    )


def encode_end(end: ReplayEnd) -> bytes:
    """The payload of an `end` reply."""
    return msgpack.packb({"v": VERSION, "epoch": end.epoch, "next": end.next, "last": end.last})


def decode_end(data: bytes) -> ReplayEnd:
    """Check an `end` reply payload (epoch "" from a gateway from before epochs)."""
    body = _unpack_map(data, "end reply")
    return ReplayEnd(
        _epoch(body.get("epoch", ""), "end reply"),
        _seq(body.get("next"), "end reply 'next'"),
        _seq(body.get("last"), "end reply 'last'"),
    )


@dataclass(frozen=True)
class TotalsSnapshot:
    """Every subscriber's (up_total, down_total) after message `seq` of `epoch` (`snapshot` op)."""

    gw: str
    epoch: str
    seq: int
    t1: int
    totals: dict[str, tuple[int, int]]


def encode_snapshot(snap: TotalsSnapshot) -> bytes:
    """The payload of a `snapshot` reply."""
    subs = list(snap.totals)
    return msgpack.packb(
        {
            "v": VERSION,
            "gw": snap.gw,
            "epoch": snap.epoch,
            "seq": snap.seq,
            "t1": snap.t1,
            "sub": subs,
            "up_total": [snap.totals[s][0] for s in subs],
            "down_total": [snap.totals[s][1] for s in subs],
        }
    )


def decode_snapshot(data: bytes) -> TotalsSnapshot:
    """Check a `snapshot` reply payload."""
    body = _unpack_map(data, "snapshot reply")
    gw, sub, up, down = (body.get(k) for k in ("gw", "sub", "up_total", "down_total"))
    if not (isinstance(gw, str) and isinstance(sub, list) and isinstance(up, list)):
        raise StreamError("snapshot reply lacks gw, sub or up_total")
    if not isinstance(down, list) or not len(sub) == len(up) == len(down):
        raise StreamError("snapshot reply: sub, up_total and down_total differ in length")
    try:
        totals = {str(s): (int(u), int(d)) for s, u, d in zip(sub, up, down, strict=True)}
    except (TypeError, ValueError) as err:
        raise StreamError(f"snapshot reply: a total is not an integer: {err}") from None
    t1 = body.get("t1")
    if not isinstance(t1, int):
        raise StreamError("snapshot reply: t1 is not an integer")
    return TotalsSnapshot(
        gw,
        _epoch(body.get("epoch", ""), "snapshot reply"),
        _seq(body.get("seq"), "snapshot reply"),
        t1,
        totals,
    )


def _unpack_map(data: bytes, what: str) -> dict[str, Any]:
    try:
        body = msgpack.unpackb(data, raw=False, strict_map_key=True)
    except (ValueError, TypeError, msgpack.UnpackException) as err:
        raise StreamError(f"{what} is not valid msgpack: {err}") from None
    if not isinstance(body, dict):
        raise StreamError(f"{what} is not a msgpack map")
    return body
