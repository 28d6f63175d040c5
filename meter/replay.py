"""The replay endpoint: journaled messages from seq N, or a snapshot of all totals.

A ZeroMQ ROUTER socket served by its own thread. Each request is answered
with bounded work (at most `MAX_REPLAY_BATCH` messages), so one client asking
for a month of history cannot stall the others; bad requests get an error
reply and a (rate-limited) log line, never an exception out of the loop.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from typing import Any

import zmq

from desanet.errors import StreamError
from desanet.meter import wire
from desanet.meter.journal import Journal
from desanet.meter.keys import ServerSecurity, secure_server

log = logging.getLogger(__name__)

# libzmq drops a peer that sends a bigger frame before it reaches Python.
_MAX_FRAME_BYTES = 64 * 1024
_POLL_MS = 100


class ReplayServer:
    """Serves the replay protocol of docs/usage-stream.md on `endpoint` until `close()`."""

    def __init__(
        self,
        ctx: zmq.Context[zmq.Socket[bytes]],
        endpoint: str,
        security: ServerSecurity,
        journal: Journal,
        snapshot: Callable[[], dict[str, Any]],
    ) -> None:
        self.journal = journal
        self.snapshot = snapshot
        self.requests = 0
        self.errors = 0
        self._stop = threading.Event()
        self._last_log = 0.0
        self._unlogged = 0
        self._sock: zmq.Socket[bytes] = ctx.socket(zmq.ROUTER)
        self._sock.linger = 0
        self._sock.maxmsgsize = _MAX_FRAME_BYTES
        self._sock.sndhwm = 4 * wire.MAX_REPLAY_BATCH
        try:
            secure_server(self._sock, security, endpoint)
            self._sock.bind(endpoint)
        except zmq.ZMQError as err:
            self._sock.close()
            raise StreamError(f"cannot bind the replay endpoint {endpoint}: {err}") from err
        except BaseException:
            self._sock.close()
            raise
        self.endpoint = str(self._sock.getsockopt_string(zmq.LAST_ENDPOINT))
        self._thread = threading.Thread(target=self._run, name="desanet-replay", daemon=True)
        self._thread.start()

    def close(self) -> None:
        """Stop serving and close the socket."""
        self._stop.set()
        self._thread.join()

    def _run(self) -> None:
        try:
            while not self._stop.is_set():
                if not self._sock.poll(_POLL_MS, zmq.POLLIN):
                    continue
                try:
                    self._serve_one()
                except (OSError, zmq.ZMQError):
                    # A journal read or a send failed for this request only: say so, keep serving.
                    log.exception("replay endpoint: a request failed")
        finally:
            self._sock.close()

    def _serve_one(self) -> None:
        frames = self._sock.recv_multipart()
        identity, body = frames[0], frames[1:]
        self.requests += 1
        try:
            if len(body) != 1:
                raise StreamError(f"a request is one frame, got {len(body)} (use a DEALER socket)")
            request = wire.decode_request(body[0])
            if request.op == wire.OP_SNAPSHOT:
                self._send(identity, wire.REPLY_SNAPSHOT, wire.pack(self.snapshot()))
            else:
                self._replay(identity, request.from_seq)
        except StreamError as err:
            self.errors += 1
            self._complain(str(err))
            self._send(identity, wire.REPLY_ERROR, wire.pack({"v": 1, "error": str(err)}))

    def _replay(self, identity: bytes, from_seq: int) -> None:
        first, last = self.journal.first_seq, self.journal.last_seq
        # Seqs start at 1: asking from 0 or 1 loses nothing until retention removed seq 1.
        if last and max(from_seq, 1) < first:
            self._send(
                identity,
                wire.REPLY_ERROR,
                wire.pack(
                    {
                        "v": 1,
                        "error": f"seq {from_seq} is no longer retained; the oldest is {first}",
                        "code": "gone",
                        "oldest": first,
                    }
                ),
            )
            return
        next_seq = from_seq
        for seq, message in self.journal.read(from_seq, wire.MAX_REPLAY_BATCH):
            self._send(identity, wire.REPLY_MSG, message)
            next_seq = seq + 1
        self._send(identity, wire.REPLY_END, wire.pack({"v": 1, "next": next_seq, "last": last}))

    def _send(self, identity: bytes, kind: bytes, payload: bytes) -> None:
        try:
            self._sock.send_multipart([identity, kind, payload], zmq.NOBLOCK)
        except zmq.Again:
            self._complain("a replay client is not reading its replies; reply dropped")

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
