"""Keeping the kernel equal to what the gateway enforces, one batch of changes at a time.

The applier holds the running shaping plan (the one the shaper applied last)
and derives every change from it: the subscribers a batch changed are staged
into one derived plan (`put` each), the shaper applies it with one call that
sends requests for their classes only, then their datapath entries are stored
with one call. Only the start builds and applies a whole plan. A batch the
kernel refuses leaves the previous trees in place (the shaper rolls back); its
subscribers are remembered in `not_applied` and staged again with the next
batch, or by the service at its next tick.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable, Sequence

from desanet.ebpf.datapath import Provision
from desanet.errors import DesanetError, ValidationError
from desanet.gateway.parts import DatapathPort, ShaperPort
from desanet.shaper.plan import ShapingPlan, SubscriberPlan

log = logging.getLogger("desanet.gateway.service")


class Applier:
    """The running plan, and the subscribers whose enforcement the kernel does not hold yet."""

    def __init__(
        self,
        shaper: ShaperPort,
        datapath: DatapathPort,
        before_removing: Callable[[], None],
        plan_of: Callable[[str], SubscriberPlan | None],
        entry_of: Callable[[str], Provision],
    ) -> None:
        self.shaper = shaper
        self.datapath = datapath
        # Reads the counters before the shaper deletes a class or a leaf that counted.
        self.before_removing = before_removing
        # A subscriber's enforced plan now (None once it left), and its datapath entry.
        self.plan_of = plan_of
        self.entry_of = entry_of
        self._running: ShapingPlan | None = None
        self.not_applied: set[str] = set()
        self.leaf_in_use = ""
        self.warnings: list[str] = []

    @property
    def running(self) -> ShapingPlan:
        """The plan the kernel holds."""
        if self._running is None:
            raise DesanetError("no shaping plan applied yet")
        return self._running

    def derive(self) -> ShapingPlan:
        """A plan to stage a batch of changes into (`stage`), then `apply`."""
        return self.running.derive()

    @staticmethod
    def stage(working: ShapingPlan, sub: SubscriberPlan) -> None:
        """Put `sub` into the working plan unless it holds it already; raises ValidationError."""
        if working.subscribers.get(sub.id) != sub:
            working.put(sub)

    def enforce_subscribers(self, sub_ids: Iterable[str], steer: set[str]) -> str | None:
        """Stage and apply the enforcement of `sub_ids` now (and retry earlier refusals)."""
        working = self.derive()
        changed = set(sub_ids)
        for sub_id in changed:
            plan = self.plan_of(sub_id)
            if plan is not None:
                self.stage(working, plan)
        return self.enforce(working, changed, steer)

    def enforce(self, working: ShapingPlan, changed: set[str], steer: set[str]) -> str | None:
        """Apply a staged batch, retrying the subscribers refused before; the refusal or None.

        `changed`: the subscribers the batch staged; `steer`: those whose datapath
        entry changed too. A refusal is logged; its subscribers wait in `not_applied`.
        """
        retried = set()
        for sub_id in self.not_applied - changed:
            plan = self.plan_of(sub_id)
            if plan is None:
                self.not_applied.discard(sub_id)  # it left the file: nothing to enforce
                continue
            try:
                self.stage(working, plan)
            except ValidationError:
                continue
            retried.add(sub_id)
        try:
            entries = [self.entry_of(s) for s in sorted(steer | retried)]
            if not working.touched and not entries:
                self.not_applied -= changed  # the kernel holds this already
                return None
            self.apply(working, entries, changed | retried)
        except Exception as err:
            log.error("control change recorded, not applied (retried every interval): %s", err)
            return str(err)
        return None

    def for_reload(
        self,
        removed: Iterable[str],
        planned: Iterable[SubscriberPlan],
        whole: Callable[[], ShapingPlan],
    ) -> ShapingPlan:
        """The running plan without `removed` and with `planned`; raises ValidationError.

        Changes in another order may fit where this order does not: then the
        file is judged as a whole (`whole()`), which names the subscriber when
        it really does not fit.
        """
        working = self.derive()
        try:
            for sub_id in removed:
                working.remove(sub_id)
            for sub in planned:
                working.put(sub)
        except ValidationError:
            return whole()
        return working

    def apply(
        self,
        plan: ShapingPlan,
        provisions: Sequence[Provision],
        changed: Iterable[str],
        freed_slots: Iterable[int] = (),
    ) -> int:
        """Unsteer `freed_slots`, shape `plan`, then provision; returns the shaper's requests.

        The order keeps every packet in a class: removed subscribers stop being
        steered before their classes go, and classes exist before anyone is
        steered to them. `changed` are the subscribers this enforces: on any
        failure they join `not_applied` and the error is raised.
        """
        changed = set(changed)
        try:
            for slot in freed_slots:
                self.datapath.unprovision(slot)
            result = self.shaper.apply(plan, before_removing=self.before_removing)
            self._running = result.plan
            self.leaf_in_use = result.leaf_in_use
            self.warnings = list(result.warnings)
            if provisions:
                # One call: the datapath withdraws the prefixes subscribers lose before it
                # stores the ones they gain, so prefixes may change hands.
                self.datapath.provision_many(provisions)
        except Exception:
            self.not_applied |= changed
            raise
        self.not_applied -= changed
        return result.operations
