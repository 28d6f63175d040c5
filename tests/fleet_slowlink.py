"""A slow, far link on loopback: a TCP proxy that limits each direction's rate and delays it.

Why a proxy: the development machines' kernel has no netem (DESIGN.md, facts),
and the VM tier, which has it, runs under TCG, far too slow to carry a week
of backlog through nats-server, TLS and the forwarder. So the link is emulated
in user space, one asyncio task per direction of each connection:

- the rate: each chunk read leaves the link when the chunks before it have
  (a token bucket of `rate_bps` with a one-chunk burst), so the bytes arrive
  at most at `rate_bps`, like a satellite modem's serialisation;
- the delay: every chunk is written `delay_s` after it left (one way; a
  600 ms round trip is 300 ms each way);
- a bounded buffer (`buffer_bytes`): once that much waits, the proxy stops
  reading, so the sender's TCP backs off as at a real bottleneck.

`SlowLink(upstream_port).start()` listens on 127.0.0.1 and returns its port;
`stop()` closes every connection. Only loopback is ever connected to.
"""

from __future__ import annotations

import asyncio
import contextlib
import threading
from dataclasses import dataclass

CHUNK = 4096


@dataclass(frozen=True)
class LinkShape:
    """Rate of each direction in bit/s, one-way delay, and the bottleneck's buffer."""

    rate_bps: int = 2_000_000
    delay_s: float = 0.3
    buffer_bytes: int = 256 << 10


class _Direction:
    """One direction of one connection: serialise at the rate, then deliver after the delay."""

    def __init__(self, shape: LinkShape) -> None:
        self.shape = shape
        self.free_at = 0.0  # when the link has sent every chunk taken so far
        self.queued = 0
        self.room = asyncio.Condition()
        self.carried = 0

    async def run(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue[tuple[float, bytes] | None] = asyncio.Queue()
        deliver = asyncio.ensure_future(self._deliver(queue, writer))
        try:
            while data := await reader.read(CHUNK):
                async with self.room:
                    await self.room.wait_for(lambda: self.queued < self.shape.buffer_bytes)
                    self.queued += len(data)
                now = loop.time()
                self.free_at = max(self.free_at, now) + len(data) * 8 / self.shape.rate_bps
                queue.put_nowait((self.free_at + self.shape.delay_s, data))
        finally:
            queue.put_nowait(None)
            await deliver

    async def _deliver(
        self, queue: asyncio.Queue[tuple[float, bytes] | None], writer: asyncio.StreamWriter
    ) -> None:
        loop = asyncio.get_running_loop()
        try:
            while (item := await queue.get()) is not None:
                due, data = item
                if (wait := due - loop.time()) > 0:
                    await asyncio.sleep(wait)
                writer.write(data)
                await writer.drain()
                self.carried += len(data)
                async with self.room:
                    self.queued -= len(data)
                    self.room.notify_all()
        except (ConnectionError, OSError):
            return  # the other side went away: the connection ends
        finally:
            writer.close()


class SlowLink:
    """The proxy in its own thread and event loop (see the module doc)."""

    def __init__(self, upstream_port: int, shape: LinkShape | None = None) -> None:
        self.upstream_port = upstream_port
        self.shape = shape or LinkShape()
        self.port = 0
        self.carried_up = 0  # bytes delivered towards the upstream server
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, daemon=True)
        self._server: asyncio.Server | None = None
        self._tasks: set[asyncio.Task[None]] = set()

    def start(self) -> int:
        """Listen on 127.0.0.1 (a free port); returns it."""
        self._thread.start()
        self._server = asyncio.run_coroutine_threadsafe(self._listen(), self._loop).result(10)
        self.port = self._server.sockets[0].getsockname()[1]
        return self.port

    async def _listen(self) -> asyncio.Server:
        return await asyncio.start_server(self._connection, "127.0.0.1", 0)

    async def _connection(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        if task is not None:
            self._tasks.add(task)
        try:
            up_reader, up_writer = await asyncio.open_connection("127.0.0.1", self.upstream_port)
        except OSError:
            writer.close()
            return
        up, down = _Direction(self.shape), _Direction(self.shape)
        try:
            await asyncio.gather(up.run(reader, up_writer), down.run(up_reader, writer))
        except (ConnectionError, OSError, asyncio.CancelledError):
            pass  # either side closed or the link stopped: the connection ends
        finally:
            self.carried_up += up.carried
            for w in (writer, up_writer):
                w.close()
            if task is not None:
                self._tasks.discard(task)

    def stop(self) -> None:
        """Close the listener and every connection, then the thread."""

        async def close() -> None:
            if self._server is not None:
                self._server.close()
            for task in list(self._tasks):
                task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await asyncio.gather(*self._tasks, return_exceptions=True)

        if self._thread.is_alive():
            asyncio.run_coroutine_threadsafe(close(), self._loop).result(10)
            self._loop.call_soon_threadsafe(self._loop.stop)
            self._thread.join(10)
        self._loop.close()
