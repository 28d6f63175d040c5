"""Dynamic authorization (RFC 5176): radclient sends Disconnect/CoA, the control maps come out.

The server under test gets a fake `handle` that records the request maps and
answers like the control path; radclient (freeradius-utils) is the billing
side, so encoding, authenticators and Message-Authenticator are checked by
FreeRADIUS's own code in both directions.
"""

from __future__ import annotations

import shutil
import socket
import subprocess
import threading
from collections.abc import Iterator
from typing import Any

import pytest
from pyrad.packet import CoAPacket, DisconnectRequest

from desanet.gateway.radius_coa import (
    CoaClient,
    CoaConfig,
    DynamicAuthServer,
    parse_mikrotik_rate,
    resolver,
)
from desanet.meter.radius_dictionary import load_dictionary

pytestmark = pytest.mark.unit

SECRET = "coa-test-secret"
PLAN = {
    "down_min_bps": 1_000_000,
    "down_max_bps": 10_000_000,
    "up_min_bps": 256_000,
    "up_max_bps": 2_000_000,
}


class FakeControl:
    """Records every request map; refuses plans above 50 Mbit/s as the link check would."""

    def __init__(self) -> None:
        self.requests: list[dict[str, Any]] = []

    def handle(self, request: dict[str, Any]) -> dict[str, Any]:
        self.requests.append(request)
        if request["op"] == "plan" and request["down_max"] > 50_000_000:
            return {"ok": False, "error": "plan: down_max is above the link's 50.0 Mbit/s"}
        return {"ok": True, "sub": request["sub"], "state": "active", "plan": PLAN}

    def changes(self) -> list[dict[str, Any]]:
        return [r for r in self.requests if r["op"] != "show"]


@pytest.fixture
def coa() -> Iterator[tuple[DynamicAuthServer, FakeControl]]:
    if shutil.which("radclient") is None:
        pytest.fail("radclient is not installed: run `make setup` (Debian freeradius-utils)")
    control = FakeControl()
    resolve = resolver(
        {"s1": "s1", "rt05-budi": "s2"},
        {"10.0.0.2": "s1", "10.0.0.3": "s2"},
        {"5F3A0C11D2E4B677": "s2"}.get,
    )
    config = CoaConfig(
        clients=(CoaClient("127.0.0.1", SECRET.encode(), rate_per_s=5, burst=10),),
        host="127.0.0.1",
        port=0,
        gateway_id="gw1",
    )
    server = DynamicAuthServer(config, control.handle, resolve, load_dictionary())
    stop = threading.Event()

    def serve() -> None:
        while not stop.is_set():
            server.serve_pending(0.05)

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    try:
        yield server, control
    finally:
        stop.set()
        thread.join()
        server.close()


def radclient(
    server: DynamicAuthServer, command: str, attrs: str, secret: str = SECRET, ma: bool = True
) -> str:
    """radclient's output for one request; `ma` adds a Message-Authenticator."""
    body = attrs + ("\nMessage-Authenticator = 0x00" if ma else "")
    done = subprocess.run(
        ["radclient", "-x", "-r", "1", "-t", "1", f"127.0.0.1:{server.port}", command, secret],
        input=body.encode(),
        capture_output=True,
        timeout=20,
    )
    return done.stdout.decode() + done.stderr.decode()


def test_disconnect_by_user_name_address_or_session_suspends(
    coa: tuple[DynamicAuthServer, FakeControl],
) -> None:
    server, control = coa
    assert "Received Disconnect-ACK" in radclient(server, "disconnect", 'User-Name = "s1"')
    assert "Received Disconnect-ACK" in radclient(
        server, "disconnect", "Framed-IP-Address = 10.0.0.3"
    )
    out = radclient(server, "disconnect", 'Acct-Session-Id = "5F3A0C11D2E4B677"')
    assert "Received Disconnect-ACK" in out
    assert control.changes() == [
        {"op": "suspend", "sub": "s1"},
        {"op": "suspend", "sub": "s2"},
        {"op": "suspend", "sub": "s2"},
    ]


