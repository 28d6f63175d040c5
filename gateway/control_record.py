"""One subscriber's control record, the rule for what a stored record may hold, and damage.

Shared by the SQLite control state and the reader of the old control journal,
so both refuse the same values and word damage the same way.
"""

from __future__ import annotations

import re
from dataclasses import asdict, dataclass
from pathlib import Path

from desanet.errors import StateError
from desanet.gateway.config import SUSPEND_MODES
from desanet.gateway.registry import RatePlan

_PERIOD = re.compile(r"^([0-9]{4}-[0-9]{2})?$")
MAX_STORED_INT = (1 << 63) - 1  # SQLite integers are signed 64-bit


@dataclass(frozen=True)
class SubscriberControl:
    """Billing's changes to one subscriber, plus where its current quota period began."""

    plan: RatePlan | None = None  # None: the subscribers file's plan
    suspended: str | None = None  # None, or one of SUSPEND_MODES
    quota_overridden: bool = False  # True: `quota_bytes` replaces the file's quota
    quota_bytes: int | None = None  # the override; None = no quota at all
    period: str = ""  # "YYYY-MM" (UTC) of the current quota period
    period_base: int = 0  # up_total + down_total when the period began
    throttled: bool = False


UNTOUCHED = SubscriberControl()


def check_record(sub_id: str, r: SubscriberControl) -> None:
    """Refuse a record that could not be read back (so nothing unreadable is ever stored)."""
    problems = []
    if r.plan is not None and not all(
        isinstance(v, int) and 0 < v <= MAX_STORED_INT for v in asdict(r.plan).values()
    ):
        problems.append("plan rates")
    if r.suspended is not None and r.suspended not in SUSPEND_MODES:
        problems.append("suspended")
    if r.quota_bytes is not None and not (
        isinstance(r.quota_bytes, int) and 0 < r.quota_bytes <= MAX_STORED_INT
    ):
        problems.append("quota_bytes")
    if not _PERIOD.match(r.period):
        problems.append("period")
    if not (isinstance(r.period_base, int) and 0 <= r.period_base <= MAX_STORED_INT):
        problems.append("period_base")
    if problems:
        raise StateError(f"subscriber {sub_id}: control record with invalid {', '.join(problems)}")


def damaged(path: Path, detail: str) -> StateError:
    """The error that stops the service when the control state in `path` is damaged."""
    return StateError(
        f"{path}: the control state is damaged ({detail}); the service stops rather than forget "
        "suspensions and quotas. Restore the file from a backup, or move it aside to start with "
        "no control changes (every subscriber on the subscribers file's plan, not suspended)"
    )
