"""A tick's quota pass looks only at subscribers whose usage or control record changed."""

from __future__ import annotations

import numpy as np
import pytest

from desanet.gateway.quota import QuotaDue
from desanet.gateway.service import GatewayService
from tests.unit.service_lab import JUNE_2026, MAY_2026, Lab, control

pytestmark = pytest.mark.unit


def test_due_are_the_movers_the_replaced_records_and_everyone_in_a_new_month(
    lab: Lab, running: GatewayService
) -> None:
    totals = np.zeros((running.config.capacity + 1, 4), dtype=np.uint64)
    due = QuotaDue()
    assert due.usage(running.roster, totals, MAY_2026) == {"s1": 0, "s2": 0, "s3": 0}
    assert due.usage(running.roster, totals, MAY_2026 + 1000) == {}
    totals[lab.datapath.slot_of("10.0.0.2")] = [100, 1, 900, 2]
    assert due.usage(running.roster, totals, MAY_2026 + 2000) == {"s2": 1000}
    control(running, lab, {"op": "suspend", "sub": "s3", "mode": "wall"})
    assert due.usage(running.roster, totals, MAY_2026 + 3000) == {"s3": 0}
    assert due.usage(running.roster, totals, JUNE_2026) == {"s1": 0, "s2": 1000, "s3": 0}
