"""The console's security without a browser: sessions, roles, CSRF, login limits, cookie flags."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.unit.console_helpers import (
    HTTPS,
    ConsoleUnderTest,
    RecordingEndpoint,
    build,
    csrf_token,
    login,
    post,
    serve_control,
)

pytestmark = pytest.mark.unit

PAGES = [
    "/",
    "/subscribers",
    "/subscribers/s1",
    "/subscribers/s1/usage.svg",
    "/subscribers/new",
    "/subscribers/s1/edit",
    "/subscribers/s1/plan",
    "/subscribers/s1/remove",
    "/admin/users",
    "/admin/audit",
]
ACTIONS = [
    "/subscribers/new",
    "/subscribers/s1/edit",
    "/subscribers/s1/remove",
    "/subscribers/s1/plan",
    "/subscribers/s1/suspend",
    "/subscribers/s1/resume",
    "/subscribers/s1/quota-reset",
    "/subscribers/s1/plan-reset",
    "/admin/users",
    "/admin/users/alice/role",
    "/admin/users/alice/remove",
    "/logout",
]


@pytest.fixture
def control() -> Iterator[RecordingEndpoint]:
    yield from serve_control()


@pytest.fixture
def cut(tmp_path: Path, control: RecordingEndpoint) -> ConsoleUnderTest:
    built = build(tmp_path, control)
    built.add_user("alice", "admin")
    built.add_user("otto", "operator")
    built.add_user("vera", "viewer")
    return built


def test_no_page_or_action_without_a_session(cut: ConsoleUnderTest) -> None:
    client = cut.client()
    before = cut.subscribers.read_text()
    for path in PAGES:
        reply = client.get(path, base_url=HTTPS)
        assert reply.status_code == 302, path
        assert reply.headers["Location"].startswith("/login?next="), path
    assert client.get("/api/live?ids=s1", base_url=HTTPS).status_code == 401
    for path in ACTIONS:
        reply = post(client, path, {"mode": "block", "id": "s9"})
        assert reply.status_code == 401, path
    assert cut.control.requests == []
    assert cut.subscribers.read_text() == before
    assert [u.name for u in cut.console.users.all()] == ["alice", "otto", "vera"]


def test_actions_without_the_csrf_token_are_refused(cut: ConsoleUnderTest) -> None:
    client = cut.client()
    assert login(client, "otto").status_code == 302
    for path in ACTIONS[:-1]:
        reply = post(client, path, {"mode": "block"})
        assert reply.status_code == 400, path
    forged = post(client, "/subscribers/s1/suspend", {"mode": "block", "csrf_token": "forged"})
    assert forged.status_code == 400
    assert cut.control.requests == []
    # The same action with the page's token goes through to the control endpoint.
    page = client.get("/subscribers/s1", base_url=HTTPS).get_data(as_text=True)
    reply = post(
        client, "/subscribers/s1/suspend", {"mode": "block", "csrf_token": csrf_token(page)}
    )
    assert reply.status_code == 302
    assert cut.control.requests == [{"op": "suspend", "sub": "s1", "mode": "block"}]
    audit = cut.console.users.audit_log()
    assert (audit[0].user, audit[0].action, audit[0].target, audit[0].ok) == (
        "otto",
        "suspend",
        "s1",
        True,
    )


def test_a_viewer_sees_no_action_and_is_refused_by_the_server(cut: ConsoleUnderTest) -> None:
    client = cut.client()
    assert login(client, "vera").status_code == 302
    page = client.get("/subscribers/s1", base_url=HTTPS).get_data(as_text=True)
    assert 'id="suspend"' not in page and "/subscribers/s1/edit" not in page
    token = csrf_token(page)
    for path in ACTIONS[:-3]:
        reply = post(client, path, {"mode": "block", "csrf_token": token})
        assert reply.status_code == 403, path
    for path in ("/subscribers/new", "/admin/users", "/admin/audit"):
        assert client.get(path, base_url=HTTPS).status_code == 403, path
    assert cut.control.requests == []


def test_wrong_passwords_are_rate_limited_per_user_name(cut: ConsoleUnderTest) -> None:
    client = cut.client()
    for _ in range(5):
        assert login(client, "otto", "wrong password").status_code == 401
    # The sixth attempt is refused before the password is even checked, right or wrong.
    assert login(client, "otto").status_code == 429
    assert login(cut.client(), "vera").status_code == 302
    failures = [e for e in cut.console.users.audit_log() if e.action == "login" and not e.ok]
    assert len(failures) == 5


def test_session_cookie_is_secure_httponly_samesite_host_only(cut: ConsoleUnderTest) -> None:
    reply = login(cut.client(), "otto")
    cookies = [c for c in reply.headers.getlist("Set-Cookie") if c.startswith("__Host-desanet=")]
    assert len(cookies) == 1
    flags = {part.strip().split("=")[0].lower() for part in cookies[0].split(";")[1:]}
    assert {"secure", "httponly", "samesite", "path"} <= flags
    assert "SameSite=Strict" in cookies[0] and "Path=/" in cookies[0]
    assert "domain" not in flags


def test_a_password_change_ends_the_users_sessions(cut: ConsoleUnderTest) -> None:
    client = cut.client()
    login(client, "otto")
    assert client.get("/", base_url=HTTPS).status_code == 200
    cut.console.users.set_password("otto", "another long password")
    assert client.get("/", base_url=HTTPS).status_code == 302


def test_login_redirects_only_within_the_console(cut: ConsoleUnderTest) -> None:
    client = cut.client()
    page = client.get("/login", base_url=HTTPS)
    reply = post(
        client,
        "/login?next=//evil.example/x",
        {
            "name": "otto",
            "password": "correct horse battery",
            "csrf_token": csrf_token(page.get_data(as_text=True)),
        },
    )
    assert reply.status_code == 302 and reply.headers["Location"] == "/"


def test_pages_carry_a_strict_content_policy(cut: ConsoleUnderTest) -> None:
    client = cut.client()
    login(client, "vera")
    reply = client.get("/subscribers", base_url=HTTPS)
    policy = reply.headers["Content-Security-Policy"]
    assert "script-src 'self'" in policy and "frame-ancestors 'none'" in policy
    assert "unsafe-inline" not in policy
    assert reply.headers["Cache-Control"] == "no-store"
