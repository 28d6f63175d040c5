"""The replay endpoint: journaled messages of the current epoch from seq N, or all totals.

A ZeroMQ ROUTER socket served by its own thread, which also watches the
connection limits of the gateway's stream endpoints (meter.limits). Each
request is answered with bounded work (at most `MAX_REPLAY_BATCH` messages),
so one client asking for a month of history cannot stall the others. Every
request gets a reply: a bad one an `error` reply and a (rate-limited) log
line, whatever its bytes; nothing a client sends ends the loop.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Sequence

import zmq

from desanet.errors import StreamError
from desanet.meter import wire
from desanet.meter.journal import Journal
from desanet.meter.keys import ServerSecurity, secure_server
from desanet.meter.limits import ConnectionLimiter, EndpointLimits, apply_limits

log = logging.getLogger(__name__)

# libzmq drops a peer that sends a bigger frame, before its body is read.
MAX_FRAME_BYTES = 64 * 1024
LIMITS = EndpointLimits(MAX_FRAME_BYTES, receive_hwm=16, send_hwm=4 * wire.MAX_REPLAY_BATCH)
_POLL_MS = 100


class ReplayServer:
    """Serves the replay protocol of docs/usage-stream.md on `endpoint` until `close()`.

    `previous` is what the current epoch took over from the one before (for
    clients that ask for that one); `watch` are more connection limiters for
    this thread to serve; `tick` runs every poll round (at least every `poll_ms`).
    """

    def __init__(
        self,
        ctx: zmq.Context[zmq.Socket[bytes]],
        endpoint: str,
        security: ServerSecurity,
        journal: Journal,
        snapshot: Callable[[], wire.TotalsSnapshot],
        *,
        previous: wire.PreviousEpoch | None = None,
        limits: EndpointLimits = LIMITS,
        watch: Sequence[ConnectionLimiter] = (),
        tick: Callable[[], None] | None = None,
        poll_ms: int = _POLL_MS,
    ) -> None:
        self.journal = journal
        self.snapshot = snapshot
        self.previous = previous
        self.requests = 0
        self.errors = 0
        self.dropped_replies = 0
        self._tick = tick
        self._poll_ms = poll_ms
        self._stop = threading.Event()
        self._last_log = 0.0
        self._unlogged = 0
        self._sock: zmq.Socket[bytes] = ctx.socket(zmq.ROUTER)
        self._sock.linger = 0
        # A reply that cannot be queued raises instead of vanishing, so it is counted.
        self._sock.router_mandatory = True
        apply_limits(self._sock, limits)
        self.limiter = ConnectionLimiter(self._sock, "replay", limits.max_connections)
        self._limiters = [self.limiter, *watch]
        try:
            secure_server(self._sock, security, endpoint)
            self._sock.bind(endpoint)
        except zmq.ZMQError as err:
            self._close_socket()
            raise StreamError(f"cannot bind the replay endpoint {endpoint}: {err}") from err
        except BaseException:
            self._close_socket()
            raise
        self.endpoint = str(self._sock.getsockopt_string(zmq.LAST_ENDPOINT))
        self.limiter.bound(self.endpoint)
        self._thread = threading.Thread(target=self._run, name="desanet-replay", daemon=True)
        self._thread.start()

    def close(self) -> None:
        """Stop serving; the thread closes the socket and every watched limiter's monitor."""
        self._stop.set()
        self._thread.join()

    def _close_socket(self) -> None:
        self._sock.disable_monitor()
        self._sock.close()
        self.limiter.close()

    def _run(self) -> None:
        poller = zmq.Poller()
        poller.register(self._sock, zmq.POLLIN)
        for limiter in self._limiters:
            poller.register(limiter.monitor, zmq.POLLIN)
        try:
            while not self._stop.is_set():
                ready = dict(poller.poll(self._poll_ms))
                if self._sock in ready:
                    self._guarded(self._serve_one)
                for limiter in self._limiters:
                    if limiter.monitor in ready:
                        self._guarded(limiter.handle)
                if self._tick is not None:
                    self._guarded(self._tick)
        finally:
            self._sock.disable_monitor()
            self._sock.close()
            for limiter in self._limiters:
                limiter.close()

    def _guarded(self, step: Callable[[], None]) -> None:
        # The thread serves every client: a failure of one step is logged, never fatal.
        try:
            step()
        except Exception:
            log.exception("replay endpoint: %s failed", getattr(step, "__name__", "a step"))

    def _serve_one(self) -> None:
        frames = self._sock.recv_multipart()
        identity, body = frames[0], frames[1:]
        self.requests += 1
        try:
            if len(body) != 1:
                raise StreamError(f"a request is one frame, got {len(body)} (use a DEALER socket)")
            request = wire.decode_request(body[0])
            if request.op == wire.OP_SNAPSHOT:
                self._send(identity, wire.REPLY_SNAPSHOT, wire.encode_snapshot(self.snapshot()))
            else:
                self._replay(identity, request)
        except StreamError as err:
            self._refuse(identity, wire.Refusal(str(err)))
        except Exception as err:
            # The boundary of a request: whatever went wrong, the client gets an answer.
            log.exception("replay endpoint: a request failed")
            self._refuse(identity, wire.Refusal(f"the gateway could not answer: {err}"))

    def _refuse(self, identity: bytes, refusal: wire.Refusal) -> None:
        self.errors += 1
        self._complain(refusal.error)
        self._send(identity, wire.REPLY_ERROR, wire.encode_refusal(refusal))

    def _replay(self, identity: bytes, request: wire.ReplayRequest) -> None:
        epoch = self.journal.epoch or ""
        first, last = self.journal.first_seq, self.journal.last_seq
        oldest = first or last + 1
        if request.epoch is not None and request.epoch != epoch:
            self._refuse(identity, self._other_epoch(request.epoch, epoch, oldest, last))
            return
        from_seq = request.from_seq
        # Seqs start at 1: asking from 0 or 1 loses nothing until retention removed seq 1.
        if last and max(from_seq, 1) < first:
            text = f"seq {from_seq} of epoch {epoch} is no longer retained; the oldest is {first}"
            self._refuse(identity, wire.Refusal(text, wire.CODE_GONE, epoch, first, last))
            return
        next_seq = from_seq
        for seq, message in self.journal.read(from_seq, wire.MAX_REPLAY_BATCH):
            self._send(identity, wire.REPLY_MSG, message)
            next_seq = seq + 1
        self._send(identity, wire.REPLY_END, wire.encode_end(wire.ReplayEnd(epoch, next_seq, last)))

    def _other_epoch(self, asked: str, epoch: str, oldest: int, last: int) -> wire.Refusal:
        prev = self.previous
        text = f"epoch {asked} is not served here: this gateway publishes epoch {epoch}"
        if prev is not None and prev.epoch == asked:
            text = f"epoch {asked} has ended: this gateway's state holds it up to seq {prev.seq}"
            if prev.published is not None and prev.published > prev.seq:
                text += f"; seqs {prev.seq + 1}..{prev.published} of it were published but are lost"
            text += f"; it now publishes epoch {epoch}"
        text += f"; replay that from seq {oldest} (newest {last})"
        reply_prev = prev if prev is not None and prev.epoch == asked else None
        return wire.Refusal(text, wire.CODE_EPOCH, epoch, oldest, last, reply_prev)

    def _send(self, identity: bytes, kind: bytes, payload: bytes) -> None:
        try:
            self._sock.send_multipart([identity, kind, payload], zmq.NOBLOCK)
        except zmq.Again:
            self.dropped_replies += 1
            self._complain("a replay client is not reading its replies; reply dropped")
        except zmq.ZMQError as err:
            if err.errno != zmq.EHOSTUNREACH:
                raise
            self.dropped_replies += 1  # the client left before its answer was ready

    def _complain(self, reason: str) -> None:
        # 10,000 bad requests must not become 10,000 log lines: one a second, with a count.
        now = time.monotonic()
        if now - self._last_log >= 1.0:
            extra = f" (and {self._unlogged} more since the last report)" if self._unlogged else ""
            log.warning("replay endpoint: refused a request: %s%s", reason, extra)
            self._last_log = now
            self._unlogged = 0
        else:
            self._unlogged += 1
