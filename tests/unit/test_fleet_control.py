"""Control across CGNAT: billing on the hub sends control requests over NATS to a running gateway.

The service loop runs with the kernel parts faked and the real usage stream,
forwarder and control path; the hub is a nats-server configured by `desanet
hub init` (TLS, NKEY users, a billing user with the control role). Billing
gets the same reply maps as over ZeroMQ, and the change comes back as an
event in the usage stream the hub's JetStream holds.
"""

from __future__ import annotations

import asyncio
import threading
import time
from pathlib import Path
from typing import Any

import msgpack
import nats
import pytest

from desanet.gateway.service import GatewayService
from desanet.meter import fleet
from desanet.meter.wire import decode_usage
from tests.fleet_harness import FleetHub, fleet_hub, read_stream
from tests.unit.service_lab import S1, S2, Lab, control

pytestmark = pytest.mark.unit

GATEWAY = "desa-loop"


async def _requests(hub: FleetHub, bodies: list[bytes]) -> list[dict[str, Any]]:
    nc = await nats.connect(**hub.billing().connect_options())
    try:
        replies = []
        for body in bodies:
            for _attempt in range(100):
                try:
                    msg = await nc.request(fleet.control_subject(GATEWAY), body, timeout=10)
                    break
                except nats.errors.NoRespondersError:
                    await asyncio.sleep(0.05)  # the gateway is still connecting to the hub
            replies.append(msgpack.unpackb(msg.data, raw=False))
        return replies
    finally:
        await nc.close()


def _over_nats(service: GatewayService, hub: FleetHub, *bodies: bytes) -> list[dict[str, Any]]:
    """Send `bodies` as billing, one request at a time, while the service loop runs."""
    outcome: list[Any] = []
    sender = threading.Thread(target=lambda: outcome.append(asyncio.run(_requests(hub, [*bodies]))))
    sender.start()
    while sender.is_alive():
        service.step()
    sender.join()
    return list(outcome[0])


def test_billing_controls_the_gateway_over_the_hub_and_sees_the_event(tmp_path: Path) -> None:
    with fleet_hub(tmp_path / "hub", [GATEWAY]) as hub:
        (tmp_path / "gw").mkdir()
        lab = Lab(tmp_path / "gw")
        config = lab.folder / "gateway.toml"
        ca, key = hub.tls.ca, hub.files.gateways[GATEWAY]
        servers = ", ".join(f'"{s}"' for s in hub.nats.urls)
        fleet_toml = f'\n[fleet]\nservers = [{servers}]\ncredentials = "{key}"\nca = "{ca}"\n'
        config.write_text(config.read_text() + fleet_toml)
        lab.write(S1, S2)
        service = lab.service()
        service.start()
        try:
            lab.tick(service)
            show = {"op": "show", "sub": "s2"}
            suspend, shown, unknown, too_big, garbage = _over_nats(
                service,
                hub,
                msgpack.packb({"op": "suspend", "sub": "s1"}),
                msgpack.packb(show),
                msgpack.packb({"op": "suspend", "sub": "nobody"}),
                msgpack.packb({"op": "show", "sub": "s2", "pad": "x" * 5000}),
                b"\xc1 not msgpack",
            )
            # The same request over ZeroMQ gets the same reply map.
            assert shown == control(service, lab, show)
            for _ in range(3):
                lab.datapath.send("10.0.0.2", down=500)
                lab.tick(service)
            assert lab.meter is not None
            last = lab.meter.last_seq
            (forwarder,) = service.parts.outbound
            deadline = time.monotonic() + 10
            while forwarder.progress()["acked_seq"] < last and time.monotonic() < deadline:
                time.sleep(0.05)
        finally:
            service.close()
        assert suspend["ok"] is True and suspend["state"].startswith("suspended"), suspend
        assert suspend["applied"] is True
        assert shown["ok"] is True and shown["sub"] == "s2"
        assert unknown["ok"] is False and "nobody" in unknown["error"]
        assert too_big == {"ok": False, "error": "malformed: request over 4096 bytes"}
        assert garbage["ok"] is False and "malformed" in garbage["error"]
        events = [(e.sub, e.kind) for m in read_stream(hub) for e in decode_usage(m.data).events]
        assert events == [("s1", "suspend")], events
