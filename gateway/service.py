"""`desanet run`: the service loop that sequences datapath, shaper, aggregator, stream and control.

It only sequences steps; every decision lives in a module of its own
(enforcement, quota, control_requests, plans, status) and every kernel or
network part comes in through `desanet.gateway.parts`. Start: check the
configuration, the subscribers file, the keys and the shaping plan before
touching anything; then lock the state directory, bind the endpoints, shape,
attach, provision. Every interval: read the counters, roll up, journal and
publish, check quotas, write the status. SIGHUP or a changed subscribers file:
re-read and apply only the difference. SIGTERM: flush the last usage, close
the journals, leave the datapath and the shaping in place.
"""

from __future__ import annotations

import logging
import signal
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from types import FrameType
from typing import Any

import numpy as np
import numpy.typing as npt

from desanet.cython_ext import load_backend
from desanet.ebpf.datapath import Provision
from desanet.errors import ConfigError, DesanetError, ValidationError
from desanet.gateway import control_requests, status
from desanet.gateway.compose import production_parts
from desanet.gateway.config import Config, load_config, require_lan
from desanet.gateway.control_state import ControlState
from desanet.gateway.enforcement import Enforced, enforce
from desanet.gateway.metrics import GatewayCollector, serve
from desanet.gateway.parts import Parts
from desanet.gateway.pidlock import StateLock
from desanet.gateway.plans import provision_entry, shaping_plan
from desanet.gateway.quota import quota_pass, usage_bytes
from desanet.gateway.registry import RatePlan, SlotTable, Subscriber, diff, load_subscribers
from desanet.gateway.roles import Roles, load_roles
from desanet.meter.delivered import DeliveredReader, split_state
from desanet.meter.poll import Poller
from desanet.meter.wire import UsageEvent
from desanet.shaper.plan import ShapingPlan

log = logging.getLogger(__name__)

SLOTS_FILE = "slots.json"
_MAX_EVENTS = 50
# The loop wakes at least this often to notice signals and a changed subscribers file.
_MAX_WAIT_MS = 200

Compose = Callable[[Config, Roles, Mapping[int, str]], Parts]


