"""The operator's console in a real browser (Debian's chromium, headless, driven by Playwright)
against the real service in a lab village with traffic running.

Screenshots of every view land in $DESANET_ARTEFACTS/desanet-console (default: under
/tmp), printed at the end of the run.
"""

from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from playwright.sync_api import Browser, Page, sync_playwright

from desanet.gateway.lab import INET_V4, Village, in_netns, netns_cmd, village
from desanet.gateway.status import SubscriberStatus, read_snapshot
from tests.kernel.test_gateway import Service, row

pytestmark = pytest.mark.kernel

CLI = [sys.executable, "-m", "desanet.gateway.cli"]
CHROMIUM = "/usr/bin/chromium"
PORT = 8443
URL = f"https://127.0.0.1:{PORT}"
PASSWORD = "kata sandi desa 2024"
WALL_BPS = 64_000  # the service's default [control] wall_down
ARTEFACTS = Path(os.environ.get("DESANET_ARTEFACTS", tempfile.gettempdir())) / "desanet-console"


@dataclass
class Stack:
    """The lab, its running service and console, and where their files are."""

    lab: Village
    service: Service
    console: subprocess.Popen[bytes]
    console_log: Path

    def status_row(self, sub_id: str) -> SubscriberStatus:
        snap = read_snapshot(self.service.state)
        return next(s for s in snap.subscribers if s.id == sub_id)


