"""A console on files in a temporary folder, with a real control endpoint on loopback that
records what it was asked (shared by the console's unit tests)."""

from __future__ import annotations

import re
import threading
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from zoneinfo import ZoneInfo

from flask import Flask
from flask.testing import FlaskClient

from desanet.gateway.config import LinkConfig
from desanet.gateway.console.app import Settings, create_app
from desanet.gateway.console.control_link import ControlLink
from desanet.gateway.console.history import UsageHistory
from desanet.gateway.console.services import Console
from desanet.gateway.console.status_source import StatusSource
from desanet.gateway.console.store import Database
from desanet.gateway.console.subscribers_file import SubscribersFile
from desanet.gateway.console.users import UserStore
from desanet.gateway.control import ControlEndpoint
from desanet.gateway.status import StatusSnapshot, SubscriberStatus, write_snapshot
from desanet.meter.keys import ClientSecurity, ServerSecurity
from desanet.meter.wire import UsageEvent

HEADER = "id,name,prefixes,down_min,down_max,up_min,up_max,quota\n"
LINK = LinkConfig(down_bps=20_000_000, up_bps=5_000_000)
HTTPS = "https://localhost"
PASSWORD = "correct horse battery"


def subscriber_row(i: int) -> str:
    return f"s{i},Sub {i},10.77.{i // 200}.{10 + i % 200},100kbit,10mbit,32kbit,2mbit,50GB"


def status_row(i: int, down_bps: float = 0.0) -> SubscriberStatus:
    return SubscriberStatus(
        id=f"s{i}",
        name=f"Sub {i}",
        slot=i,
        state="active",
        down_max_bps=10_000_000,
        up_max_bps=2_000_000,
        down_bps=down_bps,
        up_bps=down_bps / 10,
        down_total=i * 1_000_000,
        up_total=i * 100_000,
        period_bytes=i * 1_100_000,
        quota_bytes=50_000_000_000,
    )


def write_gateway(folder: Path, n: int, t_ms: int) -> tuple[Path, Path]:
    """A gateway state folder with a status of `n` subscribers, and their subscribers file."""
    state = folder / "gateway-state"
    state.mkdir(parents=True, exist_ok=True)
    subs = folder / "subscribers.csv"
    subs.write_text(HEADER + "\n".join(subscriber_row(i) for i in range(1, n + 1)) + "\n")
    write_snapshot(
        state,
        StatusSnapshot(
            gateway="t-gw",
            t_ms=t_ms,
            started_ms=t_ms - 60_000,
            link_down_bps=LINK.down_bps,
            link_up_bps=LINK.up_bps,
            leaf_wanted="fq_codel",
            leaf_in_use="fq_codel",
            seq=7,
            subscribers=[status_row(i, 1_000_000.0 * (i % 7)) for i in range(1, n + 1)],
            events=[UsageEvent(t_ms - 1000, "s1", "suspend", "now x")._asdict()],
        ),
    )
    return state, subs


@dataclass
class RecordingEndpoint:
    """A real control endpoint answering `ok` and keeping every request it was sent."""

    endpoint: ControlEndpoint
    requests: list[dict[str, Any]] = field(default_factory=list)
    stop: threading.Event = field(default_factory=threading.Event)

    def handle(self, batch: Sequence[object]) -> list[dict[str, Any]]:
        replies = []
        for request in batch:
            assert isinstance(request, dict)
            self.requests.append(request)
            replies.append({"ok": True, "sub": request.get("sub"), "state": "active"})
        return replies


@dataclass
class ConsoleUnderTest:
    """The app, its collaborators and the files behind them."""

    app: Flask
    console: Console
    control: RecordingEndpoint
    subscribers: Path
    folder: Path

    def client(self) -> FlaskClient:
        return self.app.test_client()

    def add_user(self, name: str, role: str) -> None:
        self.console.users.add(name, role, PASSWORD)


def serve_control() -> Iterator[RecordingEndpoint]:
    recorder = RecordingEndpoint(
        ControlEndpoint("tcp://127.0.0.1:*", ServerSecurity(plaintext=True))
    )

    def loop() -> None:
        while not recorder.stop.is_set():
            if recorder.endpoint.sock.poll(20):
                recorder.endpoint.serve_pending(recorder.handle)

    thread = threading.Thread(target=loop, daemon=True)
    thread.start()
    yield recorder
    recorder.stop.set()
    thread.join()
    recorder.endpoint.close()


def build(
    folder: Path, control: RecordingEndpoint, n: int = 3, t_ms: int | None = None
) -> ConsoleUnderTest:
    import time

    now = t_ms if t_ms is not None else time.time_ns() // 1_000_000
    state, subs = write_gateway(folder, n, now)
    db = Database(folder / "console")
    console = Console(
        status=StatusSource(state, 1000),
        control=ControlLink(control.endpoint.endpoint, ClientSecurity(), timeout_ms=2000),
        file=SubscribersFile(subs, LINK, 65536),
        history=UsageHistory(
            db, "tcp://127.0.0.1:1", "tcp://127.0.0.1:2", ClientSecurity(), ZoneInfo("Asia/Jakarta")
        ),
        users=UserStore(db),
    )
    settings = Settings(secret_key=b"k" * 32, secure_cookies=True, timezone="Asia/Jakarta")
    app = create_app(console, settings)
    return ConsoleUnderTest(app, console, control, subs, folder)


_TOKEN = re.compile(
    r'name="csrf_token" type="hidden" value="([^"]+)"|name="csrf_token" value="([^"]+)"'
)


def csrf_token(html: str) -> str:
    match = _TOKEN.search(html)
    assert match, "no CSRF token in the page"
    return match.group(1) or match.group(2)


def post(client: FlaskClient, path: str, data: dict[str, str]) -> Any:
    """A form POST as a browser sends it over HTTPS (with its same-origin Referer)."""
    return client.post(path, data=data, base_url=HTTPS, headers={"Referer": HTTPS + "/"})


def login(client: FlaskClient, name: str, password: str = PASSWORD) -> Any:
    page = client.get("/login", base_url=HTTPS)
    token = csrf_token(page.get_data(as_text=True))
    return post(client, "/login", {"name": name, "password": password, "csrf_token": token})
