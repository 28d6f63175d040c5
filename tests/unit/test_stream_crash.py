"""kill -9 of the publishing process at random moments, 10 times: billing loses and doubles nothing.

The child process plays the gateway: an aggregator polling "kernel" counters
that are a pure function of the clock (so, like pinned BPF maps, they keep
running while the daemon is dead), a MeterService journaling and publishing
every poll. A collector runs throughout, reconnecting across the restarts.
"""

from __future__ import annotations

import os
import random
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest

from desanet.cython_ext import twin
from desanet.errors import StreamError
from desanet.meter.client import UsageClient
from desanet.meter.collector import UsageStore, collect
from desanet.meter.keys import ServerSecurity
from desanet.meter.service import MeterService, StreamConfig
from desanet.meter.wire import UsageMessage

pytestmark = pytest.mark.unit

N_SLOTS = 6
EPOCH_MS = 1_790_000_000_000
# Bytes per ms per slot and column (up bytes, up packets, down bytes, down packets).
RATES = np.array([[s * 3 + 1, 1, s * 7 + 2, 1] for s in range(N_SLOTS)], dtype=np.uint64)
REPO = Path(__file__).resolve().parents[2]


def counters_at(t_ms: int) -> np.ndarray:
    return RATES * np.uint64(t_ms - EPOCH_MS)


def child(state_dir: str, usage: str, replay: str, publish_until_ms: int) -> None:
    """The gateway stand-in: poll, roll up and publish every few ms (run in a subprocess)."""
    agg = twin.Aggregator(N_SLOTS)
    svc = MeterService(
        "crashgw",
        Path(state_dir),
        StreamConfig(usage, replay, ServerSecurity(plaintext=True), snapshot_every=25),
        {slot: f"s{slot}" for slot in range(1, N_SLOTS)},
    )
    if svc.restored_state is not None:
        agg.restore(svc.restored_state)
    print("ready", flush=True)
    while True:
        now = max(time.time_ns() // 1_000_000, EPOCH_MS)
        if now > publish_until_ms:
            time.sleep(0.05)
            continue
        agg.poll(counters_at(now), now)
        svc.publish(agg.rollup(now), agg.state())
        time.sleep(0.003)


def _free_endpoint() -> str:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return f"tcp://127.0.0.1:{s.getsockname()[1]}"


def _spawn(state_dir: Path, usage: str, replay: str, until_ms: int) -> subprocess.Popen[str]:
    code = (
        "from tests.unit.test_stream_crash import child; "
        f"child({str(state_dir)!r}, {usage!r}, {replay!r}, {until_ms})"
    )
    proc = subprocess.Popen(
        [sys.executable, "-c", code],
        cwd=REPO,
        stdout=subprocess.PIPE,
        text=True,
        env=os.environ | {"PYTHONPATH": str(REPO)},
    )
    assert proc.stdout is not None and proc.stdout.readline().strip() == "ready"
    return proc


def test_kill_9_ten_times_loses_and_doubles_nothing(tmp_path: Path) -> None:
    usage, replay = _free_endpoint(), _free_endpoint()
    state_dir = tmp_path / "state"
    rng = random.Random(9)
    done = threading.Event()
    seqs: list[int] = []
    delta_sums = {f"s{slot}": np.zeros(4, dtype=np.int64) for slot in range(1, N_SLOTS)}
    results: dict[str, object] = {}

    def on_message(msg: UsageMessage) -> None:
        seqs.append(msg.seq)
        for rec in msg.records():
            delta_sums[rec.sub] += [rec.up, rec.up_pkts, rec.down, rec.down_pkts]
        results["last"] = msg

    def collector() -> None:
        store = UsageStore.sqlite(tmp_path / "usage.sqlite")
        with UsageClient(usage, replay, gateway_id="crashgw", timeout_ms=1000) as client:
            while True:
                try:
                    collect(client, store, idle_timeout_ms=1500, on_message=on_message)
                    if done.is_set():
                        break
                except StreamError:
                    time.sleep(0.1)  # the gateway is down: billing retries
        results["totals"] = store.totals("crashgw")
        results["stored_seq"] = store.last_seq("crashgw")
        store.close()

    thread = threading.Thread(target=collector)
    thread.start()
    far_future = EPOCH_MS * 2
    try:
        for _ in range(10):
            proc = _spawn(state_dir, usage, replay, far_future)
            time.sleep(rng.uniform(0.05, 0.5))
            proc.send_signal(signal.SIGKILL)
            proc.wait()
        final = _spawn(state_dir, usage, replay, time.time_ns() // 1_000_000 + 500)
        time.sleep(1.0)
        done.set()
        thread.join(timeout=60)
        assert not thread.is_alive()
    finally:
        done.set()
        final.kill()
        final.wait()
        thread.join(timeout=10)

    assert seqs == list(range(1, len(seqs) + 1)), "every seq exactly once, in order"
    assert len(seqs) > 50
    last = results["last"]
    assert isinstance(last, UsageMessage)
    truth = counters_at(last.t1)
    totals = results["totals"]
    assert isinstance(totals, dict)
    for slot in range(1, N_SLOTS):
        sub = f"s{slot}"
        up, down = int(truth[slot, 0]), int(truth[slot, 2])
        assert totals[sub] == (up, down), f"{sub}: collector totals equal the counters"
        assert delta_sums[sub].tolist() == truth[slot].tolist(), f"{sub}: sum of deltas"
    assert results["stored_seq"] == seqs[-1]
