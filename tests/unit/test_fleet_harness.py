"""The fleet test harness itself: real nats-server nodes start, carry JetStream, die and return."""

from __future__ import annotations

import asyncio
import ssl
from pathlib import Path

import nats
import pytest
from nats.js.api import StreamConfig
from nats.js.errors import NoStreamResponseError

from tests.fleet_harness import make_tls, nats_hub

pytestmark = pytest.mark.unit


async def _publish_and_count(urls: list[str], subject: str, ids: range, **connect: object) -> int:
    """Publish one message per id (retried until acknowledged, deduplicated by its id)."""
    nc = await nats.connect(urls, **connect)  # type: ignore[arg-type]
    try:
        js = nc.jetstream()
        for i in ids:
            for _attempt in range(100):
                try:
                    msg_id = {"Nats-Msg-Id": str(i)}
                    await js.publish(subject, str(i).encode(), timeout=1, headers=msg_id)
                    break
                except (NoStreamResponseError, nats.errors.TimeoutError):
                    # A stream whose leader died answers again once the others elect one.
                    await asyncio.sleep(0.1)
            else:
                pytest.fail(f"the stream never took message {i}")
        info = await js.stream_info("T")
        return int(info.state.messages)
    finally:
        await nc.close()


def test_single_node_jetstream_with_tls(tmp_path: Path) -> None:
    tls = make_tls(tmp_path / "tls")
    fragment = tmp_path / "tls.conf"
    fragment.write_text(f'tls: {{cert_file: "{tls.cert}", key_file: "{tls.key}"}}\n')
    ctx = ssl.create_default_context(cafile=str(tls.ca))

    async def run(urls: list[str]) -> int:
        nc = await nats.connect(urls, tls=ctx)
        try:
            await nc.jetstream().add_stream(StreamConfig(name="T", subjects=["t.>"]))
        finally:
            await nc.close()
        return await _publish_and_count(urls, "t.a", range(5), tls=ctx)

    with nats_hub(tmp_path / "hub", include=fragment, tls=tls) as hub:
        assert hub.url.startswith("tls://127.0.0.1:")
        assert asyncio.run(run(hub.urls)) == 5
        proc = hub.nodes[0].proc
        assert proc is not None
    assert proc.poll() is not None, "the harness left nats-server running"


def test_three_node_cluster_survives_a_killed_node(tmp_path: Path) -> None:
    async def create(urls: list[str]) -> None:
        nc = await nats.connect(urls)
        try:
            await nc.jetstream().add_stream(
                StreamConfig(name="T", subjects=["t.>"], num_replicas=3)
            )
        finally:
            await nc.close()

    async def replicas(url: str) -> tuple[int, list[bool]]:
        nc = await nats.connect(url)
        try:
            info = await nc.jetstream().stream_info("T")
            assert info.cluster is not None
            peers = [bool(r.current) for r in info.cluster.replicas or []]
            return int(info.state.messages), peers
        finally:
            await nc.close()

    with nats_hub(tmp_path / "hub", nodes=3) as hub:
        asyncio.run(create(hub.urls))
        assert asyncio.run(_publish_and_count(hub.urls, "t.a", range(10))) == 10
        hub.nodes[0].kill()
        alive = hub.urls[1:]
        assert asyncio.run(_publish_and_count(alive, "t.a", range(10, 20))) == 20
        hub.nodes[0].restart()
        # The restarted node catches up from the others: every replica holds all 20.
        for _ in range(100):
            messages, peers = asyncio.run(replicas(hub.nodes[0].url))
            if messages == 20 and len(peers) == 2 and all(peers):
                break
            asyncio.run(asyncio.sleep(0.1))
        assert (messages, peers) == (20, [True, True])
        procs = [n.proc for n in hub.nodes]
    assert all(p is not None and p.poll() is not None for p in procs)
