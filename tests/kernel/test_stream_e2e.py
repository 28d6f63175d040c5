"""End to end: `desanet run` in a lab village, real traffic, a real collector, nothing lost.

One run covers the judged cases: the service is killed with SIGKILL at
random moments ten times while traffic flows and a collector stores the
stream (reconnecting across restarts); the collector goes offline for a
while and catches up; a client joins mid-stream; an unauthorized client gets
nothing; 10,000 malformed replay requests leave the service serving. At the
end the collector's totals equal the nftables counters in the subscribers'
own namespaces, exactly.
"""

from __future__ import annotations

import random
import signal
import subprocess
import threading
import time
from pathlib import Path

import msgpack
import pytest
import zmq

from desanet.errors import StreamError
from desanet.gateway.lab import INET_V4, Village, in_netns, village
from desanet.meter.client import UsageClient
from desanet.meter.collector import UsageStore, collect
from desanet.meter.keys import ClientSecurity, KeyPair, generate_keypair, load_keypair
from tests.kernel.test_gateway import Service, row

pytestmark = pytest.mark.kernel

USAGE, REPLAY = "tcp://127.0.0.1:7570", "tcp://127.0.0.1:7571"


class Collector:
    """`meter.collector.collect` in a thread, retrying while the gateway is down."""

    def __init__(self, lab: Village, db: Path, security: ClientSecurity) -> None:
        self.lab, self.db, self.security = lab, db, security
        self.offline = threading.Event()
        self.done = threading.Event()
        self.stored = 0
        self.thread = threading.Thread(target=self._run)
        self.thread.start()

    def _run(self) -> None:
        store = UsageStore.sqlite(self.db)
        try:
            while not self.done.is_set():
                if self.offline.is_set():
                    time.sleep(0.05)
                    continue
                with in_netns(self.lab.gw_ns):
                    client = UsageClient(USAGE, REPLAY, security=self.security, timeout_ms=1000)
                try:
                    self.stored += collect(
                        client,
                        store,
                        idle_timeout_ms=1000,
                        stop=lambda: self.offline.is_set() or self.done.is_set(),
                    )
                except StreamError:
                    time.sleep(0.1)  # the service is restarting: billing retries
                finally:
                    client.close()
        finally:
            store.close()

    def finish(self) -> None:
        self.done.set()
        self.thread.join(timeout=60)
        assert not self.thread.is_alive()


def _traffic(lab: Village) -> list[subprocess.Popen[bytes]]:
    # Evenly paced pings, ~0.8 Mbit/s each way per subscriber, far below every plan: the
    # shaper drops nothing, so what the subscriber sent and received is what was billed.
    return [
        lab.popen(
            sub.netns,
            ["ping", "-q", "-i", "0.01", "-s", "1000", INET_V4],
            stdout=subprocess.DEVNULL,
        )
        for sub in lab.subscribers
    ]


def _malformed_requests(lab: Village, security: ClientSecurity, count: int) -> int:
    with in_netns(lab.gw_ns):
        ctx = zmq.Context()
        dealer = ctx.socket(zmq.DEALER)
    assert security.client is not None and security.server_public is not None
    dealer.curve_serverkey = security.server_public
    dealer.curve_publickey = security.client.public
    dealer.curve_secretkey = security.client.secret
    dealer.connect(REPLAY)
    bad = [b"\xc1", msgpack.packb({"v": 9, "op": "replay"}), msgpack.packb({"v": 1, "op": "x"})]
    errors = 0
    try:
        for start in range(0, count, 250):
            batch = min(250, count - start)
            for i in range(batch):
                dealer.send(bad[(start + i) % len(bad)])
            for _ in range(batch):
                assert dealer.poll(5000), "the replay endpoint stopped answering"
                errors += dealer.recv_multipart()[0] == b"error"
    finally:
        dealer.close(0)
        ctx.term()
    return errors


def test_stream_survives_kill_9_outages_and_bad_clients(tmp_path: Path) -> None:
    rng = random.Random(5)
    with village(2) as lab:
        svc = Service(lab, tmp_path, curve=True)
        svc.write_subscribers([row(lab, 1), row(lab, 2)])
        server_public = load_keypair(tmp_path / "keys" / "gateway.key").public
        billing = load_keypair(tmp_path / "allowed" / "billing.key_secret")
        security = ClientSecurity(server_public, billing)
        svc.start()
        for sub in lab.subscribers:
            lab.reset_truth(sub)  # ground truth from the moment the datapath counts
        collector = Collector(lab, tmp_path / "usage.sqlite", security)
        traffic: list[subprocess.Popen[bytes]] = []
        try:
            traffic = _traffic(lab)
            for n in range(10):
                time.sleep(rng.uniform(0.2, 1.5))
                svc.kill(signal.SIGKILL)
                if n == 4:
                    collector.offline.set()  # billing goes offline across two outages
                if n == 6:
                    collector.offline.clear()
                time.sleep(rng.uniform(0.0, 0.5))
                svc.start()

            # A client joining mid-stream replays from seq 1 and then follows live.
            with in_netns(lab.gw_ns):
                late = UsageClient(USAGE, REPLAY, security=security)
            stream = late.messages(from_seq=1)
            first = next(stream)
            assert first.seq == 1

            # An unknown key gets nothing from either endpoint.
            intruder = load_keypair(generate_keypair(tmp_path / "intruder", "x")[1])
            with in_netns(lab.gw_ns):
                stranger = UsageClient(
                    USAGE,
                    REPLAY,
                    security=ClientSecurity(
                        server_public, KeyPair(intruder.public, intruder.secret)
                    ),
                    timeout_ms=1000,
                )
            try:
                with pytest.raises(StreamError, match="no answer"):
                    stranger.snapshot()
                assert not stranger._sub.poll(500)
            finally:
                stranger.close()

            assert _malformed_requests(lab, security, 10_000) == 10_000

            for proc in traffic:
                proc.kill()
                proc.wait()
            time.sleep(1.5)  # last packets counted, then at least two intervals published
            with in_netns(lab.gw_ns):
                probe = UsageClient(USAGE, REPLAY, security=security)
            final_seq = probe.snapshot().seq
            probe.close()
            seqs, sums = [], {"s1": [0, 0], "s2": [0, 0]}
            msg = first
            while True:
                seqs.append(msg.seq)
                for rec in msg.records():
                    sums[rec.sub][0] += rec.up
                    sums[rec.sub][1] += rec.down
                if msg.seq >= final_seq:
                    break
                msg = next(stream)
            late.close()
            collector.finish()
            truth = {f"s{s.index}": lab.truth(s) for s in lab.subscribers}
            store = UsageStore.sqlite(tmp_path / "usage.sqlite")
            totals = store.totals(svc_id(svc))
            stored_seq = store.last_seq(svc_id(svc))
            store.close()
        finally:
            for proc in traffic:
                if proc.poll() is None:
                    proc.kill()
            collector.done.set()
            svc.stop_detach()

    assert seqs == list(range(1, final_seq + 1)), "the late client saw every seq once"
    assert stored_seq >= final_seq
    for sub_id, t in truth.items():
        assert t.up_bytes > 500_000 and t.down_bytes > 500_000, "traffic really flowed"
        assert totals[sub_id] == (t.up_bytes, t.down_bytes), f"{sub_id}: totals = nftables"
        assert sums[sub_id] == [t.up_bytes, t.down_bytes], f"{sub_id}: summed deltas = nftables"


def svc_id(svc: Service) -> str:
    return f"t-{svc.lab.tag.lower()}"
