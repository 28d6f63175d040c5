"""Control requests that arrive together: one transaction, one incremental shaper apply.

Driven through the real control endpoint and the service loop, on the fakes
of tests/unit/service_lab.py.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import pytest

from desanet.errors import StateError
from desanet.gateway.control_record import SubscriberControl
from desanet.gateway.control_state import ControlState
from desanet.gateway.service import GatewayService
from desanet.shaper.plan import classids_for_slot
from tests.unit.service_lab import Lab, control, control_many

pytestmark = pytest.mark.unit

UP = {"up_min": "256kbit", "up_max": "2mbit"}


def plan(sub: str, down_min: str, down_max: str) -> dict[str, Any]:
    return {"op": "plan", "sub": sub, "down_min": down_min, "down_max": down_max, **UP}


@pytest.fixture
def transactions(monkeypatch: pytest.MonkeyPatch) -> list[dict[str, SubscriberControl]]:
    """Every `ControlState.update` (one SQLite transaction each), with what it stored."""
    seen: list[dict[str, SubscriberControl]] = []
    original = ControlState.update

    def update(self: ControlState, changes: Mapping[str, SubscriberControl]) -> None:
        if changes:
            seen.append(dict(changes))
        original(self, changes)

    monkeypatch.setattr(ControlState, "update", update)
    return seen


def test_requests_sent_together_are_one_transaction_and_one_shaper_apply(
    lab: Lab, running: GatewayService, transactions: list[dict[str, SubscriberControl]]
) -> None:
    lab.tick(running)  # opens the quota periods: its own transaction, before the batch
    transactions.clear()
    applied = len(lab.shaper.applied)
    replies = control_many(
        running,
        [
            plan("s1", "1mbit", "3mbit"),
            plan("s2", "1mbit", "4mbit"),
            {"op": "suspend", "sub": "s3", "mode": "wall"},
            plan("s1", "1mbit", "5mbit"),  # composes with the first: the last one holds
            plan("s2", "18mbit", "18mbit"),  # does not fit beside the others: refused alone
            {"op": "show", "sub": "s1"},
        ],
    )
    assert [r["ok"] for r in replies] == [True, True, True, True, False, True]
    assert [r["plan"]["down_max_bps"] for r in replies if r["ok"]] == [
        3_000_000,
        4_000_000,
        64_000,
        5_000_000,
        5_000_000,
    ]
    assert "subscriber s2: its download min 18.0 Mbit/s" in replies[4]["error"]
    assert all(r["applied"] for r in replies if r["ok"])
    assert len(transactions) == 1 and set(transactions[0]) == {"s1", "s2", "s3"}
    assert len(lab.shaper.applied) == applied + 1
    # Derived from the running plan, touching the three subscribers' classes only.
    batch = lab.shaper.applied[-1]
    assert batch.base is lab.shaper.applied[-2]
    assert batch.touched == {c for slot in (1, 2, 3) for c in classids_for_slot(slot)}
    assert [lab.shaper.ceilings_bps(s)[0] for s in (1, 2, 3)] == [5_000_000, 4_000_000, 64_000]
    lab.tick(running)
    assert [e for e in lab.events() if e[1] != "period"] == [
        ("s1", "plan"),
        ("s2", "plan"),
        ("s3", "suspend"),
        ("s1", "plan"),
    ]


def test_a_batch_that_cannot_be_stored_changes_nothing(
    lab: Lab, running: GatewayService, monkeypatch: pytest.MonkeyPatch
) -> None:
    applied = len(lab.shaper.applied)

    def full_disk(self: ControlState, changes: Mapping[str, SubscriberControl]) -> None:
        raise StateError("control.sqlite: cannot write the control state: disk I/O error")

    monkeypatch.setattr(ControlState, "update", full_disk)
    replies = control_many(
        running, [plan("s1", "1mbit", "3mbit"), {"op": "suspend", "sub": "s2"}, {"op": "x"}]
    )
    assert [r["ok"] for r in replies] == [False, False, False]
    assert "nothing changed: control.sqlite: cannot write" in replies[0]["error"]
    assert "unknown op" in replies[2]["error"]
    assert len(lab.shaper.applied) == applied
    monkeypatch.undo()
    reply = control(running, lab, {"op": "show", "sub": "s1"})
    assert reply["plan"]["down_max_bps"] == 10_000_000 and reply["state"] == "active"


def test_a_batch_the_kernel_refuses_is_recorded_and_applied_at_the_next_tick(
    lab: Lab, running: GatewayService
) -> None:
    lab.shaper.refuse = "RTM_NEWTCLASS: No buffer space available"
    replies = control_many(running, [plan("s1", "1mbit", "3mbit"), plan("s2", "1mbit", "4mbit")])
    assert [(r["ok"], r["applied"]) for r in replies] == [(True, False), (True, False)]
    assert all("recorded, not applied: RTM_NEWTCLASS" in r["error"] for r in replies)
    lab.tick(running)  # still refused: retried again next interval
    assert control(running, lab, {"op": "show", "sub": "s2"})["applied"] is False
    lab.shaper.refuse = None
    lab.tick(running)
    assert [lab.shaper.ceilings_bps(s)[0] for s in (1, 2)] == [3_000_000, 4_000_000]
    assert control(running, lab, {"op": "show", "sub": "s2"})["applied"] is True
