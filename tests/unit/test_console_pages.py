"""The console's pages and forms without a browser: both languages, the table, the file edits."""

from __future__ import annotations

import re
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path

import pytest

from desanet.gateway.console.subscribers_file import Refused, SubscribersFile
from desanet.gateway.status import read_snapshot, write_snapshot
from tests.unit.console_helpers import (
    HEADER,
    HTTPS,
    LINK,
    ConsoleUnderTest,
    RecordingEndpoint,
    build,
    csrf_token,
    login,
    post,
    serve_control,
    subscriber_row,
)

pytestmark = pytest.mark.unit


@pytest.fixture
def control() -> Iterator[RecordingEndpoint]:
    yield from serve_control()


@pytest.fixture
def cut(tmp_path: Path, control: RecordingEndpoint) -> ConsoleUnderTest:
    built = build(tmp_path, control, n=120)
    built.add_user("alice", "admin")
    built.add_user("otto", "operator")
    return built


def test_every_page_renders_in_indonesian_and_english(cut: ConsoleUnderTest) -> None:
    for language, words in (
        ("id", ("Pelanggan", "Beranda", "Unduh")),
        ("en", ("Subscribers", "Home", "Download")),
    ):
        client = cut.client()
        client.environ_base["HTTP_ACCEPT_LANGUAGE"] = f"{language},en;q=0.1"
        login(client, "alice")
        for path in (
            "/",
            "/subscribers",
            "/subscribers/s1",
            "/subscribers/new",
            "/subscribers/s1/edit",
            "/subscribers/s1/plan",
            "/subscribers/s1/remove",
            "/admin/users",
            "/admin/audit",
        ):
            reply = client.get(path, base_url=HTTPS)
            assert reply.status_code == 200, (language, path)
            html = reply.get_data(as_text=True)
            assert f'<html lang="{language}">' in html
        home = client.get("/", base_url=HTTPS).get_data(as_text=True)
        for word in words:
            assert word in home, (language, word)
        chart = client.get("/subscribers/s1/usage.svg", base_url=HTTPS)
        assert chart.mimetype == "image/svg+xml" and b"<svg" in chart.data


def test_numbers_follow_the_language(cut: ConsoleUnderTest) -> None:
    texts = {}
    for language in ("id", "en"):
        client = cut.client()
        client.environ_base["HTTP_ACCEPT_LANGUAGE"] = language
        login(client, "alice")
        texts[language] = client.get("/subscribers/s6", base_url=HTTPS).get_data(as_text=True)
    # s6 downloads 6,000,000 bit/s and has used 6.6 MB of 50 GB.
    assert "6,0 Mbit/s" in texts["id"] and "6.0 Mbit/s" in texts["en"]
    assert "6,6 MB dari 50 GB" in texts["id"] and "6.6 MB of 50 GB" in texts["en"]


def test_recent_events_show_when_they_happened(tmp_path: Path, control: RecordingEndpoint) -> None:
    # 2026-11-25 03:04:05 UTC (10.04 in Jakarta); the service's event a second earlier.
    built = build(tmp_path, control, t_ms=1_795_575_845_000)
    built.add_user("vera", "viewer")
    client = built.client()
    client.environ_base["HTTP_ACCEPT_LANGUAGE"] = "en"
    login(client, "vera")
    home = client.get("/", base_url=HTTPS).get_data(as_text=True)
    assert "11/25/26, 10:04" in home and "1/1/70" not in home