def test_coa_with_a_mikrotik_rate_changes_the_plan_rx_is_upload(
    coa: tuple[DynamicAuthServer, FakeControl],
) -> None:
    server, control = coa
    out = radclient(server, "coa", 'User-Name = "rt05-budi"\nMikrotik-Rate-Limit = "2M/15M"')
    assert "Received CoA-ACK" in out
    assert control.changes() == [
        {
            "op": "plan",
            "sub": "s2",
            "up_max": 2_000_000,
            "down_max": 15_000_000,
            "down_min": 1_000_000,  # kept from the current plan
            "up_min": 256_000,
        }
    ]


def test_coa_with_wispr_bandwidth_keeps_the_other_direction(
    coa: tuple[DynamicAuthServer, FakeControl],
) -> None:
    server, control = coa
    out = radclient(server, "coa", 'User-Name = "s1"\nWISPr-Bandwidth-Max-Down = 512000')
    assert "Received CoA-ACK" in out
    assert control.changes() == [
        {
            "op": "plan",
            "sub": "s1",
            "down_max": 512_000,
            "up_max": 2_000_000,
            "down_min": 512_000,  # the old guarantee is above the new ceiling
            "up_min": 256_000,
        }
    ]


def test_refusals_are_naks_with_an_error_cause(
    coa: tuple[DynamicAuthServer, FakeControl],
) -> None:
    server, control = coa
    out = radclient(server, "disconnect", 'User-Name = "nobody"')
    assert "Received Disconnect-NAK" in out
    assert "Error-Cause = Session-Context-Not-Found" in out
    out = radclient(server, "coa", 'User-Name = "s1"\nMikrotik-Rate-Limit = "2M/80M"')
    assert "Received CoA-NAK" in out
    assert "Error-Cause = Invalid-Attribute-Value" in out
    assert "above the link" in out  # Reply-Message
    out = radclient(server, "coa", 'User-Name = "s1"\nNAS-Identifier = "gw9"')
    assert "Error-Cause = NAS-Identification-Mismatch" in out
    out = radclient(server, "coa", 'User-Name = "s1"')
    assert "Error-Cause = Unsupported-Service" in out
    out = radclient(server, "disconnect", 'User-Name = "s1"\nFilter-Id = "x"')
    assert "Error-Cause = Unsupported-Attribute" in out
    # Only the plan reached the control path (which refused it); the rest were refused before.
    assert [(r["op"], r["down_max"]) for r in control.changes()] == [("plan", 80_000_000)]


def test_wrong_secret_or_no_message_authenticator_gets_no_answer(
    coa: tuple[DynamicAuthServer, FakeControl],
) -> None:
    server, control = coa
    out = radclient(server, "disconnect", 'User-Name = "s1"', secret="not-the-secret")
    assert "No reply from server" in out
    out = radclient(server, "disconnect", 'User-Name = "s1"', ma=False)
    assert "No reply from server" in out
    assert control.requests == []
    assert server.dropped == 2


def test_oversized_and_floods_are_dropped_before_authentication(
    coa: tuple[DynamicAuthServer, FakeControl],
) -> None:
    server, control = coa
    dictionary = load_dictionary()
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        sock.settimeout(1.0)
        sock.sendto(b"\x28\x01\x13\x88" + bytes(4996), ("127.0.0.1", server.port))
        answers = 0
        for ident in range(30):
            packet = CoAPacket(DisconnectRequest, ident, SECRET.encode(), dict=dictionary)
            packet["User-Name"] = "s1"
            packet.add_message_authenticator()
            sock.sendto(packet.RequestPacket(), ("127.0.0.1", server.port))
        try:
            while True:
                sock.recv(4096)
                answers += 1
        except TimeoutError:
            pass
    # The burst of 10 (plus what 5/s refilled meanwhile) is answered, the rest dropped.
    assert 10 <= answers <= 14
    assert len(control.changes()) == answers


def test_mikrotik_rate_strings() -> None:
    assert parse_mikrotik_rate("512k") == {"up_max": 512_000, "down_max": 512_000}
    assert parse_mikrotik_rate("1.5M/20M 0/0 0/0 0/0 8 256k/2M") == {
        "up_max": 1_500_000,
        "down_max": 20_000_000,
        "up_min": 256_000,
        "down_min": 2_000_000,
    }
