"""The billing-side client library: subscribe, detect gaps by seq, replay them, deduplicate.

    client = UsageClient("tcp://gw:7570", security=ClientSecurity(server_key, my_keys))
    for msg in client.messages(from_seq=last.seq + 1, epoch=last.epoch):
        store(msg)                     # every (epoch, seq) exactly once, in order

The live stream is subscribed before any replay is asked for (the ZeroMQ
guide's Clone pattern), so no message falls between the replay and the live
messages; duplicates are dropped by seq. A message is identified by (epoch,
seq): when the gateway starts a new epoch, the client reads the new epoch
from its seq 1 on, and drops (and counts) any late message of an epoch it left.
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
from desanet.meter.wire import TotalsSnapshot

__all__ = ["EpochChanged", "ReplayGone", "TotalsSnapshot", "UsageClient"]

log = logging.getLogger(__name__)

HEARTBEAT_IVL_MS = 10_000
HEARTBEAT_TIMEOUT_MS = 30_000


class ReplayGone(StreamError):
    """The asked-for seqs of `epoch` were removed by the gateway's journal retention."""

    def __init__(self, message: str, oldest: int, epoch: str = "") -> None:
        super().__init__(message)
        self.oldest = oldest
        self.epoch = epoch


class EpochChanged(StreamError):
    """The gateway publishes in `epoch` now, not in the epoch that was asked for.

    `previous`, when the gateway knows it, tells how much of the old epoch its
    state holds and how far the old epoch was published.
    """

    def __init__(self, refusal: wire.Refusal, asked: str) -> None:
        super().__init__(refusal.error)
        self.asked = asked
        self.epoch = refusal.epoch or ""
        self.oldest = refusal.oldest or 1
        self.previous = refusal.previous


