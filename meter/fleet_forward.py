# Over 400 lines: the window, the acks, the reconnects and the control replies share one event
# loop's state; split, each part would reach into the others.
"""The gateway's forwarder: every journaled usage message, in seq order, to the hub's JetStream.

The journal is the outbox. The forwarder reads it from the first message the
hub has not acknowledged, publishes each message's bytes unchanged to
`desanet.usage.<gw>` with `Nats-Msg-Id` = `<gw>:<epoch>:<seq>`, and keeps up
to `window` publishes in flight, so a 600 ms satellite round trip still
carries thousands of messages a second. The cursor (the last seq below which
every message is acknowledged) moves only on acknowledgements and is written
durably every `save_interval_s` and on stop, in a worker thread (the fsyncs
never hold up the event loop's acknowledgements). After an outage, a lost ack, or
a restart it republishes from the cursor: JetStream drops the copies it
already holds within its duplicate window, and the hub collector is
idempotent on (gw, epoch, seq, sub) beyond it.

Async beside a sync loop: one nats-py client whose event loop runs in this
object's own thread. The service loop only calls `notify()` after it journals
(a non-blocking wake-up), reads `status()`, and calls `stop()`; with a control
inbox (fleet_control) the same connection also takes the gateway's control
requests, which cross to the service loop through that inbox's queue only.
Where to resume in the journal is fleet_outbox's job.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import json
import logging
import threading
import time
from collections.abc import Iterable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import nats
from nats.aio.client import Client
from nats.aio.msg import Msg

from desanet.errors import StreamError
from desanet.meter.compact import CompactionPolicy, compact_journal
from desanet.meter.fleet import (
    MSG_ID_HEADER,
    FleetConnection,
    control_subject,
    message_id,
    usage_subject,
)
from desanet.meter.fleet_control import MAX_PENDING, PENDING_BYTES, ControlInbox
from desanet.meter.fleet_outbox import Cursor, message_meta, resume
from desanet.meter.journal import Journal

log = logging.getLogger(__name__)

REFUSED_PAUSE_S = 0.25


@dataclass(frozen=True)
class ForwarderConfig:
    """How hard the forwarder pushes: publishes in flight, journal read size, timeouts."""

    window: int = 1024
    # Bytes in flight at most: a 2 Mbit/s link carries 1 MiB in 4 s, well inside ack_timeout_s.
    window_bytes: int = 1 << 20
    read_batch: int = 256
    ack_timeout_s: float = 10.0
    save_interval_s: float = 0.5
    stop_grace_s: float = 2.0
    retry_s: float = 1.0
    # Journal compaction (meter.compact) every this many s; None: never.
    compact_every_s: float | None = 60.0
    compaction: CompactionPolicy = field(default_factory=CompactionPolicy)
    # The sent mark is raised this far ahead at a time: one fsync per this many publishes.
    sent_ahead: int = 4096


@dataclass(frozen=True)
class ForwarderStatus:
    """What the forwarder is doing, for `desanet status` and the tests."""

    connected: bool = False
    server: str | None = None
    acked_seq: int = 0
    in_flight: int = 0
    max_in_flight: int = 0
    published: int = 0
    republished: int = 0
    compacted_groups: int = 0
    compacted_bytes: int = 0
    last_error: str | None = None


@dataclass
class _InFlight:
    epoch: str
    future: asyncio.Future[int]  # the stream seq JetStream stored it at
    sent: float
    size: int = 0


class Forwarder:
    """Forwards one gateway's journal to the hub from its own thread (see the module doc)."""

    def __init__(
        self,
        gateway_id: str,
        journal: Journal,
        cursor_path: Path,
        connection: FleetConnection,
        config: ForwarderConfig | None = None,
        epoch: str | None = None,
        loop: asyncio.AbstractEventLoop | None = None,
        control: ControlInbox | None = None,
    ) -> None:
        """`loop`: run on this event loop (running in another thread) instead of an own one.

        `control`: serve `desanet.control.<gateway id>` into this inbox on every connection.

        A gateway has one forwarder with its own loop and thread; the fleet simulator
        runs hundreds of gateways' forwarders on one loop.
        """
        self.gateway_id = gateway_id
        self.subject = usage_subject(gateway_id)
        self.journal = journal
        self.cursor_path = Path(cursor_path)
        self.config = config or ForwarderConfig()
        self._fallback_epoch = epoch
        self._options = connection.connect_options()  # bad credentials or CA fail here
        self._cursor = Cursor.load(self.cursor_path)
        self._saved = self._cursor
        self._loaded = self._cursor
        self._sent = 0  # set at resume: at or above every seq published in this journal life
        self._saved_sent: int | None = Cursor.load_sent(self.cursor_path)
        self._compacting = False
        self._resumed = False
        self._finished: set[int] = set()
        self._compact_task: asyncio.Task[None] | None = None
        self._status = ForwarderStatus(acked_seq=self._cursor.seq)
        self._status_lock = threading.Lock()
        self.control = control
        if control is not None:
            control.bind(self._send_reply)
        self._failure: BaseException | None = None
        self._own_loop = loop is None
        self._loop = loop or asyncio.new_event_loop()
        self._thread = threading.Thread(
            target=self._loop.run_forever, name=f"fleet-{gateway_id}", daemon=True
        )
        self._done: concurrent.futures.Future[None] | None = None
        # Everything below belongs to the event loop.
        self._wake = asyncio.Event()
        self._stopping = False
        self._outage_logged = False
        self._task: asyncio.Task[None] | None = None
        self._nc: Client | None = None
        self._connection_id = 0  # a control reply goes back only on the connection it came on
        self._ack_prefix = ""
        self._server_index = 0
        self._refused = False
        self._in_flight: dict[int, _InFlight] = {}  # insertion order is seq order
        self._in_flight_bytes = 0
        self._next_seq = 1
        self._last_save = 0.0
        self._save_lock = asyncio.Lock()  # one cursor write at a time, never an older one last
        self._save_task: asyncio.Task[None] | None = None

    # -- the service loop's side ------------------------------------------------------------

    def start(self) -> None:
        """Start forwarding (in its own thread unless given a loop); it catches up by itself."""
        if self._own_loop:
            self._thread.start()
        self._done = asyncio.run_coroutine_threadsafe(self._run(), self._loop)

    def running(self) -> bool:
        """True from start() until the forwarder stopped or failed."""
        return self._done is not None and not self._done.done()

    def notify(self) -> None:
        """Tell the forwarder the journal grew (never blocks; safe from any thread)."""
        with contextlib.suppress(RuntimeError):  # the loop is closed: the forwarder stopped
            self._loop.call_soon_threadsafe(self._wake.set)

    def progress(self) -> dict[str, Any]:
        """For the service's status file: the last seq the hub acknowledged, and the link."""
        status = self.status()
        return {
            "name": "fleet",
            "acked_seq": status.acked_seq,
            "connected": status.connected,
            "error": status.last_error or "",
        }

    def status(self) -> ForwarderStatus:
        """A snapshot of the forwarder's status."""
        with self._status_lock:
            return self._status

    @property
    def acked_seq(self) -> int:
        """Every message up to this seq is on the hub: journal retention may drop them."""
        return self.status().acked_seq

    def delivered_seq(self) -> int:
        """What the journal must keep beyond (Journal.hold): 0 until resumed in this journal."""
        return self.acked_seq if self._resumed else 0

    def wait_acked(self, seq: int, timeout_s: float) -> bool:
        """Block until every message up to `seq` is acknowledged, or `timeout_s` passed."""
        deadline = time.monotonic() + timeout_s
        while self.acked_seq < seq and time.monotonic() < deadline and self.running():
            time.sleep(0.02)
        return self.acked_seq >= seq

    def stop(self, timeout_s: float = 10.0) -> None:
        """Wait briefly for the acks in flight, save the cursor, close the connection, join."""
        if self._done is not None and not self._done.done():
            self._loop.call_soon_threadsafe(self._request_stop)
            try:
                self._done.result(timeout_s)
            except concurrent.futures.TimeoutError:
                raise StreamError(f"fleet forwarder did not stop within {timeout_s} s") from None
        if self._own_loop and not self._loop.is_closed():
            if self._thread.is_alive():
                self._loop.call_soon_threadsafe(self._loop.stop)
                self._thread.join(timeout_s)
            self._loop.close()
        if self._failure is not None:
            raise StreamError(f"fleet forwarder failed: {self._failure}") from self._failure

    # -- the forwarder's thread -------------------------------------------------------------

    def _set_status(self, **changes: Any) -> None:
        with self._status_lock:
            self._status = replace(self._status, **changes)

    async def _run(self) -> None:
        self._task = asyncio.current_task()
        try:
            await self._main()
        except asyncio.CancelledError:
            pass  # stopped while still connecting
        except Exception as err:
            log.exception("fleet forwarder of %s stopped", self.gateway_id)
            self._failure = err
            self._set_status(last_error=str(err))

    def _request_stop(self) -> None:
        self._stopping = True
        self._wake.set()
        if self._task is not None and self._nc is None:
            self._task.cancel()  # still connecting: nothing is in flight

    async def _main(self) -> None:
        self._cursor = await asyncio.to_thread(
            resume, self.journal, self._cursor, self._fallback_epoch
        )
        self._next_seq = self._cursor.seq + 1
        self._sent = self._resumed_sent()
        self._set_status(acked_seq=self._cursor.seq)
        self._resumed = True
        if self.config.compact_every_s is not None:
            self._compact_task = asyncio.ensure_future(self._compact_loop())
        try:
            while not self._stopping:
                self._nc = nc = await self._connect()
                if nc is None:
                    return
                self._connection_id += 1
                try:
                    await self._serve(nc)
                finally:
                    self._nc = None
                    self._server_index += 1  # after a failure, try the next server first
                    self._rewind("connection closed")
                    await nc.close()
                    self._set_status(connected=False, server=None)
        finally:
            if self._compact_task is not None:
                self._compact_task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await self._compact_task
            await self._save()

    def _resumed_sent(self) -> int:
        """The sent mark of the journal life resumed (Cursor.save says what it is for)."""
        loaded, cursor = self._loaded, self._cursor
        if loaded.epoch is None or loaded.epoch != cursor.epoch:
            return cursor.seq  # a new life: nothing of it was published
        if self._saved_sent is None:
            return max(cursor.seq, self.journal.last_seq)  # unknown: assume all of it
        return max(cursor.seq, self._saved_sent)

    async def _raise_sent(self, upto: int) -> None:
        """Durably move the sent mark to at least `upto` before anything up to it is read."""
        if upto > self._sent:
            self._sent = upto + self.config.sent_ahead
            await self._save()

    async def _compact_loop(self) -> None:
        """Every compact_every_s: compact the journal above the sent mark, publishing paused."""
        every = self.config.compact_every_s or 60.0
        while not self._stopping:
            await asyncio.sleep(every)
            self._compacting = True  # no read starts until it is done; the sent mark holds
            try:
                result = await asyncio.to_thread(
                    compact_journal,
                    self.journal,
                    int(time.time() * 1000),
                    self._sent,
                    self._finished,
                    self.config.compaction,
                )
            except StreamError as err:
                log.error("fleet: journal compaction failed: %s", err)
                continue
            finally:
                self._compacting = False
                self._wake.set()
            if result.groups:
                st = self.status()
                self._set_status(
                    compacted_groups=st.compacted_groups + result.groups,
                    compacted_bytes=st.compacted_bytes + result.bytes_saved,
                )
                log.info(
                    "fleet: compacted %d minutes of backlog in %d segments, %d bytes freed",
                    result.groups,
                    result.segments,
                    result.bytes_saved,
                )

    async def _connect(self) -> Client | None:
        """A new connection to the first hub server that answers; None when stopping.

        Each connection is new rather than nats-py's reconnect: a reconnected client
        would first flush publishes it buffered while away, ahead of the resend from
        the cursor, and the stream would hold them out of seq order.
        """
        options = self._options | {"allow_reconnect": False, "max_reconnect_attempts": 0}
        servers = self._options["servers"]
        while not self._stopping:
            for _ in servers:
                self._server_index %= len(servers)
                url = servers[self._server_index]
                try:
                    nc = await nats.connect(
                        **options | {"servers": [url]},
                        error_cb=self._on_error,
                        closed_cb=self._on_closed,
                    )
                except (OSError, TimeoutError, nats.errors.Error) as err:
                    await self._on_error(err)
                    self._server_index += 1
                    continue
                self._outage_logged = False
                self._set_status(connected=True, server=_url(nc))
                log.info("fleet: %s connected to %s", self.gateway_id, _url(nc))
                return nc
            self._wake.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), self.config.retry_s)
        return None

    async def _serve(self, nc: Client) -> None:
        """Forward over `nc` until it closes or the forwarder stops."""
        cfg = self.config
        # Acks come back to <own inbox>.<nuid>.<seq>: one subscription for the whole window.
        self._ack_prefix = nc.new_inbox()
        await nc.subscribe(self._ack_prefix + ".*", cb=self._on_ack)
        if self.control is not None:
            await nc.subscribe(
                control_subject(self.gateway_id),
                cb=self._on_control,
                pending_msgs_limit=MAX_PENDING,
                pending_bytes_limit=PENDING_BYTES,
            )
        while not self._stopping:
            if not nc.is_connected:
                log.warning("fleet: %s lost the hub; reconnecting", self.gateway_id)
                return
            await self._fill(nc)
            await self._wait()
            self._collect()
            if self._refused:
                # The stream has no leader for a moment (an election): do not spin.
                self._refused = False
                await asyncio.sleep(REFUSED_PAUSE_S)
            oldest = next(iter(self._in_flight.items()), None)
            if oldest is not None and time.monotonic() - oldest[1].sent > cfg.ack_timeout_s:
                if await self._answers(nc):
                    # Alive but slow, or the ack was lost in a leader change: resend here. A
                    # new connection would add a TLS handshake to a loaded hub and nothing else.
                    log.info(
                        "fleet: %s got no acknowledgement of seq %d in %s s; the server answers",
                        self.gateway_id,
                        oldest[0],
                        cfg.ack_timeout_s,
                    )
                    self._rewind(f"no acknowledgement of seq {oldest[0]}")
                    continue
                # A hung server keeps its TCP connection: leave it for the next one.
                log.warning(
                    "fleet: %s got no acknowledgement of seq %d in %s s from %s; reconnecting",
                    self.gateway_id,
                    oldest[0],
                    cfg.ack_timeout_s,
                    _url(nc),
                )
                return
            if time.monotonic() - self._last_save >= cfg.save_interval_s:
                self._save_soon()
        await self._drain(cfg.stop_grace_s)

    async def _answers(self, nc: Client) -> bool:
        """True if the server answers a ping within half the ack timeout (it is not hung)."""
        try:
            await nc.flush(timeout=max(1, int(self.config.ack_timeout_s / 2)))
        except (nats.errors.Error, TimeoutError):
            return False
        return True

    async def _fill(self, nc: Client) -> None:
        cfg = self.config
        while (
            len(self._in_flight) < cfg.window
            and self._in_flight_bytes < cfg.window_bytes
            and self._next_seq <= self.journal.last_seq
        ):
            if self._compacting:
                return  # woken when it is done
            free = cfg.window - len(self._in_flight)
            if free < min(cfg.read_batch, cfg.window, self.journal.last_seq - self._next_seq + 1):
                # A backlog refills the window a read_batch at a time, not one message
                # per acknowledgement (each read is a trip to a worker thread).
                return
            want = min(cfg.read_batch, free)
            await self._raise_sent(self._next_seq + want - 1)
            records = await asyncio.to_thread(self.journal.read, self._next_seq, want)
            if not records:
                return
            if records[0][0] != self._next_seq:
                log.error(
                    "fleet: seqs %d-%d left the journal before the hub had them (retention)",
                    self._next_seq,
                    records[0][0] - 1,
                )
            if not await self._publish(nc, records):
                return

    async def _publish(self, nc: Client, records: Iterable[tuple[int, bytes]]) -> bool:
        """Publish `records` in order; False if the connection refused one (left for a rewind)."""
        sent, ok = 0, True
        for seq, message in records:
            epoch, placeholder = message_meta(message, self._fallback_epoch)
            if placeholder:
                # Nothing to send: the merged message of its minute, later in seq order,
                # names this seq; on a rewind the resend starts at that message at the latest.
                done: asyncio.Future[int] = self._loop.create_future()
                done.set_result(0)
                self._in_flight[seq] = _InFlight(epoch, done, time.monotonic())
                self._next_seq = seq + 1
                continue
            if self._in_flight_bytes >= self.config.window_bytes:
                break  # the rest of this read is read again once acks free the window
            headers = {MSG_ID_HEADER: message_id(self.gateway_id, epoch, seq)}
            if not nc.is_connected:
                ok = False  # gone since the last check: resent on the next connection
                break
            try:
                await nc.publish(
                    self.subject, message, reply=f"{self._ack_prefix}.{seq}", headers=headers
                )
            except nats.errors.Error as err:
                # Closed meanwhile: resent on the next connection.
                log.debug("fleet: publish of seq %d deferred: %s", seq, err)
                ok = False
                break
            future = self._loop.create_future()
            self._in_flight[seq] = _InFlight(epoch, future, time.monotonic(), len(message))
            self._in_flight_bytes += len(message)
            self._next_seq = seq + 1
            sent += 1
        st = self.status()
        self._set_status(
            published=st.published + sent,
            in_flight=len(self._in_flight),
            max_in_flight=max(st.max_in_flight, len(self._in_flight)),
        )
        return ok

    async def _on_ack(self, msg: Msg) -> None:
        """JetStream's answer to one publish: a PubAck, an error, or 503 (no such stream).

        An ack of an earlier attempt of the same seq also completes it: either way the
        stream holds that message.
        """
        item = self._in_flight.get(int(msg.subject.rsplit(".", 1)[1]))
        if item is None or item.future.done():
            return
        if msg.headers and msg.headers.get("Status") == "503":
            item.future.set_exception(
                StreamError(f"no stream answered for {self.subject} (missing, or electing)")
            )
            return
        try:
            body = json.loads(msg.data)
        except ValueError:
            body = {"error": {"description": f"unreadable acknowledgement {msg.data[:80]!r}"}}
        if "error" in body:
            item.future.set_exception(StreamError(f"hub refused: {body['error']}"))
        else:
            item.future.set_result(int(body.get("seq", 0)))

    async def _on_control(self, msg: Msg) -> None:
        """A control request from the hub: queued for the service loop, or refused at once."""
        if self.control is None or not msg.reply:
            log.warning("fleet: %s got a control message with no reply subject", self.gateway_id)
            return
        answer = self.control.offer(msg.data, msg.reply, self._connection_id)
        if answer is not None:
            await msg.respond(answer)

    def _send_reply(self, connection: int, subject: str, data: bytes) -> None:
        """The control inbox's reply path (called from the service loop's thread)."""
        with contextlib.suppress(RuntimeError):  # the loop is closed: the forwarder stopped
            asyncio.run_coroutine_threadsafe(self._reply(connection, subject, data), self._loop)

    async def _reply(self, connection: int, subject: str, data: bytes) -> None:
        nc = self._nc
        if nc is None or connection != self._connection_id or not nc.is_connected:
            # The requester times out and may ask again; the change itself is journaled.
            log.warning("fleet: %s lost a control reply with its connection", self.gateway_id)
            return
        try:
            await nc.publish(subject, data)
        except nats.errors.Error as err:
            log.warning("fleet: %s could not send a control reply: %s", self.gateway_id, err)

    async def _wait(self) -> None:
        """Until the oldest publish is answered, the journal grows, or the ack timeout nears."""
        self._wake.clear()
        woken = asyncio.ensure_future(self._wake.wait())
        waiters: set[asyncio.Future[Any]] = {woken}
        oldest = next(iter(self._in_flight.values()), None)
        if oldest is not None:
            waiters.add(oldest.future)
        timeout = self.config.ack_timeout_s / 4 if oldest is not None else 1.0
        await asyncio.wait(waiters, timeout=timeout, return_when=asyncio.FIRST_COMPLETED)
        woken.cancel()

    def _collect(self) -> None:
        """Move the cursor over the acknowledged prefix of the window."""
        cursor = self._cursor
        while self._in_flight:
            seq, item = next(iter(self._in_flight.items()))
            if not item.future.done():
                break
            error = None if item.future.cancelled() else item.future.exception()
            if item.future.cancelled() or error is not None:
                self._rewind(f"seq {seq} refused: {error!r}")
                self._refused = True
                break
            del self._in_flight[seq]
            self._in_flight_bytes -= item.size
            cursor = Cursor(item.epoch, seq)
        if cursor != self._cursor:
            self._cursor = cursor
            self._set_status(acked_seq=cursor.seq, in_flight=len(self._in_flight))

    def _rewind(self, why: str) -> None:
        """Forget every publish in flight and send again from the first unacknowledged one."""
        if not self._in_flight:
            return
        count = len(self._in_flight)
        log.info("fleet: resending %d messages from seq %d (%s)", count, self._cursor.seq + 1, why)
        for item in self._in_flight.values():
            item.future.cancel()
        self._in_flight.clear()
        self._in_flight_bytes = 0
        self._next_seq = self._cursor.seq + 1
        st = self.status()
        self._set_status(republished=st.republished + count, in_flight=0)

    async def _drain(self, grace_s: float) -> None:
        """On stop: give the acks in flight a moment, so the saved cursor is recent."""
        deadline = time.monotonic() + grace_s
        while self._in_flight and (left := deadline - time.monotonic()) > 0:
            oldest = next(iter(self._in_flight.values()))
            await asyncio.wait({oldest.future}, timeout=left)
            before = len(self._in_flight)
            self._collect()
            if len(self._in_flight) == before:
                return  # refused or timed out: the next start resends it

    async def _save(self) -> None:
        """Write the cursor and sent mark if either moved (fsync'd: a crash resends from here).

        The write runs in a worker thread, so the event loop (in the fleet simulator,
        every gateway's) goes on meanwhile. The values are taken once the lock is
        held: the file never goes back to an older sent mark.
        """
        async with self._save_lock:
            cursor, sent = self._cursor, self._sent
            if cursor != self._saved or sent != self._saved_sent:
                await asyncio.to_thread(cursor.save, self.cursor_path, sent)
                self._saved, self._saved_sent = cursor, sent
        self._last_save = time.monotonic()

    def _save_soon(self) -> None:
        """The periodic cursor save, in the background (one at a time): publishing goes on."""
        self._last_save = time.monotonic()
        if self._save_task is not None and self._save_task.done():
            self._save_task.result()  # a failed write stops the forwarder, as in the foreground
        if self._save_task is None or self._save_task.done():
            self._save_task = asyncio.ensure_future(self._save())

    async def _on_error(self, err: Exception) -> None:
        text = str(err)
        if "permissions violation" in text.lower() or "authorization" in text.lower():
            log.error(
                "fleet: the hub refused %s (%s): are these gateway %s's credentials?",
                self.subject,
                text,
                self.gateway_id,
            )
        elif not self._outage_logged:
            self._outage_logged = True  # once per outage: a week offline is not 600k lines
            log.warning("fleet: %s cannot reach the hub (%s); retrying", self.gateway_id, text)
        self._set_status(last_error=text)

    async def _on_closed(self) -> None:
        self._set_status(connected=False)
        self._wake.set()  # the pump notices the closed connection at once


def _url(nc: Client) -> str | None:
    url = nc.connected_url
    return None if url is None else f"{url.scheme}://{url.hostname}:{url.port}"
