"""The billing-side client library: subscribe, detect gaps by seq, replay them, deduplicate.

    client = UsageClient("tcp://gw:7570", security=ClientSecurity(server_key, my_keys))
    for msg in client.messages(from_seq=last_stored + 1):
        store(msg)                     # every seq exactly once, in order

The live stream is subscribed before any replay is asked for (the ZeroMQ
guide's Clone pattern), so no message falls between the replay and the live
messages; duplicates are dropped by seq.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import zmq

from desanet.errors import StreamError
from desanet.meter import wire
from desanet.meter.keys import ClientSecurity, secure_client

log = logging.getLogger(__name__)

HEARTBEAT_IVL_MS = 10_000
HEARTBEAT_TIMEOUT_MS = 30_000


class ReplayGone(StreamError):
    """The asked-for seqs were removed by the gateway's journal retention."""

    def __init__(self, message: str, oldest: int) -> None:
        super().__init__(message)
        self.oldest = oldest


@dataclass(frozen=True)
class Snapshot:
    """Every subscriber's totals at `seq` (replay endpoint `snapshot`)."""

    gw: str
    seq: int
    t1: int
    totals: dict[str, tuple[int, int]]


def default_replay_endpoint(usage_endpoint: str) -> str:
    """The replay endpoint next to a usage endpoint: the same host, port + 1."""
    host, sep, port = usage_endpoint.rpartition(":")
    if not usage_endpoint.startswith("tcp://") or not sep or not port.isdigit():
        raise StreamError(f"cannot derive the replay endpoint from {usage_endpoint}: give --replay")
    return f"{host}:{int(port) + 1}"