@dataclass
class _Cursor:
    """Where a client is: the epoch it reads and the next seq it expects there."""

    epoch: str | None
    next_seq: int | None


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
        self.stale = 0
        self.epoch_changes = 0
        self._left: set[str] = set()
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

    def _request(
        self, op: str, from_seq: int = 0, epoch: str | None = None
    ) -> Iterator[tuple[bytes, bytes]]:
        if self._dealer is None:
            self._dealer = self._ctx.socket(zmq.DEALER)
            self._dealer.linger = 0
            secure_client(self._dealer, self.security)
            self._dealer.connect(self.replay_endpoint)
        self._dealer.send(wire.encode_request(op, from_seq, epoch))
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

    def snapshot(self) -> TotalsSnapshot:
        """Every subscriber's totals and the (epoch, seq) they are current at."""
        for kind, payload in self._request(wire.OP_SNAPSHOT):
            if kind == wire.REPLY_ERROR:
                refusal = wire.decode_refusal(payload)
                raise StreamError(f"replay endpoint refused the snapshot: {refusal.error}")
            if kind != wire.REPLY_SNAPSHOT:
                raise StreamError(f"replay endpoint answered {kind!r} to a snapshot request")
            return wire.decode_snapshot(payload)
        raise StreamError("replay endpoint ended the snapshot reply early")

    def replay(
        self, from_seq: int, to_seq: int | None = None, *, epoch: str | None = None
    ) -> Iterator[wire.UsageMessage]:
        """Journaled messages from `from_seq` to `to_seq` (default: the newest), in order.

        `epoch` None replays the epoch the gateway publishes in now; EpochChanged
        is raised when the gateway does not (or no longer) publish in `epoch`.
        """
        next_seq = max(from_seq, 1)  # seqs start at 1
        stalled = 0
        while to_seq is None or next_seq <= to_seq:
            end: wire.ReplayEnd | None = None
            progress = next_seq
            for kind, payload in self._request(wire.OP_REPLAY, next_seq, epoch):
                if kind == wire.REPLY_MSG:
                    msg = wire.decode_usage(payload)
                    # A reply dropped on the way (slow link, full queue) shows as a jump:
                    # the rest of this answer is read and ignored, and asked for again.
                    if msg.seq != next_seq or (to_seq is not None and msg.seq > to_seq):
                        continue
                    if epoch is None:
                        epoch = msg.epoch
                    next_seq = msg.seq + 1
                    yield msg
                    continue
                if kind == wire.REPLY_ERROR:
                    raise self._refused(wire.decode_refusal(payload), epoch)
                if kind != wire.REPLY_END:
                    raise StreamError(f"replay endpoint answered {kind!r} to a replay request")
                end = wire.decode_end(payload)
                epoch = end.epoch if epoch is None else epoch
            if end is None or next_seq > end.last:
                if to_seq is not None and next_seq <= to_seq:
                    raise StreamError(
                        f"replay endpoint has seqs only up to {end.last if end else None}, "
                        f"{to_seq} was published"
                    )
                return
            stalled = stalled + 1 if next_seq == progress else 0
            if stalled >= 3:
                raise StreamError(f"replay from seq {next_seq} makes no progress; giving up")

    @staticmethod
    def _refused(refusal: wire.Refusal, epoch: str | None) -> StreamError:
        if refusal.code == wire.CODE_GONE:
            return ReplayGone(refusal.error, refusal.oldest or 0, refusal.epoch or "")
        if refusal.code == wire.CODE_EPOCH:
            return EpochChanged(refusal, epoch or "")
        return StreamError(f"replay endpoint refused: {refusal.error}")

    def messages(
        self,
        from_seq: int | None = None,
        *,
        epoch: str | None = None,
        follow: bool = True,
        idle_timeout_ms: int | None = None,
        stop: Callable[[], bool] | None = None,
    ) -> Iterator[wire.UsageMessage]:
        """Every message once, in order: replayed from (`epoch`, `from_seq`), then live.

        Without `from_seq` the stream starts at the first live message; without
        `epoch`, replay starts in the gateway's current epoch. When the gateway
        moved to a new epoch, the rest of the old one is skipped (what the
        gateway can tell of it is logged) and the new epoch follows from seq 1.
        Live reading ends after `idle_timeout_ms` without a message, or when
        `stop()` returns true (checked at least every 200 ms).
        """
        cursor = _Cursor(epoch, from_seq)
        if from_seq is not None:
            yield from self._catch_up(cursor, None)
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
            yield from self._live(cursor, msg)

    def _live(self, cursor: _Cursor, msg: wire.UsageMessage) -> Iterator[wire.UsageMessage]:
        """One live message: dropped as old, or yielded after the gap before it is filled."""
        if msg.epoch in self._left:
            self.stale += 1
            log.info("dropped a late message of epoch %s (seq %d), which ended", msg.epoch, msg.seq)
            return
        if cursor.epoch is not None and msg.epoch != cursor.epoch:
            self._leave(cursor, msg.epoch, f"a live message of epoch {msg.epoch} arrived")
            cursor.next_seq = 1
        cursor.epoch = msg.epoch
        if cursor.next_seq is not None and msg.seq < cursor.next_seq:
            self.duplicates += 1
            return
        if cursor.next_seq is not None and msg.seq > cursor.next_seq:
            log.info(
                "seq gap %d..%d: fetching it from the replay endpoint",
                cursor.next_seq,
                msg.seq - 1,
            )
            try:
                for missed in self.replay(cursor.next_seq, msg.seq - 1, epoch=msg.epoch):
                    self.gaps_filled += 1
                    yield missed
            except EpochChanged as changed:
                # The gateway moved on while the gap was asked for: this message still
                # counts, then the new epoch is read from its start.
                yield msg
                cursor.next_seq = msg.seq + 1
                yield from self._after_change(cursor, changed)
                return
        cursor.next_seq = msg.seq + 1
        yield msg

    def _catch_up(self, cursor: _Cursor, to_seq: int | None) -> Iterator[wire.UsageMessage]:
        """Replay from the cursor on, following the gateway into a new epoch if it moved."""
        try:
            for msg in self.replay(cursor.next_seq or 1, to_seq, epoch=cursor.epoch):
                cursor.epoch, cursor.next_seq = msg.epoch, msg.seq + 1
                yield msg
        except EpochChanged as changed:
            yield from self._after_change(cursor, changed)

    def _after_change(self, cursor: _Cursor, changed: EpochChanged) -> Iterator[wire.UsageMessage]:
        self._leave(cursor, changed.epoch, changed.args[0])
        cursor.epoch, cursor.next_seq = changed.epoch, 1
        yield from self._catch_up(cursor, None)

    def _leave(self, cursor: _Cursor, new_epoch: str, why: str) -> None:
        if cursor.epoch is not None:
            self._left.add(cursor.epoch)
        self.epoch_changes += 1
        log.warning(
            "gateway %s: epoch %s ends for this client at seq %s, epoch %s begins: %s",
            self.gateway_id or "",
            cursor.epoch,
            None if cursor.next_seq is None else cursor.next_seq - 1,
            new_epoch,
            why,
        )

    def records(
        self,
        from_seq: int | None = None,
        *,
        epoch: str | None = None,
        follow: bool = True,
        idle_timeout_ms: int | None = None,
    ) -> Iterator[wire.UsageRecord]:
        """`messages()` flattened to one record per subscriber and interval."""
        for msg in self.messages(
            from_seq, epoch=epoch, follow=follow, idle_timeout_ms=idle_timeout_ms
        ):
            yield from msg.records()
