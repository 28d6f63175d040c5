# Over 400 lines: every step the service takes is ordered here, and nowhere else.
"""`desanet run`: the service loop that sequences datapath, shaper, aggregator, stream and control.

It only sequences steps; every decision lives in a module of its own
(enforcement, quota, control_batch, applier, reload, plans, status) and every
kernel or network part comes in through `desanet.gateway.parts`. Start: check
the configuration, the subscribers file, the keys and the shaping plan before
touching anything; then lock the state directory, bind the endpoints, shape,
attach, provision. Every interval: read the counters, roll up, journal and
publish, check quotas, write the status; a step that fails is logged, counted
and retried at the next interval (`faults`). Between intervals: control
requests, a batch at a time, each batch one transaction and one incremental
shaper apply. SIGHUP or a changed subscribers file: once the file is complete
and settled, re-read it and apply only the difference. SIGTERM: flush the last
usage, close the journals, leave the datapath and the shaping in place.
"""

from __future__ import annotations

import logging
import signal
from collections.abc import Iterable, Sequence
from pathlib import Path
from types import FrameType
from typing import Any, TypeVar

import numpy as np
import numpy.typing as npt

from desanet.cython_ext import load_backend
from desanet.cython_ext.usage import UsageInterval
from desanet.errors import DesanetError, ShaperError
from desanet.gateway import control_batch, status
from desanet.gateway.applier import Applier
from desanet.gateway.compose import Compose, production_parts
from desanet.gateway.config import load_config, require_lan
from desanet.gateway.control_record import SubscriberControl
from desanet.gateway.control_requests import Context
from desanet.gateway.control_state import ControlState
from desanet.gateway.faults import LoopFaults, Outbox
from desanet.gateway.link_latency import LinkLatency
from desanet.gateway.metrics import GatewayCollector, serve
from desanet.gateway.parts import Parts
from desanet.gateway.pidlock import StateLock
from desanet.gateway.quota import QuotaDue, quota_pass, usage_bytes
from desanet.gateway.registry import SlotTable, Subscriber, diff, parse_subscribers_file
from desanet.gateway.reload import SettledFile
from desanet.gateway.roles import load_roles
from desanet.gateway.roster import Roster
from desanet.meter.delivered import DeliveredReader, split_state
from desanet.meter.poll import Poller
from desanet.meter.wire import UsageEvent
from desanet.shaper.plan import ShapingPlan
from desanet.units import format_rate

log = logging.getLogger(__name__)

T = TypeVar("T")
SLOTS_FILE = "slots.json"
_MAX_EVENTS = 50
# The loop wakes at least this often to notice signals and a changed subscribers file.
_MAX_WAIT_MS = 200


