"""The hub collector: the stream's shared durable consumer, into PostgreSQL, acked after commit.

Any number of collector processes pull from the one durable consumer
`desanet-collector` (explicit acks): JetStream hands each fetched batch to
one of them. A batch is checked, stored in one PostgreSQL transaction
(fleet_store.HubStore), and only then acknowledged, message by message. A
collector that dies before its acks loses nothing: after `ack_wait` the
hub delivers those messages again, to any collector, and storing them twice
changes nothing.

Each message is checked against the identity its publisher could not forge:
the subject `desanet.usage.<gw>` (the hub lets gateway gw publish only there)
must name the message's `gw`, and `Nats-Msg-Id` must be `<gw>:<epoch>:<seq>`
of the same seq. A message that fails is logged and terminated (never
redelivered); it is not stored.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import nats
import nats.js.errors
from nats.aio.msg import Msg
from nats.js.api import AckPolicy, ConsumerConfig, DeliverPolicy
from nats.js.client import JetStreamContext

from desanet.errors import ConfigError, StreamError
from desanet.meter.fleet import (
    CONSUMER,
    MSG_ID_HEADER,
    STREAM,
    USAGE_PREFIX,
    USAGE_SUBJECTS,
    FleetConnection,
    ensure_stream,
    parse_message_id,
)
from desanet.meter.fleet_store import HubStore, StoredUsage
from desanet.meter.wire import decode_usage

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class CollectorConfig:
    """Batch size and timing of one collector process."""

    batch: int = 500
    fetch_timeout_s: float = 1.0
    ack_wait_s: float = 30.0
    max_ack_pending: int = 50_000
    idle_exit_s: float | None = None
    retry_s: float = 2.0
    # 0: as many as the stream. Each ack of a replicated consumer is a Raft write: on the
    # development machine one collector stored 25k rows/s from an R3 consumer and 77k
    # from an R1 one, which stalls (loses nothing) while its one node is down.
    consumer_replicas: int = 0


@dataclass
class CollectorStats:
    """What one collector process stored."""

    messages: int = 0
    rows: int = 0
    rejected: int = 0
    failed_batches: int = 0


def decode_stored(subject: str, headers: Mapping[str, str] | None, data: bytes) -> StoredUsage:
    """Check one stream message's identity and decode it; raises StreamError saying why not."""
    if not subject.startswith(USAGE_PREFIX):
        raise StreamError(f"message on {subject!r}, not under {USAGE_PREFIX}")
    publisher = subject[len(USAGE_PREFIX) :]
    msg_id = (headers or {}).get(MSG_ID_HEADER)
    if not msg_id:
        raise StreamError(f"message on {subject} has no {MSG_ID_HEADER} header")
    gw, epoch, seq = parse_message_id(msg_id)
    msg = decode_usage(data)
    if not (gw == msg.gw == publisher):
        raise StreamError(
            f"message on {subject} says gateway {msg.gw!r} (id {msg_id}): "
            f"gateway {publisher} may speak only for itself"
        )
    if seq != msg.seq:
        raise StreamError(f"message id {msg_id} on {subject} holds seq {msg.seq}")
    # The store keeps one row per (message, subscriber) by storing each message once.
    if len(set(msg.sub)) != len(msg.sub):
        raise StreamError(f"message {msg_id} on {subject} names a subscriber twice")
    # Messages journaled before stream epochs carry none: the id names it alone.
    if msg.epoch and msg.epoch != epoch:
        raise StreamError(f"message id {msg_id} on {subject} holds epoch {msg.epoch!r}")
    return StoredUsage(epoch, msg)


def consumer_config(config: CollectorConfig) -> ConsumerConfig:
    """The shared durable pull consumer: every message from the start, acked one by one.

    Made by the first collector; later ones share it as it is (its settings stay).
    """
    return ConsumerConfig(
        durable_name=CONSUMER,
        name=CONSUMER,
        deliver_policy=DeliverPolicy.ALL,
        ack_policy=AckPolicy.EXPLICIT,
        ack_wait=config.ack_wait_s,
        max_deliver=-1,
        max_ack_pending=config.max_ack_pending,
        filter_subject=USAGE_SUBJECTS,
        num_replicas=config.consumer_replicas,
    )