class GatewayService:
    """One gateway: checked at construction, `start()` touches the kernel, `run()` loops."""

    # Built by `start()`: the metering pipeline over the datapath's counters.
    aggregator: Any
    delivered: DeliveredReader

    def __init__(self, config_path: str | Path, compose: Compose = production_parts) -> None:
        self.config_path = Path(config_path)
        self.config = cfg = load_config(self.config_path)
        require_lan(cfg)
        self.subscribers = load_subscribers(cfg.subscribers_file, cfg.link, cfg.capacity)
        self.by_id = {s.id: s for s in self.subscribers}
        self.roles = load_roles(cfg)
        self.slots_path = cfg.state_dir / SLOTS_FILE
        self.slots = SlotTable.load(self.slots_path, cfg.capacity).assign(self.by_id).table
        self.control = ControlState(cfg.state_dir)
        try:
            shaping_plan(cfg, self._enforced(self.subscribers, self.slots))
        except ValidationError as err:
            raise ConfigError(f"{cfg.subscribers_file}: {err}") from err
        self._compose = compose
        self._lock = StateLock(cfg.state_dir)
        self._parts: Parts | None = None
        self._poller: Poller | None = None
        # Subscribers whose recorded control change the kernel refused (applied at start).
        self._not_applied: set[str] = set()
        self.collector = GatewayCollector()
        self.events: list[dict[str, Any]] = []
        self._unpublished: list[UsageEvent] = []
        self.leaf_in_use = cfg.shaping.leaf
        self.warnings: list[str] = []
        self.seq = 0
        self.started_ms = 0
        self._status_ms = 0
        self._next_tick_s = 0.0
        self._stop = False
        self._reload = False
        self._file_stamp = self._stamp()

    @property
    def parts(self) -> Parts:
        """The parts driven since `start()`."""
        if self._parts is None:
            raise DesanetError("the gateway service is not started")
        return self._parts

    @property
    def poller(self) -> Poller:
        """The counter poller built by `start()`."""
        if self._poller is None:
            raise DesanetError("the gateway service is not started")
        return self._poller

    def _enforce(self, sub: Subscriber) -> Enforced:
        return enforce(sub, self.control.get(sub.id), self.config.control)

    def _enforced(
        self, subscribers: Iterable[Subscriber], slots: SlotTable
    ) -> list[tuple[Subscriber, int, RatePlan]]:
        return [(s, slots.slots[s.id], self._enforce(s).plan) for s in subscribers]

    def _plan(self) -> ShapingPlan:
        return shaping_plan(self.config, self._enforced(self.subscribers, self.slots))

    def _stamp(self) -> tuple[float, int]:
        try:
            st = self.config.subscribers_file.stat()
        except OSError:
            return (0.0, 0)
        return (st.st_mtime, st.st_size)

    # -- start and stop ----------------------------------------------------------------------

    def start(self) -> None:
        """Lock the state directory, bind the endpoints, shape, attach, provision, serve."""
        cfg = self.config
        cfg.state_dir.mkdir(parents=True, exist_ok=True)
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
        # Removed from the file while the service was down.
        self.control.forget([i for i in self.control.records if i not in self.by_id])
        self._parts = parts = self._compose(cfg, self.roles, self.slots.owners())
        self.started_ms = parts.clock.now_ms()
        parts.shaper.ensure_ifb()
        parts.datapath.attach()
        # Billed bytes are what left each subscriber's class, not what entered the queue.
        self.delivered = DeliveredReader(parts.open_counters(), parts.shaper.class_stats)
        self.aggregator = load_backend().Aggregator(cfg.capacity + 1)
        if parts.meter.restored_state is not None:
            aggregator_state, delivered_state = split_state(parts.meter.restored_state)
            self.aggregator.restore(aggregator_state)
            if delivered_state:
                self.delivered.restore(delivered_state)
        self._poller = Poller(self.delivered, self.aggregator)
        self.seq = parts.meter.last_seq
        # Slots the kernel still steers but no subscriber holds (removed while we were down).
        steered = set(parts.datapath.prefixes()) | set(parts.datapath.macs())
        stale = steered - set(self.slots.slots.values())
        self._shape_and_provision(set(self.by_id), sorted(stale))
        if cfg.metrics_listen is not None:
            serve(self.collector, *cfg.metrics_listen)
        self._next_tick_s = parts.clock.monotonic_s() + cfg.interval_ms / 1000
        log.info(
            "gateway %s running: %d subscribers on %s, usage on %s, control on %s",
            cfg.gateway_id,
            len(self.subscribers),
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
        log.info(
            "gateway %s stopped at seq %d; shaping left in place", self.config.gateway_id, self.seq
        )

    def _close_parts(self) -> None:
        if self._parts is not None:
            self._parts.endpoint.close()
            self._parts.meter.close()
        if self._poller is not None:
            self._poller.reader.close()
            self._poller = None
        self.control.close()

    # -- applying subscribers ------------------------------------------------------------------

    def _shape_and_provision(self, touched: set[str], freed_slots: Iterable[int] = ()) -> None:
        # Order keeps every packet in a class: stop steering removed subscribers, shape
        # (classes exist before anyone is steered to them), then provision.
        parts = self.parts
        for slot in freed_slots:
            parts.datapath.unprovision(slot)
        result = parts.shaper.apply(self._plan())
        self.leaf_in_use = result.leaf_in_use
        self.warnings = list(result.warnings)
        # One call for every touched subscriber: the datapath withdraws the prefixes
        # they lose before it stores the ones they gain, so prefixes may change hands.
        parts.datapath.provision_many(
            [self._provision_entry(self.by_id[s]) for s in sorted(touched)]
        )
        self.slots.save(self.slots_path)
        parts.meter.set_subscribers(self.slots.owners())
        log.info("applied: %d shaper operations, %d provisioned", result.operations, len(touched))

    def _provision_entry(self, sub: Subscriber) -> Provision:
        return provision_entry(sub, self.slots.slots[sub.id], self._enforce(sub).flags)

    def request_reload(self) -> None:
        """Re-read the subscribers file at the next pass of the loop (what SIGHUP does)."""
        self._reload = True

    def reload(self) -> None:
        """Re-read the subscribers file and apply only what changed; a bad file changes nothing."""
        cfg = self.config
        try:
            new = load_subscribers(cfg.subscribers_file, cfg.link, cfg.capacity)
        except DesanetError as err:
            log.error("reload refused, still running the previous subscribers: %s", err)
            return
        change = diff(self.subscribers, new)
        if change.empty:
            log.info("reload: no change")
            return
        # Bill everyone up to now under the old slot map before any slot changes hands.
        self.tick()
        try:
            slots = self.slots.assign(s.id for s in new)
            shaping_plan(cfg, self._enforced(new, slots.table))
        except (ConfigError, ValidationError) as err:
            log.error("reload refused, still running the previous subscribers: %s", err)
            return
        old_high = self.slots.high_water
        self.subscribers, self.by_id, self.slots = new, {s.id: s for s in new}, slots.table
        for slot in slots.added.values():
            if slot <= old_high:
                self.aggregator.reset_slot(slot)
        self.control.forget(change.removed)
        touched = set(change.added) | set(change.readdressed)
        self._shape_and_provision(touched, slots.freed.values())
        log.info(
            "reload: %s (added %s, removed %s)", change.summary(), change.added, change.removed
        )

    def _reenforce(self, sub_id: str) -> None:
        # A new ceiling can replace the subscriber's leaf qdisc, whose counters then start
        # from zero: account what it delivered so far first, so no delivered byte is lost.
        parts = self.parts
        self.poller.poll(parts.clock.now_ms())
        parts.shaper.apply(self._plan())
        parts.datapath.provision_many([self._provision_entry(self.by_id[sub_id])])

    # -- control ---------------------------------------------------------------------------------

    def _total_of(self, sub_id: str) -> int:
        return usage_bytes(self.aggregator.totals(), self.slots.slots[sub_id])

    def _check_plan(self, sub_id: str, plan: RatePlan) -> None:
        # The shaper's validation names the subscriber when the plan does not fit the link.
        trial = [
            (s, slot, plan if s.id == sub_id else p)
            for s, slot, p in self._enforced(self.subscribers, self.slots)
        ]
        shaping_plan(self.config, trial)

    def handle_request(self, request: object) -> dict[str, Any]:
        """Answer one control request, re-enforcing the subscriber it changed.

        The reply tells what happened: refused (`ok` false, nothing changed), or
        recorded (`ok` true) and `applied` when the kernel enforces it now; a
        change recorded but refused by the kernel is enforced at the next start.
        """
        cfg = self.config
        ctx = control_requests.Context(
            self.by_id, cfg.control, cfg.link, self._total_of, self._check_plan
        )
        try:
            reply, changed = control_requests.handle(request, self.control, ctx)
        except Exception as err:
            # Nothing is recorded unless `handle` returns (storing is its last step).
            log.error("control request refused by an error: %s: %s", type(err).__name__, err)
            reply, changed = {"ok": False, "error": f"nothing changed: {err}"}, None
        self.collector.count_request(bool(reply.get("ok")))
        if not reply.get("ok"):
            return reply
        if changed is not None:
            try:
                self._reenforce(changed)
            except Exception as err:
                # Recorded but not in the kernel: say so, and apply it at the next start.
                log.error("subscriber %s: control change recorded, not applied: %s", changed, err)
                self._not_applied.add(changed)
                return {**reply, "applied": False, "error": f"recorded, not applied: {err}"}
            self._not_applied.discard(changed)
            op = request.get("op") if isinstance(request, dict) else "control"
            t_ms = self.parts.clock.now_ms()
            self._event(UsageEvent(t_ms, changed, str(op), f"now {reply['state']}"))
        return {**reply, "applied": reply["sub"] not in self._not_applied}

    def _event(self, event: UsageEvent) -> None:
        log.info("subscriber %s: %s %s", event.sub, event.kind, event.detail)
        self.events = [*self.events[-_MAX_EVENTS + 1 :], event._asdict()]
        # Billing hears of it in the next usage message (key `ev`), journaled like the usage.
        self._unpublished.append(event)

    # -- the loop --------------------------------------------------------------------------------

    def tick(self) -> None:
        """One interval: read counters, publish the usage, check quotas, write the status."""
        parts = self.parts
        t = parts.clock.now_ms()
        self.poller.poll(t)
        interval = self.aggregator.rollup(t)
        totals = self.aggregator.totals()
        per_sub = {sub_id: usage_bytes(totals, slot) for sub_id, slot in self.slots.slots.items()}
        changed, events = quota_pass(
            self.by_id, self.control.records, per_sub, t, self.config.control
        )
        self.control.update(changed)
        for event in events:
            self._event(event)
            self._reenforce(event.sub)
        drops = parts.datapath.read_drops()
        if len(interval) or self._unpublished:
            state = {**self.aggregator.state(), **self.delivered.state()}
            self.seq = parts.meter.publish(interval, state, self._unpublished, drops)
            self._unpublished = []
        # The snapshot costs about 10 us per subscriber: a large village refreshes it less
        # often than every interval, so the status never eats the poll budget.
        status_period_ms = max(self.config.interval_ms, len(self.subscribers) // 2)
        if t - self._status_ms >= status_period_ms:
            self._status_ms = t
            self._write_status(t, totals, drops)

    def _write_status(
        self, t: int, totals: npt.NDArray[np.uint64], drops: Mapping[str, tuple[int, int]]
    ) -> None:
        entries = [
            (sub, self.slots.slots[sub.id], self._enforce(sub), self.control.get(sub.id))
            for sub in self.subscribers
        ]
        snapshot = status.StatusSnapshot(
            gateway=self.config.gateway_id,
            t_ms=t,
            started_ms=self.started_ms,
            link_down_bps=self.config.link.down_bps,
            link_up_bps=self.config.link.up_bps,
            leaf_wanted=self.config.shaping.leaf,
            leaf_in_use=self.leaf_in_use,
            seq=self.seq,
            subscribers=status.rows(entries, totals, self.aggregator.rates_bps()),
            warnings=self.warnings,
            events=self.events,
            unprovisioned=status.unprovisioned(totals, drops),
        )
        status.write_snapshot(self.config.state_dir, snapshot)
        self.collector.update(snapshot)

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
        """One pass of the loop: wait for requests until the next tick, reload if due, tick."""
        parts = self.parts
        clock = parts.clock
        wait_ms = max(0, int((self._next_tick_s - clock.monotonic_s()) * 1000))
        if parts.endpoint.wait(min(wait_ms, _MAX_WAIT_MS)):
            parts.endpoint.serve_pending(self.handle_request)
        stamp = self._stamp()
        if self._reload or stamp != self._file_stamp:
            self._reload, self._file_stamp = False, stamp
            self.reload()
        if clock.monotonic_s() >= self._next_tick_s:
            self.tick()
            # A slow tick skips the missed ones instead of bursting to catch up.
            interval_s = self.config.interval_ms / 1000
            self._next_tick_s = max(self._next_tick_s + interval_s, clock.monotonic_s())
