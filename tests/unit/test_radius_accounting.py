"""RADIUS accounting from the journal, against a real FreeRADIUS writing radacct to PostgreSQL.

The usage is produced by the real MeterService (journal and all); the ground
truth is the sum of the `up`/`down` columns it journaled. radacct must hold
exactly those bytes per user and month, after outages and restarts too.
(Over 400 lines: every case shares one FreeRADIUS and PostgreSQL, started once per module.)
"""

from __future__ import annotations

import calendar
import json
import random
import re
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

from desanet.cython_ext.usage import UsageInterval
from desanet.meter.radius import AccountingConfig, RadiusAccounting, subscriber_attributes
from desanet.meter.radius_sessions import (
    Accountant,
    Mark,
    SessionBook,
    month_of_t1,
)
from desanet.meter.radius_transport import RadiusServer
from desanet.meter.service import MeterService
from desanet.meter.wire import decode_usage
from tests.pg_harness import postgres_cluster
from tests.radius_harness import FreeRadius, free_udp_port, freeradius_server
from tests.unit.test_stream import loopback_service

pytestmark = pytest.mark.unit

SLOTS = {"s1": 1, "s2": 2, "s3": 3}
NOV_10 = calendar.timegm((2026, 11, 10, 0, 0, 0)) * 1000
DEC_1 = calendar.timegm((2026, 12, 1, 0, 0, 0)) * 1000
ATTRS = {
    "s1": subscriber_attributes("s1", ["10.0.0.2", "2001:db8:1::/64"], "02:00:00:00:00:01"),
    "s2": subscriber_attributes("s2", ["10.0.0.3/32"], None, "rt05-budi"),
    "s3": subscriber_attributes("s3", ["10.0.1.0/24"]),
}


@pytest.fixture(scope="module")
def radius() -> Iterator[FreeRadius]:
    with postgres_cluster() as pg, freeradius_server(pg) as server:
        yield server


@pytest.fixture
def fr(radius: FreeRadius) -> Iterator[FreeRadius]:
    radius.query("DELETE FROM radacct")
    if radius.process is None:
        radius.start()
    yield radius
    if radius.process is None:
        radius.start()