def test_table_searches_sorts_and_pages_on_the_server(cut: ConsoleUnderTest) -> None:
    client = cut.client()
    login(client, "otto")
    first = client.get("/subscribers?sort=id", base_url=HTTPS).get_data(as_text=True)
    ids = re.findall(r'<a href="/subscribers/(s\d+)">', first)
    assert len(ids) == 50 and ids[:3] == ["s1", "s10", "s100"]
    by_rate = client.get("/subscribers?sort=down&dir=desc", base_url=HTTPS).get_data(as_text=True)
    top = re.findall(r'<a href="/subscribers/(s\d+)">', by_rate)[0]
    assert int(top[1:]) % 7 == 6
    found = client.get("/subscribers?q=10.77.0.15", base_url=HTTPS).get_data(as_text=True)
    assert re.findall(r'<a href="/subscribers/(s\d+)">', found) == ["s5"]
    last = client.get("/subscribers?page=3", base_url=HTTPS).get_data(as_text=True)
    assert len(re.findall(r'<a href="/subscribers/(s\d+)">', last)) == 20


def test_adding_an_overlapping_subscriber_shows_the_error_and_writes_nothing(
    cut: ConsoleUnderTest,
) -> None:
    client = cut.client()
    login(client, "otto")
    before = cut.subscribers.read_text()
    page = client.get("/subscribers/new", base_url=HTTPS).get_data(as_text=True)
    version = re.search(r'name="version" type="hidden" value="([^"]+)"', page)
    assert version
    form = {
        "csrf_token": csrf_token(page),
        "version": version.group(1),
        "id": "s999",
        "name": "Overlap",
        "prefixes": "10.77.0.0/24",
        "down_min": "100kbit",
        "down_max": "fast",
        "up_min": "32kbit",
        "up_max": "2mbit",
        "quota": "",
    }
    reply = post(client, "/subscribers/new", form)
    assert reply.status_code == 422
    html = reply.get_data(as_text=True)
    assert re.search(r'id="down_max-error">[^<]*512kbit', html)
    form["down_max"] = "10mbit"
    reply = post(client, "/subscribers/new", form)
    html = reply.get_data(as_text=True)
    assert reply.status_code == 422
    # The registry's own check found the overlap; the message sits under the addresses field.
    error = re.search(r'id="prefixes-error">([^<]*)<', html)
    assert error and "subscriber s999: prefix 10.77.0.0/24 overlaps" in error.group(1)
    assert "subscribers.csv" not in error.group(1)
    assert cut.subscribers.read_text() == before
    form["prefixes"] = "10.77.9.9"
    reply = post(client, "/subscribers/new", form)
    assert reply.status_code == 302
    assert (
        cut.subscribers.read_text()
        == before + "s999,Overlap,10.77.9.9,100kbit,10mbit,32kbit,2mbit,\n"
    )
    actions = [(e.action, e.target, e.ok) for e in cut.console.users.audit_log()]
    assert actions[:2] == [("add", "s999", True), ("add", "s999", False)]


def test_an_edit_against_a_file_changed_meanwhile_writes_nothing(cut: ConsoleUnderTest) -> None:
    client = cut.client()
    login(client, "otto")
    page = client.get("/subscribers/s2/edit", base_url=HTTPS).get_data(as_text=True)
    version = re.search(r'name="version" type="hidden" value="([^"]+)"', page)
    assert version
    cut.subscribers.write_text(cut.subscribers.read_text() + "# edited by hand\n")
    changed = cut.subscribers.read_text()
    form = {
        "csrf_token": csrf_token(page),
        "version": version.group(1),
        "id": "s2",
        "name": "Renamed",
        "prefixes": "10.77.0.12",
        "down_min": "100kbit",
        "down_max": "10mbit",
        "up_min": "32kbit",
        "up_max": "2mbit",
        "quota": "50GB",
    }
    reply = post(client, "/subscribers/s2/edit", form)
    assert reply.status_code == 422
    assert cut.subscribers.read_text() == changed


def test_control_actions_reach_the_endpoint_with_the_forms_arguments(
    cut: ConsoleUnderTest,
) -> None:
    client = cut.client()
    login(client, "otto")
    page = client.get("/subscribers/s3/plan", base_url=HTTPS).get_data(as_text=True)
    token = csrf_token(page)
    rates = {"down_min": "200kbit", "down_max": "4mbit", "up_min": "32kbit", "up_max": "1mbit"}
    assert post(client, "/subscribers/s3/plan", {"csrf_token": token, **rates}).status_code == 302
    assert post(client, "/subscribers/s3/resume", {"csrf_token": token}).status_code == 302
    assert post(client, "/subscribers/s3/quota-reset", {"csrf_token": token}).status_code == 302
    assert cut.control.requests == [
        {"op": "plan", "sub": "s3", **rates},
        {"op": "resume", "sub": "s3"},
        {"op": "quota_reset", "sub": "s3"},
    ]