class GatewayService:
    """One gateway: checked at construction, `start()` touches the kernel, `run()` loops."""

    # Built by `start()`: the metering pipeline over the datapath's counters.
    aggregator: Any
    delivered: DeliveredReader

    def __init__(self, config_path: str | Path, compose: Compose = production_parts) -> None:
        self.config_path = Path(config_path)
        self.config = cfg = load_config(self.config_path)
        require_lan(cfg)
        self._file = SettledFile(cfg.subscribers_file, cfg.settle_ms / 1000)
        raw = self._file.read_now()
        subscribers = parse_subscribers_file(raw, cfg.subscribers_file, cfg.link, cfg.capacity)
        self.roles = load_roles(cfg)
        self.slots_path = cfg.state_dir / SLOTS_FILE
        self._saved_slots = SlotTable.load(self.slots_path, cfg.capacity)
        self.control = ControlState(cfg.state_dir)
        # Its slot table is adopted at start, when the clock can stamp who left the file.
        ids = [s.id for s in subscribers]
        slots = self._saved_slots.assign(ids, 0).table
        self.roster = Roster(cfg, subscribers, slots, self.control)
        self._initial_plan: ShapingPlan | None = self.roster.whole_plan()
        self._compose = compose
        self._lock = StateLock(cfg.state_dir)
        self._parts: Parts | None = None
        self._poller: Poller | None = None
        self._applier: Applier | None = None
        self.faults = LoopFaults()
        self.collector = GatewayCollector(self.faults.counts)
        self.events: list[dict[str, Any]] = []
        self.outbox = Outbox()
        self._drops: dict[str, tuple[int, int]] = {}  # the datapath's drops, read each tick
        self.latency: LinkLatency | None = None  # RTT and the adaptive link rate, from start()
        self._owners_of: SlotTable | None = None
        self._owners_map: dict[int, str] = {}
        self._reload_error: str | None = None
        self._resync_due = False
        self.started_ms = 0
        self._status_ms = 0
        self._status_rows = status.StatusRows()
        self._quota_due = QuotaDue()
        self._next_tick_s = 0.0
        self._stop = False

    @property
    def parts(self) -> Parts:
        """The parts driven since `start()`."""
        return _started(self._parts)

    @property
    def subscribers(self) -> list[Subscriber]:
        """The subscribers running now, in file order."""
        return self.roster.subscribers

    @property
    def poller(self) -> Poller:
        """The counter poller built by `start()`."""
        return _started(self._poller)

    @property
    def applier(self) -> Applier:
        """What keeps the kernel equal to the enforcement, built by `start()`."""
        return _started(self._applier)

    # -- start and stop ----------------------------------------------------------------------

    def start(self) -> None:
        """Lock the state directory, bind the endpoints, shape, attach, provision, serve."""
        cfg = self.config
        # The state holds every subscriber's usage: the service's alone, whatever the umask.
        cfg.state_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
        self._lock.acquire()
        try:
            self._start()
        except BaseException:
            self._close_parts()
            self._lock.release()
            raise

    def _start(self) -> None:
        cfg = self.config
        self.control.open()
        self._parts = parts = self._compose(cfg, self.roles, self.roster.slots.owners())
        self.started_ms = now = parts.clock.now_ms()
        roster = self.roster
        change = self._saved_slots.assign(roster.by_id, now)
        roster.slots = slots = change.table.expire(now, cfg.grace_ms).table
        # Kept: present subscribers and those in their grace period (gone while we were down).
        self.control.forget(
            [i for i in self.control.records if i not in roster.by_id and i not in slots.retired]
        )
        self._applier = Applier(
            parts.shaper,
            parts.datapath,
            self._poll_before_removing,
            lambda s: self.roster.plan_of(s) if s in self.roster.by_id else None,
            lambda s: self.roster.entry_of(s),
        )
        parts.shaper.ensure_ifb()
        parts.datapath.attach()
        # Billed bytes are what left each subscriber's class, not what entered the queue.
        # Each tick reads only the leaves whose datapath counters say they can have moved.
        by_handle = parts.shaper.class_stats_of if cfg.delivered_read == "moved" else None
        self.delivered = DeliveredReader(parts.open_counters(), parts.shaper.class_stats, by_handle)
        self.aggregator = load_backend().Aggregator(cfg.capacity + 1)
        if parts.meter.restored_state is not None:
            aggregator_state, delivered_state = split_state(parts.meter.restored_state)
            self.aggregator.restore(aggregator_state)
            if delivered_state:
                self.delivered.restore(delivered_state)
        self._poller = Poller(self.delivered, self.aggregator)
        if parts.open_latency is not None:
            self.latency = LinkLatency.from_config(parts.open_latency(), cfg, now)
        self._resync(self._initial_plan)
        self._initial_plan = None  # the applier holds the running plan from here on
        for consumer in parts.outbound:
            consumer.start()  # it catches up from its own cursor in the journal
        if cfg.metrics_listen is not None:
            serve(self.collector, *cfg.metrics_listen)
        self._next_tick_s = parts.clock.monotonic_s() + cfg.interval_ms / 1000
        log.info(
            "gateway %s running: %d subscribers on %s, usage on %s, control on %s",
            cfg.gateway_id,
            len(roster.subscribers),
            cfg.lan,
            parts.meter.usage_endpoint,
            parts.endpoint.endpoint,
        )

    def close(self) -> None:
        """Flush the last usage and close everything; the kernel state stays as it is."""
        self._status_ms = 0  # the last status is always written
        self.tick()
        self._close_parts()
        self._lock.release()
        seq = self.parts.meter.last_seq
        log.info("gateway %s stopped at seq %d; shaping left in place", self.config.gateway_id, seq)

    def _close_parts(self) -> None:
        if self._parts is not None:
            for consumer in self._parts.outbound:
                try:
                    consumer.stop()  # it goes on from its cursor at the next start
                except DesanetError as err:
                    log.error("%s", err)
            self._parts.endpoint.close()
            self._parts.meter.close()
        if self._poller is not None:
            self._poller.reader.close()
            self._poller = None
        self.control.close()

    # -- applying subscribers ------------------------------------------------------------------

    def _resync(self, plan: ShapingPlan | None = None) -> None:
        # The whole roster into the kernel; slots it still steers but nobody holds (removed
        # while the service was down, or by a reload that failed midway) stop first.
        roster = self.roster
        steered = set(self.parts.datapath.prefixes()) | set(self.parts.datapath.macs())
        stale = steered - set(roster.slots.slots.values())
        whole = plan if plan is not None else roster.whole_plan()
        self._shape_and_provision(whole, set(roster.by_id), sorted(stale))
        self._resync_due = False
        self.faults.recovered("reload")  # what a failed reload left undone is done

    def _shape_and_provision(
        self, plan: ShapingPlan, touched: set[str], freed_slots: Iterable[int] = ()
    ) -> None:
        provisions = [self.roster.entry_of(s) for s in sorted(touched)]
        operations = self.applier.apply(plan, provisions, touched, freed_slots)
        self.roster.slots.save(self.slots_path)
        self.parts.meter.set_subscribers(self.roster.slots.owners())
        if self.parts.radius is not None:
            self.parts.radius.set_subscribers(self.roster.subscribers)
        log.info("applied: %d shaper operations, %d provisioned", operations, len(touched))

    def _poll_before_removing(self) -> None:
        # A class or leaf about to go takes its counters with it: account them first.
        self.faults.guard("counters", lambda: self.poller.poll(self.parts.clock.now_ms()))
        self.delivered.read_all_next()  # their successors count from zero

    def request_reload(self) -> None:
        """Re-read the subscribers file once it has settled (what SIGHUP does)."""
        self._file.force()

    def reload(self, raw: bytes) -> None:
        """Apply a settled subscribers file: only what changed; a bad file changes nothing."""
        cfg, old = self.config, self.roster
        try:
            subscribers = parse_subscribers_file(raw, cfg.subscribers_file, cfg.link, cfg.capacity)
            change = diff(old.subscribers, subscribers)
            if change.empty:
                log.info("reload: no change")
                self._reload_error = None
                return
            # Bill everyone up to now under the old slot map before any slot changes hands.
            self.tick()
            slots = old.slots.assign((s.id for s in subscribers), self.parts.clock.now_ms())
            new = Roster(cfg, subscribers, slots.table, self.control)
            working = self.applier.for_reload(
                change.removed,
                [new.plan_of(s) for s in (*change.added, *change.replanned)],
                new.whole_plan,
            )
        except DesanetError as err:
            self._refuse_reload(err)
            return
        self.roster = new
        for slot in slots.added.values():
            if slot <= old.slots.high_water:
                self.aggregator.reset_slot(slot)
        self.control.forget(slots.expired)
        self._reload_error, self._status_ms = None, 0  # the status shows it at once
        touched = set(change.added) | set(change.readdressed)
        try:
            self._shape_and_provision(working, touched, slots.retired.values())
        except Exception:
            self._resync_due = True  # the next tick makes the kernel hold the whole file
            raise
        log.info(
            "reload: %s (added %s, removed %s)", change.summary(), change.added, change.removed
        )
        if self.parts.radius is not None:
            for sub_id in change.removed:  # their RADIUS sessions end with them
                self.parts.radius.end_session(sub_id, "removed")

    def _refuse_reload(self, err: Exception) -> None:
        log.error("reload refused, still running the previous subscribers: %s", err)
        self._reload_error = f"subscribers file not applied, the previous one runs: {err}"
        self._status_ms = 0  # show it now

    # -- control ---------------------------------------------------------------------------------

    def handle_requests(self, requests: Sequence[object]) -> list[dict[str, Any]]:
        """Answer control requests that arrived together: one transaction, one shaper apply.

        Each reply tells what happened: refused (`ok` false, nothing changed),
        or recorded (`ok` true) and `applied` when the kernel enforces it now;
        a change recorded but refused by the kernel is retried every interval
        and at the next start.
        """
        cfg, roster = self.config, self.roster
        working = self.applier.derive()
        totals = self.aggregator.totals()
        ctx = Context(
            roster.by_id,
            cfg.control,
            cfg.link,
            lambda sub_id: usage_bytes(totals, roster.slots.slots[sub_id]),
            lambda sub_id, plan: working.check(roster.fitted(sub_id, plan)),
        )

        def stage(sub_id: str, record: SubscriberControl) -> None:
            self.applier.stage(working, roster.plan_of(sub_id, record))

        batch = control_batch.decide_batch(requests, self.control.records, ctx, stage)
        refusal = None
        if batch.changes:
            flags_before = roster.flags(batch.changes)
            try:
                self.control.update(batch.changes)
            except Exception as err:
                log.error("control changes not stored, nothing changed: %s", err)
                return self._counted(batch.not_stored(err))
            steer = roster.steered(batch.changes, flags_before)
            refusal = self.applier.enforce(working, set(batch.changes), steer)
            if refusal is None:
                t_ms = self.parts.clock.now_ms()
                for d in batch.decisions:
                    if d.changed:
                        self._event(UsageEvent(t_ms, d.sub_id, d.op, f"now {d.reply['state']}"))
        return self._counted(batch.replies(refusal, self.applier.not_applied))

    def _counted(self, replies: list[dict[str, Any]]) -> list[dict[str, Any]]:
        for reply in replies:
            self.collector.count_request(bool(reply.get("ok")))
        return replies

    def _event(self, event: UsageEvent) -> None:
        who = f"subscriber {event.sub}" if event.sub else "link"  # link events name nobody
        log.info("%s: %s %s", who, event.kind, event.detail)
        self.events = [*self.events[-_MAX_EVENTS + 1 :], event._asdict()]
        # Billing hears of it in the next usage message (key `ev`), journaled like the usage.
        self.outbox.events.append(event)
        radius = self.parts.radius
        if radius is not None and self.control.get(event.sub).suspended == "block":
            radius.end_session(event.sub, "suspended")  # cut off: its RADIUS session ends

    # -- the loop --------------------------------------------------------------------------------

    def tick(self) -> None:
        """One interval: read counters, check quotas, publish, write the status; never raises.

        A failing step (a reader error, the shaper's netlink, the journal, the
        status file) is logged and counted, and tried again next interval.
        """
        t = self.parts.clock.now_ms()
        guard = self.faults.guard
        interval = guard("counters", lambda: self._roll_up(t))
        drops = guard("drops", self.parts.datapath.read_drops)
        if drops is not None:
            self._drops = drops
        shaped: bool | None = False  # whether the quota step tried the kernel (None: failed)
        if interval is not None:
            shaped = guard("quota", lambda: self._quota(t))
            guard(
                "publish",
                lambda: self.outbox.publish(self.parts.meter, interval, self._state, self._drops),
            )
            for consumer in self.parts.outbound:
                consumer.notify()
        if self._resync_due:
            guard("shaper", self._resync)
        elif self.applier.not_applied and shaped is False:
            guard("shaper", self._retry_not_applied)
        if self.roster.slots.retired:
            guard("state", lambda: self._expire_retired(t))
        latency = self.latency
        if latency is not None and interval is not None:
            guard("latency", lambda: self._link_latency(t, latency))
        guard("status", lambda: self._status(t))

    def _roll_up(self, t: int) -> UsageInterval:
        self.poller.poll(t)
        interval: UsageInterval = self.aggregator.rollup(t)
        return interval

    def _quota(self, t: int) -> bool:
        roster = self.roster
        changed, events = quota_pass(
            roster.by_id,
            self.control.records,
            self._quota_due.usage(roster, self.aggregator.totals(), t),
            t,
            self.config.control,
        )
        flags = roster.flags(changed)
        self.control.update(changed)
        for event in events:
            self._event(event)
        if changed:
            refusal = self.applier.enforce_subscribers(changed, roster.steered(changed, flags))
            if refusal is not None:
                raise ShaperError(f"quota changes recorded, not applied: {refusal}")
        return bool(changed)

    def _link_latency(self, t: int, latency: LinkLatency) -> None:
        # The RTT window moves every interval; the adaptive rate, when on, follows it.
        for change in latency.tick(t, self.aggregator.rates_bps()):
            detail = (
                f"{change.direction} {format_rate(change.old_bps)} -> "
                f"{format_rate(change.new_bps)}: {change.reason}"
            )
            self._event(UsageEvent(t, "", "link_rate", detail))
        latency.enforce(self.applier)

    def _retry_not_applied(self) -> None:
        refusal = self.applier.enforce_subscribers((), set())
        if refusal is not None:
            raise ShaperError(refusal)

    def _state(self) -> dict[str, Any]:
        return {**self.aggregator.state(), **self.delivered.state()}

    def _expire_retired(self, t: int) -> None:
        change = self.roster.slots.expire(t, self.config.grace_ms)
        if change.expired:
            change.table.save(self.slots_path)
            self.roster.slots = change.table
            self.control.forget(change.expired)
            log.info("grace period over, forgotten: %s", sorted(change.expired))

    def _status(self, t: int) -> None:
        # Every interval: only the rows of subscribers that changed are built again.
        if t - self._status_ms >= self.config.interval_ms:
            self._write_status(t, self.aggregator.totals())
            self._status_ms = t

    def _write_status(self, t: int, totals: npt.NDArray[np.uint64]) -> None:
        warnings = [*self.applier.warnings, *self.faults.warnings()]
        if self._reload_error is not None:
            warnings.append(self._reload_error)
        snapshot = status.StatusSnapshot(
            gateway=self.config.gateway_id,
            t_ms=t,
            started_ms=self.started_ms,
            link_down_bps=self.config.link.down_bps,
            link_up_bps=self.config.link.up_bps,
            leaf_wanted=self.config.shaping.leaf,
            leaf_in_use=self.applier.leaf_in_use,
            seq=self.parts.meter.last_seq,
            subscribers=[],  # kept as JSON by the status rows, written and scraped from there
            warnings=warnings,
            events=self.events,
            unprovisioned=status.unprovisioned(totals, self._drops),
            failures=dict(self.faults.counts),
            journal=status.journal_use(self.parts.meter.stats()),
            outbound=[consumer.progress() for consumer in self.parts.outbound],
        )
        rows = self._status_rows.update(self.roster, totals, self.aggregator.rates_bps())
        if self.latency is not None:
            owners = self._owners()
            # Only subscribers with traffic can have new RTT samples.
            active = np.flatnonzero(self.aggregator.rates_bps().any(axis=1))
            snapshot.latency = self.latency.status(owners, active)
            self.collector.latency = self.latency.metrics(owners)
        # Metrics first: they still see the snapshot when the status file cannot be written.
        self.collector.update(snapshot, rows)
        status.write_snapshot(self.config.state_dir, snapshot, rows)

    def _owners(self) -> dict[int, str]:
        # Slot -> subscriber of the current (immutable) slot table, built once per table.
        table = self.roster.slots
        if self._owners_of is not table:
            self._owners_of, self._owners_map = table, table.owners()
        return self._owners_map

    def _signal(self, signum: int, frame: FrameType | None) -> None:
        if signum == signal.SIGHUP:
            self.request_reload()
        else:
            self.stop()

    def stop(self) -> None:
        """Leave `run()` after the current pass (what SIGTERM does)."""
        self._stop = True

    def run(self) -> None:
        """Loop until SIGTERM or SIGINT: serve control requests between ticks."""
        for signum in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
            signal.signal(signum, self._signal)
        while not self._stop:
            self.step()

    def step(self) -> None:
        """One pass: wait for requests until the next tick, serve one batch, reload, tick."""
        parts = self.parts
        clock = parts.clock
        wait_ms = max(0, int((self._next_tick_s - clock.monotonic_s()) * 1000))
        if parts.endpoint.wait(min(wait_ms, _MAX_WAIT_MS)):
            # Only what fits before the next tick: a storm of requests never starves the meter.
            before_tick_s = self._next_tick_s - clock.monotonic_s()
            parts.endpoint.serve_pending(self.handle_requests, before_tick_s)
        if parts.radius is not None:
            # Disconnect/CoA from RADIUS: each one a control batch, like the endpoint's.
            parts.radius.serve_pending(lambda body: self.handle_requests([body])[0])
        try:
            raw = self._file.poll(clock.monotonic_s())
        except DesanetError as err:
            self._refuse_reload(err)
            raw = None
        if raw is not None:
            self.faults.guard("reload", lambda: self.reload(raw))
        if clock.monotonic_s() >= self._next_tick_s:
            self.tick()
            # A slow tick skips the missed ones instead of bursting to catch up.
            interval_s = self.config.interval_ms / 1000
            self._next_tick_s = max(self._next_tick_s + interval_s, clock.monotonic_s())


def _started(part: T | None) -> T:
    if part is None:
        raise DesanetError("the gateway service is not started")
    return part