class Traffic:
    """Publishes intervals through a MeterService and keeps the ground truth per user."""

    def __init__(self, svc: MeterService, seed: int = 1) -> None:
        self.svc = svc
        self.rng = random.Random(seed)
        self.totals = {s: [0, 0] for s in SLOTS}
        self.truth: dict[tuple[str, str], list[int]] = {}  # (user, month) -> [up, down]

    def publish(self, t1_ms: int, usage: dict[str, tuple[int, int]], t0_ms: int = 0) -> None:
        subs = list(usage)
        for sub in subs:
            self.totals[sub][0] += usage[sub][0]
            self.totals[sub][1] += usage[sub][1]
            key = (ATTRS[sub].user_name, month_of_t1(t1_ms))
            row = self.truth.setdefault(key, [0, 0])
            row[0] += usage[sub][0]
            row[1] += usage[sub][1]

        def col(values: list[int]) -> np.ndarray:
            return np.array(values, dtype=np.uint64)

        self.svc.publish(
            UsageInterval(
                t0_ms=t0_ms or t1_ms - 10_000,
                t1_ms=t1_ms,
                slots=np.array([SLOTS[s] for s in subs], dtype=np.uint32),
                up=col([usage[s][0] for s in subs]),
                down=col([usage[s][1] for s in subs]),
                up_pkts=col([max(1, usage[s][0] // 1000) for s in subs]),
                down_pkts=col([max(1, usage[s][1] // 1000) for s in subs]),
                up_total=col([self.totals[s][0] for s in subs]),
                down_total=col([self.totals[s][1] for s in subs]),
            ),
            {},
        )

    def random_run(self, t1_ms: int, count: int, step_ms: int = 10_000) -> int:
        for _ in range(count):
            t1_ms += step_ms
            moved = [s for s in SLOTS if self.rng.random() < 0.7] or ["s1"]
            self.publish(
                t1_ms,
                {s: (self.rng.randrange(1, 90_000), self.rng.randrange(1, 900_000)) for s in moved},
            )
        return t1_ms

    def by_user(self) -> dict[str, tuple[int, int]]:
        out: dict[str, list[int]] = {}
        for (user, _month), (up, down) in self.truth.items():
            row = out.setdefault(user, [0, 0])
            row[0] += up
            row[1] += down
        return {u: (v[0], v[1]) for u, v in out.items()}


def accounting(svc: MeterService, servers: list[RadiusServer], **kw: object) -> RadiusAccounting:
    config = AccountingConfig(
        servers=tuple(servers),
        interim_s=60,
        timeout_s=0.2,
        max_timeout_s=0.5,
        tries_per_server=2,
        poll_s=0.05,
        **kw,  # type: ignore[arg-type]
    )
    acct = RadiusAccounting("gw1", svc.journal, svc.state_dir, config, ATTRS.get)
    acct.start()
    return acct


def server_of(fr: FreeRadius) -> RadiusServer:
    return RadiusServer("127.0.0.1", fr.port, fr.secret.encode())


def by_month(fr: FreeRadius) -> dict[tuple[str, str], list[int]]:
    rows = fr.query(
        "SELECT username, to_char(acctstarttime AT TIME ZONE 'UTC', 'YYYY-MM'), "
        "SUM(acctinputoctets), SUM(acctoutputoctets) FROM radacct GROUP BY 1, 2"
    )
    return {(str(r[0]), str(r[1])): [int(r[2]), int(r[3])] for r in rows}


def test_radacct_holds_exactly_the_delivered_bytes_per_user_and_month(
    tmp_path: Path, fr: FreeRadius
) -> None:
    svc = loopback_service(tmp_path / "state")
    traffic = Traffic(svc)
    acct = accounting(svc, [server_of(fr)])
    try:
        # 2026-11-30 23:50 to 2026-12-01 00:10: the month changes in the middle.
        t = traffic.random_run(DEC_1 - 600_000, 120)
        assert acct.wait_idle(30)
    finally:
        acct.close()
        svc.close()
    assert t > DEC_1
    assert by_month(fr) == traffic.truth
    rows = fr.query(
        "SELECT username, acctstoptime IS NOT NULL, acctterminatecause, framedipaddress::text, "
        "framedipv6prefix::text, callingstationid, nasipaddress::text, acctsessionid "
        "FROM radacct ORDER BY acctstarttime, username"
    )
    # Two sessions per user (November, December), all closed; the last by the gateway's stop.
    assert sorted(r[0] for r in rows) == sorted(["s1", "rt05-budi", "s3"] * 2)
    assert all(r[1] for r in rows)
    assert [r[2] for r in rows[:3]] == ["Session-Timeout"] * 3
    assert [r[2] for r in rows[3:]] == ["Admin-Reboot"] * 3
    s1 = next(r for r in rows if r[0] == "s1")
    assert s1[3:7] == ("10.0.0.2/32", "2001:db8:1::/64", "02:00:00:00:00:01", "127.0.0.1/32")
    assert len({r[7] for r in rows}) == 6  # every session its own Acct-Session-Id
    # The November sessions stop at the last instant of November.
    stops = fr.query(
        "SELECT DISTINCT EXTRACT(EPOCH FROM acctstoptime)::bigint FROM radacct "
        "WHERE acctterminatecause = 'Session-Timeout'"
    )
    assert stops == [(DEC_1 // 1000,)]


def test_outage_and_restart_lose_nothing_and_count_nothing_twice(
    tmp_path: Path, fr: FreeRadius
) -> None:
    svc = loopback_service(tmp_path / "state")
    traffic = Traffic(svc, seed=2)
    acct = accounting(svc, [server_of(fr)], stop_wait_s=0.5)
    try:
        t = traffic.random_run(NOV_10, 20)
        assert acct.wait_idle(30)
        ids_before = {r[0] for r in fr.query("SELECT acctsessionid FROM radacct")}
        fr.stop()
        t = traffic.random_run(t, 40)
        assert not acct.wait_idle(1.0)
        # The gateway stops while RADIUS is down, and starts again before it is back.
        acct.close()
        acct = accounting(svc, [server_of(fr)], stop_wait_s=0.5)
        t = traffic.random_run(t, 20)
        assert not acct.wait_idle(0.5)
        fr.start()
        assert acct.wait_idle(60)
        assert acct.sender.retransmitted > 0
    finally:
        acct.close()
        svc.close()
    assert fr.octets_by_user() == traffic.by_user()
    sessions = fr.query(
        "SELECT acctsessionid, acctterminatecause FROM radacct ORDER BY acctstarttime"
    )
    # The first run's sessions (same ids as before the outage) ended at the stop; the
    # second run's are new.
    assert ids_before <= {r[0] for r in sessions}
    assert len(sessions) == 6
    assert sorted(r[1] for r in sessions) == ["Admin-Reboot"] * 6


def logged_requests(fr: FreeRadius, session_id: str) -> list[dict[str, str]]:
    """The Accounting-Requests of one session as FreeRADIUS logged them (-X): name -> value."""
    out = []
    for block in fr.output.read_text().split("Received Accounting-Request")[1:]:
        attrs = {}
        for line in block.splitlines()[1:]:
            found = re.match(r"^\(\d+\)   ([A-Za-z0-9-]+) = (.*)$", line)
            if found is None:
                break
            attrs[found[1]] = found[2].strip('"')
        if attrs.get("Acct-Session-Id") == session_id:
            out.append(attrs)
    return out


def test_times_and_the_delay_of_late_requests_reach_freeradius(
    tmp_path: Path, fr: FreeRadius
) -> None:
    """Event-Timestamp is when it happened, Acct-Delay-Time how late it is sent (RFC 2866 5.2)."""
    svc = loopback_service(tmp_path / "state")
    traffic = Traffic(svc)
    acct = accounting(svc, [server_of(fr)])
    start_s, interim_s = NOV_10 // 1000 - 10, NOV_10 // 1000 + 80
    try:
        before_s = int(time.time())
        traffic.publish(NOV_10, {"s1": (100, 200)})  # the interval from NOV_10 - 10 s
        traffic.publish(NOV_10 + 80_000, {"s1": (300, 400)})
        assert acct.wait_idle(30)
    finally:
        acct.close()
        svc.close()
    after_s = int(time.time()) + 1
    ((sid, started, stopped, session_time, cause),) = fr.query(
        "SELECT acctsessionid, EXTRACT(EPOCH FROM acctstarttime)::bigint, "
        "EXTRACT(EPOCH FROM acctstoptime)::bigint, acctsessiontime, acctterminatecause "
        "FROM radacct"
    )
    assert started == start_s and cause == "Admin-Reboot"
    assert before_s <= stopped <= after_s  # the gateway's stop, now
    assert session_time == stopped - start_s  # Acct-Session-Time, as sent
    requests = logged_requests(fr, sid)
    assert [r["Acct-Status-Type"] for r in requests] == ["Start", "Interim-Update", "Stop"]
    for request, event_s in zip(requests[:2], (start_s, interim_s), strict=True):
        # Sent weeks after the fact: the delay says so, and the event keeps its own time.
        delay = int(request["Acct-Delay-Time"])
        assert before_s - event_s <= delay <= after_s - event_s
        assert request["Event-Timestamp"] == time.strftime(
            "%b %e %Y %H:%M:%S UTC", time.gmtime(event_s)
        )
    assert int(requests[2]["Acct-Delay-Time"]) <= after_s - before_s


def test_a_session_past_4_gib_carries_gigawords(tmp_path: Path, fr: FreeRadius) -> None:
    svc = loopback_service(tmp_path / "state")
    traffic = Traffic(svc)
    acct = accounting(svc, [server_of(fr)])
    try:
        up, down = (5 << 30) + 123, (9 << 30) + 7
        traffic.publish(NOV_10, {"s1": (up // 2, down // 2)})
        traffic.publish(NOV_10 + 70_000, {"s1": (up - up // 2, down - down // 2)})
        assert acct.wait_idle(30)
        assert fr.octets_by_user() == {"s1": (up, down)}  # the Interim-Update
    finally:
        acct.close()
        svc.close()
    assert fr.octets_by_user() == {"s1": (up, down)}  # the Stop


def test_secondary_server_takes_over_when_the_primary_is_silent(
    tmp_path: Path, fr: FreeRadius
) -> None:
    svc = loopback_service(tmp_path / "state")
    traffic = Traffic(svc, seed=3)
    silent = RadiusServer("127.0.0.1", free_udp_port(), b"nobody-listens")
    acct = accounting(svc, [silent, server_of(fr)])
    try:
        traffic.random_run(NOV_10, 15)
        assert acct.wait_idle(30)
    finally:
        acct.close()
        svc.close()
    assert fr.octets_by_user() == traffic.by_user()


def test_end_session_stops_it_and_new_traffic_opens_another(tmp_path: Path, fr: FreeRadius) -> None:
    svc = loopback_service(tmp_path / "state")
    traffic = Traffic(svc, seed=4)
    acct = accounting(svc, [server_of(fr)])
    try:
        traffic.publish(NOV_10, {"s1": (100, 200), "s3": (1, 2)})
        acct.end_session("s1", "suspended")
        traffic.publish(NOV_10 + 10_000, {"s1": (1000, 2000)})
        acct.end_session("s3", "removed")
        assert acct.wait_idle(30)
    finally:
        acct.close()
        svc.close()
    rows = fr.query(
        "SELECT username, acctinputoctets, acctoutputoctets, acctterminatecause "
        "FROM radacct ORDER BY radacctid"
    )
    assert rows == [
        ("s1", 100, 200, "Port-Suspended"),
        ("s3", 1, 2, "Admin-Reset"),
        ("s1", 1000, 2000, "Admin-Reboot"),
    ]


def test_the_book_replays_identically(tmp_path: Path) -> None:
    """The same journal gives the same requests (ids, counters): what makes resending safe."""
    svc = loopback_service(tmp_path / "state")
    traffic = Traffic(svc, seed=5)
    try:
        traffic.random_run(DEC_1 - 300_000, 50)
        records = svc.journal.read(1, 1000)
    finally:
        svc.close()

    def run() -> list[tuple[str, dict[str, object]]]:
        acc = Accountant("gw1", SessionBook(), 60, ATTRS.get, "192.0.2.1")
        out = [(r.key, r.attributes) for r in acc.mark(Mark(1, 0, "on", NOV_10))]
        for seq, message in records:
            out += [(r.key, r.attributes) for r in acc.record(seq, decode_usage(message), "e1")]
        out += [(r.key, r.attributes) for r in acc.mark(Mark(2, len(records), "off", DEC_1))]
        return out

    first, second = run(), run()
    assert first == second
    stops = [a for _k, a in first if a["Acct-Status-Type"] == "Stop"]
    up = {}
    for a in stops:
        user = str(a["User-Name"])
        total = (int(a["Acct-Input-Gigawords"]) << 32) + int(a["Acct-Input-Octets"])  # type: ignore[call-overload]
        up[user] = up.get(user, 0) + total
    assert up == {u: v[0] for u, v in traffic.by_user().items()}


def test_the_cursor_knows_its_journal_life(tmp_path: Path) -> None:
    """A cursor saved in another life of the journal: every record of this life is accounted."""
    svc = loopback_service(tmp_path / "state")
    traffic = Traffic(svc, seed=6)
    server = RadiusServer("127.0.0.1", free_udp_port(), b"unanswered-secret")
    try:
        traffic.random_run(NOV_10, 8)
        epoch = svc.epoch
        book = tmp_path / "state" / "radius-accounting.json"
        for saved_epoch, expected in ((epoch, 5), ("another-life", 0)):
            book.write_text(
                json.dumps(SessionBook(cursor=5, epoch=saved_epoch, sessions={}).to_json())
            )
            config = AccountingConfig(servers=(server,), interim_s=60)
            acct = RadiusAccounting("gw1", svc.journal, svc.state_dir, config, ATTRS.get)
            try:
                assert acct.cursor == expected
            finally:
                acct.close()
    finally:
        svc.close()


def test_session_owner_names_the_sessions_radius_was_told_of(
    tmp_path: Path, fr: FreeRadius
) -> None:
    """The CoA server's lookup by Acct-Session-Id runs in another thread than accounting: it
    sees the sessions of the last acknowledged batch, never the book half-way through one."""
    svc = loopback_service(tmp_path / "state")
    traffic = Traffic(svc, seed=7)
    acct = accounting(svc, [server_of(fr)], stop_wait_s=0.5)
    try:
        traffic.publish(NOV_10, {"s1": (100, 200), "s3": (1, 2)})
        assert acct.wait_idle(30)
        ids = dict(fr.query("SELECT username, acctsessionid FROM radacct"))
        assert {acct.session_owner(ids["s1"]), acct.session_owner(ids["s3"])} == {"s1", "s3"}
        assert acct.session_owner("0123456789ABCDEF") is None
        fr.stop()
        acct.end_session("s1", "removed")
        traffic.publish(NOV_10 + 10_000, {"s3": (5, 6)})
        assert not acct.wait_idle(0.5)
        # The Stop is built but unanswered: billing still knows the session, and so do we.
        assert acct.session_owner(ids["s1"]) == "s1"
        fr.start()
        assert acct.wait_idle(60)
        assert acct.session_owner(ids["s1"]) is None
        assert acct.session_owner(ids["s3"]) == "s3"
    finally:
        acct.close()
        svc.close()
