# Over 400 lines: journaling, marking and publishing one message are one ordered sequence, kept in
# one place so the order that makes it exact is visible.
"""The gateway side of the usage stream: journal, publish, replay, all in one object.

The gateway's service loop owns the poll timer and calls `publish(interval,
aggregator.state())` once per interval. `MeterService` numbers the message,
journals it together with the aggregator state change (fsync), records it in
the published mark, then publishes it; every `snapshot_every` intervals it
also publishes a full snapshot of the totals. On construction it recovers the
epoch, seq, totals and the aggregator state (meter.recovery): the same epoch
when its files agree, else a new epoch carrying the newest state it could
rebuild. Pass `restored_state` to `Aggregator.restore` either way.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import threading
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
import zmq
from zmq.auth.thread import ThreadAuthenticator

from desanet.clock import now_ms
from desanet.cython_ext.usage import UsageInterval
from desanet.errors import StreamError
from desanet.meter import replay, wire
from desanet.meter.epoch import PublishedMark, write_mark
from desanet.meter.journal import Retention
from desanet.meter.keys import ServerSecurity, secure_server, start_authenticator
from desanet.meter.limits import ConnectionLimiter, EndpointLimits, apply_limits
from desanet.meter.recovery import recover
from desanet.meter.state import Checkpoint, StateArrays, encode_state_change

log = logging.getLogger(__name__)

# What the usage socket receives: handshakes and subscriptions (`usage.<gateway id>`).
USAGE_MAX_FRAME_BYTES = 4096
# Subscription notices drained per call, so a peer flooding them cannot hold the lock.
_DRAIN_MAX = 10_000


@dataclass(frozen=True)
class StreamConfig:
    """Endpoints, security, cadence and limits of the usage stream ([publish] in gateway.toml).

    `max_connections` and `handshake_ms` hold for each endpoint (meter.limits).
    """

    usage_endpoint: str
    replay_endpoint: str
    security: ServerSecurity
    retention: Retention = field(default_factory=Retention)
    snapshot_every: int = 60
    checkpoint_every: int = 300
    send_hwm: int = 10_000
    max_connections: int = 64
    handshake_ms: int = 10_000
    # How often the replay thread wakes with nothing to do (subscription notices, stop):
    # nothing on a gateway; a simulator of a thousand gateways in one process sets it higher.
    idle_poll_ms: int = 100


@dataclass(frozen=True)
class StreamStats:
    """Counters of the stream for status and metrics."""

    epoch: str
    seq: int
    dropped_messages: int
    replay_requests: int
    replay_errors: int
    replay_dropped_replies: int
    connections: dict[str, int]
    refused_connections: dict[str, int]
    journal_bytes: int = 0  # what the journal holds now, against its retention's max_bytes
    journal_max_bytes: int = 0
    journal_first_seq: int = 0


class MeterService:
    """Journals and publishes usage intervals and serves replay; recovers on construction."""

    def __init__(
        self,
        gateway_id: str,
        state_dir: Path,
        config: StreamConfig,
        subscribers: Mapping[int, str],
    ) -> None:
        if not gateway_id:
            raise StreamError("the usage stream needs a gateway id ([gateway] id)")
        self.gateway_id = gateway_id
        self.config = config
        self.state_dir = Path(state_dir)
        self.dropped = 0
        self._lock = threading.Lock()
        self._topic = wire.topic(gateway_id)
        self._ids: npt.NDArray[np.object_] = np.empty(0, dtype=object)
        self._mapped: npt.NDArray[np.bool_] = np.empty(0, dtype=bool)
        # Totals of mapped slots live in arrays (cheap per interval); `_totals` holds the rest
        # (recovered, or whose slot was reassigned) and `_all_totals()` merges both.
        self._slot_totals: npt.NDArray[np.uint64] = np.zeros((0, 2), dtype=np.uint64)
        self._has_total: npt.NDArray[np.bool_] = np.empty(0, dtype=bool)
        self._totals: dict[str, tuple[int, int]] = {}
        self.set_subscribers(subscribers)
        self._intervals = 0
        self._last_drop_log = 0.0
        rec = recover(self.state_dir, gateway_id, config.retention, now_ms())
        self.epoch = rec.epoch
        self.previous = rec.previous
        self.new_epoch_reason = rec.new_epoch_reason
        self.journal = rec.journal
        self._mark_dir = rec.directory
        self._checkpoints = rec.checkpoints
        self._seq, self._t1, self._state = rec.seq, rec.t1_ms, rec.state
        self._totals = dict(rec.totals)
        self.restored_state: StateArrays | None = (
            None if self._state is None else {k: v.copy() for k, v in self._state.items()}
        )
        self._ctx: zmq.Context[zmq.Socket[bytes]] = zmq.Context()
        self._auth: ThreadAuthenticator | None = None
        self._pub: zmq.Socket[bytes] | None = None
        self._pub_limiter: ConnectionLimiter | None = None
        self._replay: replay.ReplayServer | None = None
        try:
            self._open_sockets()
        except BaseException:
            self._close_sockets()
            raise

    def _open_sockets(self) -> None:
        config = self.config
        self._auth = start_authenticator(self._ctx, config.security)
        # XPUB, not PUB: with XPUB_NODROP a full subscriber queue is reported, so it is counted.
        pub = self._pub = self._ctx.socket(zmq.XPUB)
        pub.linger = 1000
        apply_limits(
            pub,
            EndpointLimits(
                USAGE_MAX_FRAME_BYTES,
                config.max_connections,
                receive_hwm=64,
                send_hwm=config.send_hwm,
                handshake_ms=config.handshake_ms,
            ),
        )
        pub.xpub_nodrop = True
        # Heartbeats let the gateway drop billing connections that died on the link.
        pub.heartbeat_ivl = 10_000
        pub.heartbeat_timeout = 30_000
        self._pub_limiter = ConnectionLimiter(pub, "usage", config.max_connections)
        secure_server(pub, config.security, config.usage_endpoint)
        try:
            pub.bind(config.usage_endpoint)
        except zmq.ZMQError as err:
            raise StreamError(
                f"cannot bind the usage endpoint {config.usage_endpoint}: {err}"
            ) from err
        self.usage_endpoint = str(pub.getsockopt_string(zmq.LAST_ENDPOINT))
        self._pub_limiter.bound(self.usage_endpoint)
        replay_limits = dataclasses.replace(
            replay.LIMITS, max_connections=config.max_connections, handshake_ms=config.handshake_ms
        )
        self._replay = replay.ReplayServer(
            self._ctx,
            config.replay_endpoint,
            config.security,
            self.journal,
            self.snapshot,
            previous=self.previous,
            limits=replay_limits,
            watch=[self._pub_limiter],
            tick=self._drain_subscriptions,
            poll_ms=config.idle_poll_ms,
        )
        self.replay_endpoint = self._replay.endpoint

    @property
    def last_seq(self) -> int:
        """The seq of the newest journaled message of this epoch (0 before the first)."""
        return self._seq

    @property
    def last_t1_ms(self) -> int:
        """The end stamp of the newest journaled interval (0 before the first)."""
        return self._t1

    def set_subscribers(self, subscribers: Mapping[int, str]) -> None:
        """Replace the slot -> subscriber id mapping (after a provisioning change)."""
        size = max(subscribers, default=-1) + 1
        ids: npt.NDArray[np.object_] = np.full(size, None, dtype=object)
        mapped = np.zeros(size, dtype=bool)
        for slot, sub in subscribers.items():
            ids[slot] = sub
            mapped[slot] = True
        with self._lock:
            self._totals = self._all_totals()
            self._ids, self._mapped = ids, mapped
            self._slot_totals = np.zeros((size, 2), dtype=np.uint64)
            self._has_total = np.zeros(size, dtype=bool)

    def _all_totals(self) -> dict[str, tuple[int, int]]:
        totals = dict(self._totals)
        slots = np.flatnonzero(self._has_total)
        values = self._slot_totals[slots].tolist()
        totals.update(zip(self._ids[slots].tolist(), map(tuple, values), strict=True))
        return totals

    def publish(
        self,
        interval: UsageInterval,
        aggregator_state: Mapping[str, Any],
        events: Sequence[wire.UsageEvent] = (),
        drops: Mapping[str, tuple[int, int]] | None = None,
    ) -> int:
        """Journal then publish one interval and the events it saw; returns its seq.

        Slot 0 (traffic of no subscriber) and the datapath's cumulative `drops`
        (reason -> packets, IP bytes) go in the key `unprovisioned`, never in `sub`.

        Raises StreamError if the message could not be journaled (nothing was
        sent), or journaled but not marked published (it is not sent live, and
        clients get it by replay).
        """
        state = {k: np.array(v, copy=True) for k, v in aggregator_state.items()}
        with self._lock:
            if self._pub is None:
                raise StreamError("the usage stream is closed: nothing was journaled")
            slots = interval.slots.astype(np.int64, copy=False)
            mask = slots < self._mapped.shape[0]
            mask[mask] = self._mapped[slots[mask]]
            if not mask.all():
                unknown = slots[~mask]
                unknown = unknown[unknown != 0]
                if unknown.size:
                    log.warning("usage for unmapped slots %s not published", unknown[:10].tolist())
            sub_list: list[str] = self._ids[slots[mask]].tolist()
            columns = {name: getattr(interval, name)[mask].tolist() for name in wire.COLUMNS}
            seq = self._seq + 1
            message = wire.encode_usage(
                self.gateway_id,
                seq,
                interval.t0_ms,
                interval.t1_ms,
                sub_list,
                columns,
                epoch=self.epoch,
                events=events,
                unprovisioned=unprovisioned_counters(interval, drops),
            )
            self.journal.append(seq, message, encode_state_change(self._state, state))
            self._seq, self._state = seq, state
            moved = slots[mask]
            self._slot_totals[moved, 0] = interval.up_total[mask]
            self._slot_totals[moved, 1] = interval.down_total[mask]
            self._has_total[moved] = True
            self._t1 = max(self._t1, interval.t1_ms)
            self._mark_and_send(seq, message)
            self._intervals += 1
            if self._intervals % self.config.snapshot_every == 0:
                self._publish_snapshot()
            if self._seq - self._checkpoints.latest_seq >= self.config.checkpoint_every:
                self._save_checkpoint()
        return seq

    def publish_snapshot(self) -> int:
        """Journal and publish a full snapshot of every subscriber's totals now; returns its seq."""
        with self._lock:
            if self._pub is None:
                raise StreamError("the usage stream is closed: nothing was journaled")
            self._publish_snapshot()
            return self._seq

    def _publish_snapshot(self) -> None:
        totals = self._all_totals()
        subs = list(totals)
        zeros = [0] * len(subs)
        columns = {
            "up": zeros,
            "down": zeros,
            "up_pkts": zeros,
            "down_pkts": zeros,
            "up_total": [totals[s][0] for s in subs],
            "down_total": [totals[s][1] for s in subs],
        }
        seq = self._seq + 1
        message = wire.encode_usage(
            self.gateway_id, seq, self._t1, self._t1, subs, columns, epoch=self.epoch, snapshot=True
        )
        self.journal.append(seq, message, b"")
        self._seq = seq
        self._mark_and_send(seq, message)

    def _mark_and_send(self, seq: int, message: bytes) -> None:
        # The mark is durable before the message leaves: a seq that anyone may have seen is
        # never published again in this epoch, even if the journal later loses it.
        write_mark(self._mark_dir, self.gateway_id, PublishedMark(self.epoch, seq))
        self._send(message)

    def _send(self, message: bytes) -> None:
        pub = self._pub
        if pub is None:
            raise StreamError("the usage stream is closed")
        self._drain_locked(pub)
        frames = [self._topic, message]
        try:
            pub.send_multipart(frames, zmq.NOBLOCK)
        except zmq.Again:
            # A subscriber's queue is full (send_hwm): the others still get the message, that
            # one recovers it by seq from the replay endpoint; the loss is counted and logged.
            self.dropped += 1
            pub.xpub_nodrop = False
            try:
                pub.send_multipart(frames, zmq.NOBLOCK)
            finally:
                pub.xpub_nodrop = True
            now = time.monotonic()
            if now - self._last_drop_log >= 60.0:
                self._last_drop_log = now
                log.warning(
                    "usage stream: a subscriber's queue is full (%d messages); %d messages "
                    "dropped for slow subscribers so far (they recover them by replay)",
                    self.config.send_hwm,
                    self.dropped,
                )

    def _drain_subscriptions(self) -> None:
        """Take the XPUB's subscription notices (the replay thread calls it every round)."""
        with self._lock:
            if self._pub is not None:
                self._drain_locked(self._pub)

    @staticmethod
    def _drain_locked(pub: zmq.Socket[bytes]) -> None:
        # Subscriptions themselves are kept by libzmq; the notices only queue up unread.
        for _ in range(_DRAIN_MAX):
            try:
                pub.recv(zmq.NOBLOCK)
            except zmq.Again:
                return

    def snapshot(self) -> wire.TotalsSnapshot:
        """Every subscriber's totals and the (epoch, seq) they are current at."""
        with self._lock:
            return wire.TotalsSnapshot(
                self.gateway_id, self.epoch, self._seq, self._t1, self._all_totals()
            )

    def stats(self) -> StreamStats:
        """The stream's counters now."""
        server, pub = self._replay, self._pub_limiter
        limiters = [x for x in (pub, server.limiter if server is not None else None) if x]
        return StreamStats(
            self.epoch,
            self._seq,
            self.dropped,
            server.requests if server is not None else 0,
            server.errors if server is not None else 0,
            server.dropped_replies if server is not None else 0,
            {x.name: x.connections for x in limiters},
            {x.name: x.refused for x in limiters},
            self.journal.size_bytes,
            self.journal.retention.max_bytes,
            self.journal.first_seq,
        )

    def _save_checkpoint(self) -> None:
        totals = {k: list(v) for k, v in self._all_totals().items()}
        ckpt = Checkpoint(self.epoch, self._seq, self._t1, self._state, totals, self.previous)
        self._checkpoints.save(ckpt)
        self.journal.prune(self._checkpoints.oldest_seq)

    def close(self) -> None:
        """Checkpoint, stop the replay thread, close sockets and the journal."""
        with self._lock:
            if self._pub is None:
                return
            self._save_checkpoint()
        self._close_sockets()

    def _close_sockets(self) -> None:
        with self._lock:
            pub, self._pub = self._pub, None
        if pub is not None:
            # Monitor events need a reader until the monitor is off (meter.limits).
            pub.disable_monitor()
        if self._replay is not None:
            self._replay.close()
            self._replay = None
        elif self._pub_limiter is not None:
            self._pub_limiter.close()
        if pub is not None:
            pub.close()
        if self._auth is not None:
            self._auth.stop()
            self._auth = None
        with contextlib.suppress(zmq.ZMQError):
            self._ctx.term()
        self.journal.close()


def unprovisioned_counters(
    interval: UsageInterval, drops: Mapping[str, tuple[int, int]] | None
) -> dict[str, int]:
    """The `unprovisioned` map of one message: slot 0's row of the interval, drops by reason."""
    counters: dict[str, int] = {}
    rows = np.flatnonzero(interval.slots == 0)
    if rows.size:
        counters = {name: int(getattr(interval, name)[rows[0]]) for name in wire.COLUMNS}
    for reason, (packets, ip_bytes) in (drops or {}).items():
        if packets:
            counters[f"drop_{reason}_pkts"] = packets
            counters[f"drop_{reason}_bytes"] = ip_bytes
    return counters
