"""ShapingPlan.with_link_rate: the adaptive link rate changes classes in place, never leaves."""

from __future__ import annotations

import pytest

from desanet.errors import ValidationError
from desanet.shaper.plan import Link, SubscriberPlan, build_plan

pytestmark = pytest.mark.unit

MBIT = 1_000_000


def sub(i: int, low: int = 2 * MBIT, high: int = 10 * MBIT) -> SubscriberPlan:
    return SubscriberPlan(f"s{i}", i, low, high, 256_000, 2 * MBIT)


def test_lowered_and_restored_rate() -> None:
    plan = build_plan(Link(20 * MBIT, 5 * MBIT), [sub(1), sub(2), sub(3)], leaf="fq_codel")
    low = plan.with_link_rate("down", 8 * MBIT)
    assert low.root_rate_bps("down") == int(8 * MBIT * 0.95) // 8 * 8
    # Guarantees shrink with the link (40 %): their sum stays under the root.
    guarantees = [
        c.rate_bytes_ps * 8 for cid, c in low.down.classes.items() if cid in low.down.leaves
    ]
    assert sum(guarantees) <= low.root_rate_bps("down")
    assert dict(low.down.leaves.items()) == dict(plan.down.leaves.items())
    assert dict(low.up.classes.items()) == dict(plan.up.classes.items())
    # A subscriber changed while adapted gets the adapted classes too, checked as configured.
    changed = low.with_subscriber(sub(2, 4 * MBIT, 12 * MBIT))
    classid = next(c for c in changed.down.leaves if c & 0xFFFF == 2 + 0xF)
    assert changed.down.classes[classid].rate_bytes_ps * 8 == int(4 * MBIT * 0.4)
    with pytest.raises(ValidationError, match="above the link"):
        low.with_subscriber(sub(2, 4 * MBIT, 30 * MBIT))
    # Back at the configured rate: what a fresh plan holds, class for class.
    back = changed.with_link_rate("down", 20 * MBIT)
    fresh = build_plan(
        Link(20 * MBIT, 5 * MBIT), [sub(1), sub(2, 4 * MBIT, 12 * MBIT), sub(3)], leaf="fq_codel"
    )
    assert back.adapted_bps == {}
    assert dict(back.down.classes.items()) == dict(fresh.down.classes.items())
