"""The fleet simulator: N gateways in one process, each with its own truth.

Each simulated gateway is the real meter service (journal fsync'd per
message, ZeroMQ endpoints on loopback) and the real forwarder, fed with
synthetic counters instead of the kernel: every interval a seeded random
subset of its subscribers moves by random byte counts, and the simulator adds
those deltas up as that gateway's truth. All forwarders share one asyncio
loop in one thread (a real gateway has its own), each with its own NKEY, so
the hub sees N distinct, separately authorised clients. The gateways journal
an interval in parallel from a pool of threads (each journal fsyncs on its
own, as on its own machine); that loop's worker threads write the forwarders'
cursors. A benchmark of a thousand of them lets each service's replay thread
sleep longer when idle (`idle_poll_ms`), since a thousand threads waking ten
times a second in one process are a cost no real gateway has.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import numpy.typing as npt

from desanet.cython_ext.usage import UsageInterval
from desanet.meter.fleet_forward import Forwarder, ForwarderConfig
from desanet.meter.journal import Retention
from desanet.meter.keys import ServerSecurity
from desanet.meter.service import MeterService, StreamConfig
from tests.fleet_harness import FleetHub

ANY_PORT = "tcp://127.0.0.1:*"
INTERVAL_MS = 1000
JOURNAL_THREADS = 16  # fsyncs in parallel: the disk commits them together
LOOP_WORKERS = 32  # the forwarders' journal reads and cursor writes


class LoopThread:
    """One asyncio event loop running in its own daemon thread, until close()."""

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self.loop.set_default_executor(concurrent.futures.ThreadPoolExecutor(LOOP_WORKERS))
        self._thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self._thread.start()

    def close(self) -> None:
        self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join(10)
        self.loop.close()


@dataclass
class SimGateway:
    """One simulated gateway: its service, forwarder, counters and truth."""

    gateway_id: str
    service: MeterService
    forwarder: Forwarder
    rng: np.random.Generator
    up_total: npt.NDArray[np.uint64]
    down_total: npt.NDArray[np.uint64]
    t1_ms: int = 1_793_491_200_000  # 2026-11-01 00:00 UTC
    rows: int = 0

    @property
    def subscribers(self) -> list[str]:
        return [f"s{i:04d}" for i in range(1, len(self.up_total) + 1)]


@dataclass
class FleetSim:
    """N gateways against one hub; `step()` makes every gateway journal one interval."""

    gateways: list[SimGateway] = field(default_factory=list)
    pool: concurrent.futures.ThreadPoolExecutor = field(
        default_factory=lambda: concurrent.futures.ThreadPoolExecutor(JOURNAL_THREADS)
    )

    @classmethod
    def start(
        cls,
        directory: Path,
        hub: FleetHub,
        loop: asyncio.AbstractEventLoop,
        subscribers: int,
        config: ForwarderConfig | None = None,
        retention: Retention | None = None,
        checkpoint_every: int = 300,
        forwarding: bool = True,
        idle_poll_ms: int = 100,
    ) -> FleetSim:
        """One gateway per id the hub was configured for, each forwarding at once unless
        `forwarding` is false (then from start_forwarding(): a backlog built first)."""
        sim = cls()
        security = ServerSecurity(plaintext=True)
        for index, gw in enumerate(sorted(hub.files.gateways)):
            state = directory / gw
            stream = StreamConfig(
                ANY_PORT,
                ANY_PORT,
                security,
                retention=retention or Retention(),
                snapshot_every=50,
                checkpoint_every=checkpoint_every,
                idle_poll_ms=idle_poll_ms,
            )
            slots = {i: f"s{i:04d}" for i in range(1, subscribers + 1)}
            service = MeterService(gw, state, stream, slots)
            forwarder = Forwarder(
                gw,
                service.journal,
                state / "fleet-cursor.json",
                hub.gateway(gw),
                config,
                loop=loop,
            )
            if forwarding:
                forwarder.start()
            zeros = np.zeros(subscribers, dtype=np.uint64)
            sim.gateways.append(
                SimGateway(
                    gw, service, forwarder, np.random.default_rng(index), zeros, zeros.copy()
                )
            )
        return sim

    def start_forwarding(self) -> None:
        """Start every gateway's forwarder (after `start(..., forwarding=False)`)."""
        for g in self.gateways:
            g.forwarder.start()

    def step(self) -> int:
        """Every gateway journals one interval (about 80 % of its subscribers move); rows made."""
        return sum(self.pool.map(self._step_one, self.gateways))

    @staticmethod
    def _step_one(g: SimGateway) -> int:
        """One interval of gateway `g` (its own generator: the same truth in any thread)."""
        n = len(g.up_total)
        moved = np.flatnonzero(g.rng.random(n) < 0.8).astype(np.uint32)
        up = g.rng.integers(1, 50_000, moved.shape[0], dtype=np.uint64)
        down = g.rng.integers(1, 500_000, moved.shape[0], dtype=np.uint64)
        g.up_total[moved] += up
        g.down_total[moved] += down
        g.t1_ms += INTERVAL_MS
        pkts = np.ones(moved.shape[0], dtype=np.uint64)
        interval = UsageInterval(
            g.t1_ms - INTERVAL_MS,
            g.t1_ms,
            moved + 1,  # slot i is subscriber s<i>; slot 0 is nobody's
            up,
            down,
            pkts,
            pkts,
            g.up_total[moved],
            g.down_total[moved],
        )
        g.service.publish(interval, {})
        g.forwarder.notify()
        g.rows += moved.shape[0]
        return int(moved.shape[0])

    def truth(self) -> dict[tuple[str, str], tuple[int, int]]:
        """(up, down) bytes of every subscriber that moved, summed over all intervals."""
        return {
            (g.gateway_id, sub): (int(g.up_total[i]), int(g.down_total[i]))
            for g in self.gateways
            for i, sub in enumerate(g.subscribers)
            if g.up_total[i]  # a moving subscriber moves by at least 1 byte each way
        }

    def last_seqs(self) -> dict[str, int]:
        return {g.gateway_id: g.service.last_seq for g in self.gateways}

    def wait_forwarded(self, timeout_s: float) -> bool:
        """True once every gateway's hub acknowledged its whole journal."""
        deadline = time.monotonic() + timeout_s
        for g in self.gateways:
            if not g.forwarder.wait_acked(
                g.service.last_seq, max(0.0, deadline - time.monotonic())
            ):
                return False
        return True

    def close(self) -> None:
        """Stop every forwarder and service (in parallel: each service's close fsyncs)."""
        with concurrent.futures.ThreadPoolExecutor(64) as pool:
            list(pool.map(lambda g: g.forwarder.stop(), self.gateways))
            list(pool.map(lambda g: g.service.close(), self.gateways))
        self.pool.shutdown()


def gateway_ids(n: int) -> list[str]:
    """`n` gateway ids: desa-0001, desa-0002, ..."""
    return [f"desa-{i:04d}" for i in range(1, n + 1)]
