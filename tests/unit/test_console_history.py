"""The console's usage history follows a real usage stream into days, once per interval."""

from __future__ import annotations

import datetime as dt
import time
from pathlib import Path
from zoneinfo import ZoneInfo

import pytest

from desanet.gateway.console.history import UsageHistory
from desanet.gateway.console.store import Database
from desanet.meter.keys import ClientSecurity
from desanet.meter.service import MeterService
from desanet.meter.wire import UsageEvent
from tests.unit.test_stream import interval, loopback_service

pytestmark = pytest.mark.unit

JAKARTA = ZoneInfo("Asia/Jakarta")
# 23:59:59 and 00:00:01 in Jakarta (UTC+7): the two intervals fall on two local days.
LATE = int(dt.datetime(2026, 11, 30, 16, 59, 59, tzinfo=dt.UTC).timestamp() * 1000)
EARLY = LATE + 2000


def follow(db: Database, svc: MeterService, seq: int) -> UsageHistory:
    history = UsageHistory(db, svc.usage_endpoint, svc.replay_endpoint, ClientSecurity(), JAKARTA)
    history.start()
    deadline = time.monotonic() + 10
    while history.state.seq < seq:
        assert time.monotonic() < deadline, history.state
        time.sleep(0.05)
    return history


def test_intervals_land_on_local_days_once_across_restarts(tmp_path: Path) -> None:
    svc = loopback_service(tmp_path / "gw")
    db = Database(tmp_path / "console")
    try:
        svc.publish(interval(LATE, [1, 2], [100, 7], [100, 7]), {})
        event = UsageEvent(EARLY, "s1", "suspend", "now suspended (wall)")
        seq = svc.publish(interval(EARLY, [1], [50], [150]), {}, [event])
        history = follow(db, svc, seq)
        history.stop()
        days = history.days("s1", dt.date(2026, 12, 1), count=2)
        assert [(d.day.isoformat(), d.up, d.down) for d in days] == [
            ("2026-11-30", 100, 200),
            ("2026-12-01", 50, 100),
        ]
        assert [(e.sub, e.kind, e.t_ms) for e in history.events("s1")] == [("s1", "suspend", EARLY)]
        # Restarted, the follower resumes after the last interval it stored.
        seq = svc.publish(interval(EARLY + 1000, [1], [5], [155]), {})
        again = follow(db, svc, seq)
        again.stop()
        days = again.days("s1", dt.date(2026, 12, 1), count=1)
        assert (days[0].up, days[0].down) == (55, 110)
        assert len(again.events()) == 1
    finally:
        svc.close()