def _add_user(state: Path, name: str, role: str) -> None:
    done = subprocess.run(
        [*CLI, "console", "user", "add", name, "--role", role, "--state", str(state)],
        input=PASSWORD + "\n",
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 0, done.stderr


def _wait_for_port(lab: Village, proc: subprocess.Popen[bytes], log: Path) -> None:
    deadline = time.monotonic() + 90
    while time.monotonic() < deadline:
        assert proc.poll() is None, log.read_text()
        with in_netns(lab.gw_ns), socket.socket() as sock:
            if sock.connect_ex(("127.0.0.1", PORT)) == 0:
                return
        time.sleep(0.2)
    raise AssertionError(f"console did not start:\n{log.read_text()}")


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    folder = tmp_path_factory.mktemp("console-lab")
    with village(3) as lab:
        service = Service(lab, folder)
        service.write_subscribers([row(lab, 1), row(lab, 2)])
        service.start()
        state = folder / "console"
        for name, role in (("otto", "operator"), ("vera", "viewer"), ("ani", "admin")):
            _add_user(state, name, role)
        log_path = folder / "console.log"
        with open(log_path, "ab") as log:
            console = subprocess.Popen(
                netns_cmd(
                    lab.gw_ns,
                    [
                        *CLI,
                        "console",
                        "--config",
                        str(service.config),
                        "--state",
                        str(state),
                        "--listen",
                        f"127.0.0.1:{PORT}",
                        "--timezone",
                        "Asia/Jakarta",
                    ],
                ),
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        try:
            _wait_for_port(lab, console, log_path)
            yield Stack(lab, service, console, log_path)
        finally:
            os.killpg(console.pid, signal.SIGTERM)
            console.wait(timeout=30)
            service.kill(signal.SIGTERM)
            service.stop_detach()


@pytest.fixture(scope="module")
def browser(stack: Stack, request: pytest.FixtureRequest) -> Iterator[Browser]:
    ARTEFACTS.mkdir(parents=True, exist_ok=True)
    for old in ARTEFACTS.glob("*.png"):
        old.unlink()  # only this run's views are listed at the end
    # The browser runs in the gateway's namespace, where the console listens.
    with in_netns(stack.lab.gw_ns):
        driver = sync_playwright().start()
        chromium = driver.chromium.launch(
            executable_path=CHROMIUM, args=["--no-sandbox"], headless=True
        )
    yield chromium
    chromium.close()
    driver.stop()
    reporter = request.config.pluginmanager.get_plugin("terminalreporter")
    capture = request.config.pluginmanager.get_plugin("capturemanager")
    if reporter is not None and capture is not None:
        shots = sorted(p.name for p in ARTEFACTS.glob("*.png"))
        # Past the output capture, so the run ends by saying where the screenshots are.
        with capture.global_and_fixture_disabled():
            reporter.write_line(f"\nconsole screenshots in {ARTEFACTS}: {', '.join(shots)}")


def _page(browser: Browser, locale: str = "en-US", width: int = 1100, height: int = 900) -> Page:
    context = browser.new_context(
        ignore_https_errors=True, locale=locale, viewport={"width": width, "height": height}
    )
    return context.new_page()


def _login(page: Page, name: str) -> None:
    page.goto(f"{URL}/login")
    page.fill("#name", name)
    page.fill("#password", PASSWORD)
    page.click("button[type=submit].primary, input[type=submit].primary")
    page.wait_for_url(f"{URL}/")


def _shot(page: Page, name: str) -> None:
    page.screenshot(path=str(ARTEFACTS / f"{name}.png"), full_page=True)


def _bps(text: str) -> float:
    """'4.1 Mbit/s' -> 4_100_000 (English pages)."""
    match = re.match(r"([\d,.]+) (G|M|k|)bit/s", text.strip())
    assert match, text
    scale = {"G": 1e9, "M": 1e6, "k": 1e3, "": 1}[match.group(2)]
    return float(match.group(1).replace(",", "")) * scale


def _delivered_down_bps(stack: Stack, sub_id: str, seconds: float) -> float:
    """The subscriber's delivered download rate over `seconds`, from the status totals."""
    first = read_snapshot(stack.service.state)
    time.sleep(seconds)
    second = read_snapshot(stack.service.state)
    totals = [
        next(r.down_total for r in snap.subscribers if r.id == sub_id) for snap in (first, second)
    ]
    return 8000 * (totals[1] - totals[0]) / (second.t_ms - first.t_ms)


def _download(stack: Stack, seconds: int, port: int) -> subprocess.Popen[bytes]:
    lab = stack.lab
    lab.popen(lab.inet_ns, ["iperf3", "-s", "-1", "-p", str(port)], stdout=subprocess.DEVNULL)
    time.sleep(0.3)
    return lab.popen(
        lab.subscribers[0].netns,
        ["iperf3", "-c", INET_V4, "-p", str(port), "-u", "-R", "-b", "4M", "-t", str(seconds)],
        stdout=subprocess.DEVNULL,
    )


def test_log_in_and_watch_the_live_rate_of_a_downloading_subscriber(
    stack: Stack, browser: Browser
) -> None:
    page = _page(browser)
    _login(page, "otto")
    _shot(page, "home-en")
    client = _download(stack, 10, 5401)
    try:
        page.goto(f"{URL}/subscribers/s1")
        page.evaluate("window.__sameDocument = true")
        seen = set()
        deadline = time.monotonic() + 8
        while time.monotonic() < deadline:
            seen.add(page.inner_text("#live-down"))
            if len(seen) >= 3 and max(_bps(t) for t in seen) > 2_000_000:
                break
            time.sleep(0.5)
        _shot(page, "subscriber-downloading")
        # The numbers changed in the page itself: no reload happened.
        assert page.evaluate("window.__sameDocument") is True
        assert len(seen) >= 3, seen
        assert max(_bps(t) for t in seen) > 2_000_000, seen
        page.goto(f"{URL}/")
        page.wait_for_timeout(2500)
        assert _bps(page.inner_text("[data-live='link.down']")) > 2_000_000
        _shot(page, "home-busy")
    finally:
        client.wait(timeout=30)


def test_suspending_a_subscriber_brings_its_measured_rate_down_to_the_wall(
    stack: Stack, browser: Browser
) -> None:
    page = _page(browser)
    _login(page, "otto")
    client = _download(stack, 12, 5402)
    try:
        page.goto(f"{URL}/subscribers/s1")
        page.wait_for_timeout(2500)
        assert _bps(page.inner_text("#live-down")) > 2_000_000
        page.select_option("#mode", "wall")
        page.click("#suspend")
        page.wait_for_selector("#resume")
        assert "suspended (walled)" in page.inner_text("#state")
        time.sleep(1)  # what was queued before the suspension drains
        measured = _delivered_down_bps(stack, "s1", 2.0)
        deadline = time.monotonic() + 5
        while _bps(page.inner_text("#live-down")) > WALL_BPS * 1.5:
            assert time.monotonic() < deadline, page.inner_text("#live-down")
            time.sleep(0.5)
        _shot(page, "subscriber-walled")
        assert measured <= WALL_BPS * 1.25, measured
        assert measured > WALL_BPS * 0.5, measured  # walled, not blocked: the trickle flows
        # Billing hears of it: the usage stream's event reaches the console's history.
        deadline = time.monotonic() + 10
        while "suspended" not in page.inner_text("#events-title + ul, #events-title + p"):
            assert time.monotonic() < deadline, "no suspend event from the usage stream"
            page.reload()
        page.click("#resume")
        page.wait_for_selector("#suspend")
    finally:
        client.wait(timeout=30)


def test_adding_an_overlapping_subscriber_shows_the_error_and_applies_nothing(
    stack: Stack, browser: Browser
) -> None:
    before = stack.service.folder.joinpath("subscribers.csv").read_text()
    page = _page(browser)
    _login(page, "otto")
    page.goto(f"{URL}/subscribers/new")
    s1, s3 = stack.lab.subscribers[0], stack.lab.subscribers[2]
    for field, value in (
        ("#id", "s3"),
        ("#name", "Warung Bu Sri"),
        ("#prefixes", s1.ipv4),
        ("#down_min", "1mbit"),
        ("#down_max", "8mbit"),
        ("#up_min", "256kbit"),
        ("#up_max", "2mbit"),
    ):
        page.fill(field, value)
    page.click("input[type=submit].primary")
    error = page.inner_text("#prefixes-error")
    _shot(page, "add-overlap-error")
    assert f"subscriber s3: prefix {s1.ipv4} overlaps {s1.ipv4} of s1" in error
    assert "subscribers.csv" not in error
    assert page.input_value("#id") == "s3"
    time.sleep(1)
    assert stack.service.folder.joinpath("subscribers.csv").read_text() == before
    assert [s.id for s in read_snapshot(stack.service.state).subscribers] == ["s1", "s2"]
    # Corrected, it is written and the service takes it up.
    page.fill("#prefixes", f"{s3.ipv4} {s3.ipv6}")
    page.click("input[type=submit].primary")
    page.wait_for_url(f"{URL}/subscribers/s3")
    deadline = time.monotonic() + 15
    while [s.id for s in read_snapshot(stack.service.state).subscribers] != ["s1", "s2", "s3"]:
        assert time.monotonic() < deadline, stack.service.log.read_text()
        time.sleep(0.2)


def test_a_viewer_has_no_action_buttons_and_the_server_refuses_the_request(
    stack: Stack, browser: Browser
) -> None:
    page = _page(browser)
    _login(page, "vera")
    page.goto(f"{URL}/subscribers/s2")
    _shot(page, "subscriber-viewer")
    assert page.locator("#suspend").count() == 0
    assert page.locator("a[href$='/edit']").count() == 0
    token = page.get_attribute("input[name=csrf_token]", "value")
    assert token  # a valid token: what refuses the request is the role, not CSRF
    reply = page.request.post(
        f"{URL}/subscribers/s2/suspend",
        form={"csrf_token": token, "mode": "block"},
        headers={"Referer": f"{URL}/subscribers/s2"},
    )
    assert reply.status == 403
    time.sleep(0.5)
    assert stack.status_row("s2").state == "active"


def test_indonesian_and_english_pages_render(stack: Stack, browser: Browser) -> None:
    for locale, lang, words in (
        ("id-ID", "id", ("Beranda", "Pelanggan", "Jalur internet")),
        ("en-US", "en", ("Home", "Subscribers", "Internet link")),
    ):
        page = _page(browser, locale=locale)
        _login(page, "ani")
        assert page.get_attribute("html", "lang") == lang
        text = page.inner_text("body")
        for word in words:
            assert word in text, (locale, word)
        _shot(page, f"home-{lang}")
        page.goto(f"{URL}/subscribers")
        _shot(page, f"subscribers-{lang}")
        page.goto(f"{URL}/admin/users")
        _shot(page, f"users-{lang}")


def test_phone_size_layout_has_no_horizontal_overflow(stack: Stack, browser: Browser) -> None:
    page = _page(browser, locale="id-ID", width=390, height=844)
    _login(page, "otto")
    for name, path in (
        ("home", "/"),
        ("subscribers", "/subscribers"),
        ("subscriber", "/subscribers/s1"),
        ("add", "/subscribers/new"),
        ("plan", "/subscribers/s1/plan"),
    ):
        page.goto(f"{URL}{path}")
        width = page.evaluate("document.documentElement.scrollWidth")
        _shot(page, f"phone-{name}")
        assert width <= 390, (path, width)
    # Every control has a label the screen reader (and the tester) can find it by.
    page.goto(f"{URL}/subscribers/new")
    unlabelled = page.evaluate(
        "[...document.querySelectorAll('input:not([type=hidden]):not([type=submit]), select')]"
        ".filter(e => !(e.labels && e.labels.length)).map(e => e.name)"
    )
    assert unlabelled == []
    # And the keyboard reaches the form: Tab from the top lands on a control.
    page.keyboard.press("Tab")
    assert page.evaluate("document.activeElement.tagName") in ("A", "SELECT", "INPUT", "BUTTON")
