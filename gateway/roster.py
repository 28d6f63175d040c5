"""The subscribers the service runs: the file's entries, their slots, their control records.

A roster answers, for any subscriber, what the gateway enforces on it now
(plan and datapath flags, from `enforcement`), as the shaper and the
datapath take it (`plans`). A reload builds the next roster beside the
running one and the service adopts it only once everything checked out.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence

from desanet.ebpf.datapath import Provision
from desanet.errors import ConfigError, ValidationError
from desanet.gateway.config import Config
from desanet.gateway.control_record import SubscriberControl
from desanet.gateway.control_state import ControlState
from desanet.gateway.enforcement import Enforced, enforce
from desanet.gateway.plans import provision_entry, shaping_plan, subscriber_plan
from desanet.gateway.registry import RatePlan, SlotTable, Subscriber
from desanet.shaper.plan import ShapingPlan, SubscriberPlan


class Roster:
    """Subscribers in file order, by id, their slot table, and the control state they share."""

    def __init__(
        self,
        config: Config,
        subscribers: Sequence[Subscriber],
        slots: SlotTable,
        control: ControlState,
    ) -> None:
        self.config = config
        self.subscribers = list(subscribers)
        self.by_id = {s.id: s for s in self.subscribers}
        self.slots = slots
        self.control = control

    def enforce(self, sub_id: str, record: SubscriberControl | None = None) -> Enforced:
        """What `sub_id` gets now, or with `record` in place of its stored control record."""
        stored = self.control.get(sub_id) if record is None else record
        return enforce(self.by_id[sub_id], stored, self.config.control)

    def plan_of(self, sub_id: str, record: SubscriberControl | None = None) -> SubscriberPlan:
        """The shaper's view of `sub_id` (with `record`, as in `enforce`)."""
        return subscriber_plan(sub_id, self.slots.slots[sub_id], self.enforce(sub_id, record).plan)

    def fitted(self, sub_id: str, plan: RatePlan) -> SubscriberPlan:
        """The shaper's view of `sub_id` on `plan`, whatever is enforced."""
        return subscriber_plan(sub_id, self.slots.slots[sub_id], plan)

    def entry_of(self, sub_id: str) -> Provision:
        """The datapath entry of `sub_id`: prefixes, classes, flags."""
        flags = self.enforce(sub_id).flags
        return provision_entry(self.by_id[sub_id], self.slots.slots[sub_id], flags)

    def whole_plan(self) -> ShapingPlan:
        """The plan of every subscriber, built from nothing; ConfigError when it does not fit."""
        entries = [(s, self.slots.slots[s.id], self.enforce(s.id).plan) for s in self.subscribers]
        try:
            return shaping_plan(self.config, entries)
        except ValidationError as err:
            raise ConfigError(f"{self.config.subscribers_file}: {err}") from err

    def flags(self, sub_ids: Iterable[str]) -> dict[str, int]:
        """The datapath flags enforced on each of `sub_ids` now."""
        return {s: self.enforce(s).flags for s in sub_ids}

    def steered(self, sub_ids: Iterable[str], flags_before: Mapping[str, int]) -> set[str]:
        """Those of `sub_ids` whose datapath flags changed since `flags_before`.

        Only the flags (block) depend on control; prefixes and classes do not,
        so most control changes need no datapath request at all.
        """
        return {s for s in sub_ids if self.enforce(s).flags != flags_before[s]}