class Collector:
    """One collector process's loop: fetch, check, store, ack; `stop()` ends it after a batch."""

    def __init__(
        self,
        connection: FleetConnection,
        dsn: str,
        config: CollectorConfig | None = None,
        stream_config: dict[str, Any] | None = None,
    ) -> None:
        self.connection = connection
        self.dsn = dsn
        self.config = config or CollectorConfig()
        self.stream_config = stream_config
        self.stats = CollectorStats()
        self._stop = asyncio.Event()

    def stop(self) -> None:
        """End the loop once the batch in hand is stored and acked (call on its event loop)."""
        self._stop.set()

    async def run(self) -> CollectorStats:
        """Collect until stopped (or idle for `idle_exit_s`); returns what was stored."""
        store = await HubStore.connect(self.dsn)
        try:
            nc = await nats.connect(**self.connection.connect_options(), error_cb=self._on_error)
            try:
                sub = await self._subscribe(nc.jetstream())
                if sub is not None:
                    log.info("collector %s: consuming %s", self.connection.name, STREAM)
                    await self._loop(sub, store)
            finally:
                await nc.close()
        finally:
            await store.close()
        return self.stats

    async def _subscribe(self, js: JetStreamContext) -> Any:
        """The pull subscription on the shared consumer, retried while the hub cannot answer.

        A hub that is starting, or electing leaders after a node died, times out
        JetStream API requests for a while; None if stopped meanwhile.
        """
        while not self._stop.is_set():
            try:
                await ensure_stream(js, self.stream_config)
                return await js.pull_subscribe(
                    USAGE_SUBJECTS, CONSUMER, STREAM, config=consumer_config(self.config)
                )
            except (
                nats.errors.TimeoutError,
                nats.errors.NoRespondersError,
                nats.js.errors.ServiceUnavailableError,
            ) as err:
                log.warning("collector: the hub does not answer yet (%s); retrying", err)
                await asyncio.sleep(self.config.retry_s)
        return None

    async def _loop(self, sub: Any, store: HubStore) -> None:
        cfg = self.config
        idle_since = time.monotonic()
        while not self._stop.is_set():
            try:
                msgs: list[Msg] = await sub.fetch(cfg.batch, timeout=cfg.fetch_timeout_s)
            except TimeoutError:  # nats-py raises its own or asyncio's
                if cfg.idle_exit_s is not None and time.monotonic() - idle_since > cfg.idle_exit_s:
                    return
                continue
            except nats.errors.Error as err:
                # The hub is away (nats-py reconnects by itself): ask again shortly.
                log.debug("collector: fetch failed: %s", err)
                await asyncio.sleep(cfg.fetch_timeout_s)
                continue
            idle_since = time.monotonic()
            batch: list[StoredUsage] = []
            good: list[Msg] = []
            for msg in msgs:
                try:
                    batch.append(decode_stored(msg.subject, msg.headers, msg.data))
                    good.append(msg)
                except StreamError as err:
                    log.error("collector: rejected a message: %s", err)
                    self.stats.rejected += 1
                    await msg.term()
            try:
                rows = await store.store(batch)
            except StreamError as err:
                # Given back unstored: the hub delivers it again, maybe to another collector.
                log.error("collector: %s; reconnecting in %s s", err, cfg.retry_s)
                self.stats.failed_batches += 1
                for msg in good:
                    await msg.nak()
                store = await self._reconnect(store)
                continue
            for msg in good:
                await msg.ack()
            self.stats.messages += len(good)
            self.stats.rows += rows

    async def _reconnect(self, store: HubStore) -> HubStore:
        """A new PostgreSQL connection, retried until it works (a restart of the database)."""
        await store.close()
        while not self._stop.is_set():
            await asyncio.sleep(self.config.retry_s)
            try:
                return await HubStore.connect(self.dsn)
            except ConfigError as err:
                log.error("collector: %s; retrying in %s s", err, self.config.retry_s)
        raise StreamError("collector stopped while PostgreSQL was unreachable")

    async def _on_error(self, err: Exception) -> None:
        log.warning("collector %s: NATS: %s", self.connection.name, err)