def test_live_numbers_are_small_and_formatted(cut: ConsoleUnderTest) -> None:
    client = cut.client()
    client.environ_base["HTTP_ACCEPT_LANGUAGE"] = "id"
    login(client, "otto")
    reply = client.get("/api/live?ids=s6,s7,nobody", base_url=HTTPS)
    body = reply.get_json()
    assert set(body["rows"]) == {"s6", "s7"}
    assert body["rows"]["s6"]["down"] == "6,0 Mbit/s" and body["rows"]["s6"]["down_bps"] == 6e6
    # The link carries the sum of every subscriber's rate: 120 subscribers at (i % 7) Mbit/s.
    assert body["link"]["down"] == "358,0 Mbit/s"


def test_an_admin_adds_re_roles_and_removes_users_but_never_the_last_admin(
    cut: ConsoleUnderTest,
) -> None:
    client = cut.client()
    login(client, "alice")
    page = client.get("/admin/users", base_url=HTTPS).get_data(as_text=True)
    token = csrf_token(page)
    form = {"csrf_token": token, "name": "budi", "role": "viewer", "password": "budi password 1"}
    assert post(client, "/admin/users", form).status_code == 302
    assert login(cut.client(), "budi", "budi password 1").status_code == 302
    role = {"budi-csrf_token": token, "budi-role": "operator"}
    assert post(client, "/admin/users/budi/role", role).status_code == 302
    assert cut.console.users.get("budi").role == "operator"  # type: ignore[union-attr]
    demote = {"alice-csrf_token": token, "alice-role": "viewer"}
    post(client, "/admin/users/alice/role", demote)
    assert cut.console.users.get("alice").role == "admin"  # type: ignore[union-attr]
    assert post(client, "/admin/users/budi/remove", {"csrf_token": token}).status_code == 302
    assert [u.name for u in cut.console.users.all()] == ["alice", "otto"]
    log = [(e.user, e.action, e.target) for e in cut.console.users.audit_log() if e.user == "alice"]
    assert ("alice", "user_add", "budi") in log and ("alice", "user_remove", "budi") in log


def test_home_warns_of_a_full_journal_and_billing_behind(
    tmp_path: Path, control: RecordingEndpoint
) -> None:
    built = build(tmp_path, control)
    state = tmp_path / "gateway-state"
    snap = read_snapshot(state)
    journal = {"bytes": 900 << 20, "max_bytes": 1 << 30, "first_seq": 1, "last_seq": 7000}
    write_snapshot(
        state,
        replace(snap, seq=7000, journal=journal, outbound=[{"name": "fleet", "acked_seq": 4000}]),
    )
    built.add_user("vera", "viewer")
    pages = {}
    for language in ("en", "id"):
        client = built.client()
        client.environ_base["HTTP_ACCEPT_LANGUAGE"] = language
        login(client, "vera")
        pages[language] = client.get("/", base_url=HTTPS).get_data(as_text=True)
    assert "The usage journal is 88% full" in pages["en"]
    assert "lacks the newest 3,000 usage messages" in pages["en"]
    assert "Jurnal pemakaian sudah 88% penuh" in pages["id"]
    assert "belum menerima 3.000 pesan pemakaian" in pages["id"]