class UsageClient:
    """A connection to one gateway's usage and replay endpoints."""

    def __init__(
        self,
        usage_endpoint: str,
        replay_endpoint: str | None = None,
        *,
        security: ClientSecurity | None = None,
        gateway_id: str | None = None,
        timeout_ms: int = 5000,
    ) -> None:
        self.security = security or ClientSecurity()
        self.replay_endpoint = replay_endpoint or default_replay_endpoint(usage_endpoint)
        self.gateway_id = gateway_id
        self.timeout_ms = timeout_ms
        self.gaps_filled = 0
        self.duplicates = 0
        self._ctx: zmq.Context[zmq.Socket[bytes]] = zmq.Context()
        self._sub: zmq.Socket[bytes] = self._ctx.socket(zmq.SUB)
        self._sub.linger = 0
        self._sub.rcvhwm = 100_000
        # Over a satellite link an idle TCP connection can die silently (NAT, outage):
        # ZMTP heartbeats notice within HEARTBEAT_TIMEOUT_MS and ZeroMQ reconnects.
        self._sub.heartbeat_ivl = HEARTBEAT_IVL_MS
        self._sub.heartbeat_timeout = HEARTBEAT_TIMEOUT_MS
        secure_client(self._sub, self.security)
        self._sub.subscribe(wire.topic(gateway_id) if gateway_id else wire.TOPIC_PREFIX.encode())
        self._sub.connect(usage_endpoint)
        self._dealer: zmq.Socket[bytes] | None = None

    def close(self) -> None:
        """Close the sockets."""
        self._sub.close()
        if self._dealer is not None:
            self._dealer.close()
        self._ctx.term()

    def __enter__(self) -> UsageClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _request(self, op: str, from_seq: int = 0) -> Iterator[tuple[bytes, bytes]]:
        if self._dealer is None:
            self._dealer = self._ctx.socket(zmq.DEALER)
            self._dealer.linger = 0
            secure_client(self._dealer, self.security)
            self._dealer.connect(self.replay_endpoint)
        self._dealer.send(wire.encode_request(op, from_seq))
        while True:
            if not self._dealer.poll(self.timeout_ms, zmq.POLLIN):
                # A later answer to this request must not be read as the answer to the next one.
                self._dealer.close()
                self._dealer = None
                raise StreamError(
                    f"no answer from the replay endpoint {self.replay_endpoint} within "
                    f"{self.timeout_ms} ms: is the gateway up, and is this client's key allowed?"
                )
            frames = self._dealer.recv_multipart()
            if len(frames) != 2:
                raise StreamError(f"replay endpoint sent {len(frames)} frames, expected 2")
            yield frames[0], frames[1]
            if frames[0] != wire.REPLY_MSG:
                return

    def snapshot(self) -> Snapshot:
        """Every subscriber's totals and the seq they are current at."""
        for kind, payload in self._request(wire.OP_SNAPSHOT):
            body = wire.unpack_reply(payload)
            if kind == wire.REPLY_ERROR:
                raise StreamError(f"replay endpoint refused the snapshot: {body.get('error')}")
            if kind != wire.REPLY_SNAPSHOT:
                raise StreamError(f"replay endpoint answered {kind!r} to a snapshot request")
            totals = {
                s: (int(u), int(d))
                for s, u, d in zip(body["sub"], body["up_total"], body["down_total"], strict=True)
            }
            return Snapshot(body["gw"], body["seq"], body["t1"], totals)
        raise StreamError("replay endpoint ended the snapshot reply early")

    def replay(self, from_seq: int, to_seq: int | None = None) -> Iterator[wire.UsageMessage]:
        """Journaled messages from `from_seq` to `to_seq` (default: the newest), in order."""
        next_seq = max(from_seq, 1)  # seqs start at 1
        stalled = 0
        while to_seq is None or next_seq <= to_seq:
            last = None
            progress = next_seq
            for kind, payload in self._request(wire.OP_REPLAY, next_seq):
                if kind == wire.REPLY_MSG:
                    msg = wire.decode_usage(payload)
                    # A reply dropped on the way (slow link, full queue) shows as a jump:
                    # the rest of this answer is read and ignored, and asked for again.
                    if msg.seq != next_seq or (to_seq is not None and msg.seq > to_seq):
                        continue
                    next_seq = msg.seq + 1
                    yield msg
                    continue
                body = wire.unpack_reply(payload)
                if kind == wire.REPLY_ERROR:
                    if body.get("code") == "gone":
                        raise ReplayGone(str(body.get("error")), int(body.get("oldest", 0)))
                    raise StreamError(f"replay endpoint refused: {body.get('error')}")
                last = int(body["last"])
            if last is None or next_seq > last:
                if to_seq is not None and next_seq <= to_seq:
                    raise StreamError(
                        f"replay endpoint has seqs only up to {last}, {to_seq} was published"
                    )
                return
            stalled = stalled + 1 if next_seq == progress else 0
            if stalled >= 3:
                raise StreamError(f"replay from seq {next_seq} makes no progress; giving up")

    def messages(
        self,
        from_seq: int | None = None,
        *,
        follow: bool = True,
        idle_timeout_ms: int | None = None,
        stop: Callable[[], bool] | None = None,
    ) -> Iterator[wire.UsageMessage]:
        """Every message once, in seq order: replayed from `from_seq`, then live if `follow`.

        Without `from_seq` the stream starts at the first live message. Live
        reading ends after `idle_timeout_ms` without a message, or when `stop()`
        returns true (checked at least every 200 ms).
        """
        next_seq = from_seq
        if from_seq is not None:
            for msg in self.replay(from_seq):
                next_seq = msg.seq + 1
                yield msg
        if not follow:
            return
        idle_since = time.monotonic()
        while stop is None or not stop():
            if not self._sub.poll(200, zmq.POLLIN):
                if (
                    idle_timeout_ms is not None
                    and (time.monotonic() - idle_since) * 1000 >= idle_timeout_ms
                ):
                    return
                continue
            idle_since = time.monotonic()
            frames = self._sub.recv_multipart()
            try:
                if len(frames) != 2:
                    raise StreamError(f"usage message of {len(frames)} frames, expected 2")
                msg = wire.decode_usage(frames[1])
            except StreamError as err:
                log.warning("dropped a usage message that is not valid: %s", err)
                continue
            if next_seq is not None and msg.seq < next_seq:
                self.duplicates += 1
                continue
            if next_seq is not None and msg.seq > next_seq:
                log.info(
                    "seq gap %d..%d: fetching it from the replay endpoint", next_seq, msg.seq - 1
                )
                for missed in self.replay(next_seq, msg.seq - 1):
                    self.gaps_filled += 1
                    yield missed
            next_seq = msg.seq + 1
            yield msg

    def records(
        self,
        from_seq: int | None = None,
        *,
        follow: bool = True,
        idle_timeout_ms: int | None = None,
    ) -> Iterator[wire.UsageRecord]:
        """`messages()` flattened to one record per subscriber and interval."""
        for msg in self.messages(from_seq, follow=follow, idle_timeout_ms=idle_timeout_ms):
            yield from msg.records()
