"""The emulated satellite link of the catch-up benchmark delays and rate-limits what it carries."""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Iterator

import pytest

from tests.fleet_slowlink import LinkShape, SlowLink

pytestmark = pytest.mark.unit


@pytest.fixture
def echo_port() -> Iterator[int]:
    """A TCP echo server on loopback, one connection at a time, until the test ends."""
    server = socket.create_server(("127.0.0.1", 0))
    server.settimeout(0.2)
    stop = threading.Event()

    def serve() -> None:
        while not stop.is_set():
            try:
                conn, _ = server.accept()
            except TimeoutError:
                continue
            with conn:
                while data := conn.recv(65536):
                    conn.sendall(data)

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    yield server.getsockname()[1]
    stop.set()
    thread.join(5)
    server.close()


def _round_trip(port: int, size: int) -> float:
    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
        start = time.monotonic()
        sender = threading.Thread(target=sock.sendall, args=(b"x" * size,))
        sender.start()
        got = 0
        while got < size:
            chunk = sock.recv(65536)
            assert chunk, "the link closed early"
            got += len(chunk)
        sender.join()
        return time.monotonic() - start


def test_the_link_adds_its_delay_and_carries_at_most_its_rate(echo_port: int) -> None:
    link = SlowLink(echo_port, LinkShape(rate_bps=8_000_000, delay_s=0.1))
    port = link.start()
    try:
        small = _round_trip(port, 10)
        # 0.4 s at 8 Mbit/s each way, both ways at once, plus the round trip: 0.6 s at least.
        bulk = _round_trip(port, 400_000)
    finally:
        link.stop()
    assert 0.2 <= small < 0.4, f"round trip {small:.3f} s, the link says 0.2 s"
    assert 0.58 <= bulk < 1.5, f"400 kB echoed in {bulk:.3f} s: the rate is not 8 Mbit/s"