def test_a_subscribers_page_shows_the_macs_it_is_bound_to(
    tmp_path: Path, control: RecordingEndpoint
) -> None:
    built = build(tmp_path, control)
    rows = [subscriber_row(1) + ",02:00:00:aa:bb:01", subscriber_row(2) + ","]
    built.subscribers.write_text(HEADER.rstrip("\n") + ",mac\n" + "\n".join(rows) + "\n")
    built.add_user("vera", "viewer")
    client = built.client()
    client.environ_base["HTTP_ACCEPT_LANGUAGE"] = "id"
    login(client, "vera")
    page = client.get("/subscribers/s1", base_url=HTTPS).get_data(as_text=True)
    assert "Alamat MAC" in page and "02:00:00:aa:bb:01" in page
    other = client.get("/subscribers/s2", base_url=HTTPS).get_data(as_text=True)
    assert "Alamat MAC" not in other


def test_editing_keeps_the_radius_user_and_mac_columns_as_the_file_has_them(
    tmp_path: Path,
) -> None:
    path = tmp_path / "subscribers.csv"
    rows = [subscriber_row(1) + ",rt05-budi,02:00:00:aa:bb:01", subscriber_row(2) + ",,"]
    path.write_text(HEADER.rstrip("\n") + ",radius_user,mac\n" + "\n".join(rows) + "\n")
    file = SubscribersFile(path, LINK, 64)
    entry = file.entry("s1")
    assert entry is not None
    file.update("s1", replace(entry, name="Renamed"), file.version())
    file.add(replace(entry, id="s9", name="New", prefixes="10.77.0.99"), file.version())
    lines = path.read_text().splitlines()
    assert lines[1] == (
        "s1,Renamed,10.77.0.11,100kbit,10mbit,32kbit,2mbit,50GB,rt05-budi,02:00:00:aa:bb:01"
    )
    assert lines[-1] == "s9,New,10.77.0.99,100kbit,10mbit,32kbit,2mbit,50GB,,"
    assert [s.user_name for s in file.subscribers()] == ["rt05-budi", "s2", "s9"]
    # The registry's check still guards the RADIUS names: a clash is refused, nothing written.
    before = path.read_text()
    with pytest.raises(Refused, match="RADIUS User-Name 'rt05-budi' is already s1's"):
        file.add(replace(entry, id="rt05-budi", prefixes="10.77.0.98"), file.version())
    assert path.read_text() == before


def test_editing_and_adding_keep_the_mac_column(tmp_path: Path, control: RecordingEndpoint) -> None:
    built = build(tmp_path, control)
    rows = [subscriber_row(1) + ",02:00:00:aa:bb:01", subscriber_row(2) + ","]
    built.subscribers.write_text(HEADER.rstrip("\n") + ",mac\n" + "\n".join(rows) + "\n")
    built.add_user("otto", "operator")
    client = built.client()
    login(client, "otto")
    page = client.get("/subscribers/s1/edit", base_url=HTTPS).get_data(as_text=True)
    version = re.search(r'name="version" type="hidden" value="([^"]+)"', page)
    assert version
    form = {
        "csrf_token": csrf_token(page),
        "version": version.group(1),
        "id": "s1",
        "name": "Renamed",
        "prefixes": "10.77.0.11",
        "down_min": "100kbit",
        "down_max": "8mbit",
        "up_min": "32kbit",
        "up_max": "2mbit",
        "quota": "50GB",
    }
    assert post(client, "/subscribers/s1/edit", form).status_code == 302
    page = client.get("/subscribers/new", base_url=HTTPS).get_data(as_text=True)
    version = re.search(r'name="version" type="hidden" value="([^"]+)"', page)
    assert version
    added = {**form, "version": version.group(1), "csrf_token": csrf_token(page)}
    added |= {"id": "s9", "name": "New", "prefixes": "10.77.0.99"}
    assert post(client, "/subscribers/new", added).status_code == 302
    lines = built.subscribers.read_text().splitlines()
    assert lines[0].endswith(",mac")
    assert lines[1] == "s1,Renamed,10.77.0.11,100kbit,8mbit,32kbit,2mbit,50GB,02:00:00:aa:bb:01"
    assert lines[-1].startswith("s9,New,10.77.0.99,") and lines[-1].endswith(",")
