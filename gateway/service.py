"""`desanet run`: the service loop that composes datapath, shaper, aggregator, stream and control.

It only sequences steps. Start: check the configuration, the subscribers file,
the keys and the shaping plan before touching the kernel; then shaper, datapath,
stream, control endpoint. Every interval: read the counters, roll up, journal
and publish, check quotas, write the status. SIGHUP or a changed subscribers
file: re-read and apply only the difference. SIGTERM: flush the last usage,
close the journals, leave the datapath and the shaping in place.
"""

from __future__ import annotations

import logging
import os
import signal
import time
from collections.abc import Iterable, Sequence
from pathlib import Path
from types import FrameType
from typing import Any, cast

from desanet.clock import now_ms
from desanet.cython_ext import load_backend
from desanet.ebpf.datapath import Datapath, Provision
from desanet.errors import ConfigError, DesanetError, ValidationError
from desanet.gateway import control_requests, status
from desanet.gateway.config import Config, load_config, require_lan
from desanet.gateway.control import ControlEndpoint
from desanet.gateway.control_state import ControlState
from desanet.gateway.enforcement import Enforced, enforce, quota_in_force
from desanet.gateway.metrics import GatewayCollector, serve
from desanet.gateway.quota import quota_pass, usage_bytes, used_in_period
from desanet.gateway.registry import Plan, SlotTable, Subscriber, diff, load_subscribers
from desanet.meter.delivered import DeliveredReader, split_state
from desanet.meter.keys import ServerSecurity, load_allowed_keys, load_keypair
from desanet.meter.poll import CounterReader, Poller
from desanet.meter.service import MeterService, StreamConfig
from desanet.meter.wire import UsageEvent
from desanet.shaper.apply import Shaper, upload_ifb_name
from desanet.shaper.plan import Link, SubscriberPlan, build_plan, classids_for_slot

log = logging.getLogger(__name__)

PID_FILE = "desanet.pid"
_MAX_EVENTS = 50


def running_pid(state_dir: Path) -> int | None:
    """The pid of the service running on `state_dir`, if one is alive."""
    try:
        pid = int((state_dir / PID_FILE).read_text())
        # A stale file after a crash may name a pid reused by an unrelated process.
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
    except (OSError, ValueError):
        return None
    return pid if b"desanet" in cmdline or b"desanet.gateway.cli" in cmdline else None


def server_security(config: Config) -> ServerSecurity:
    """The CURVE keys of the usage, replay and control endpoints (or plaintext on loopback)."""
    pub = config.publish
    if pub.plaintext:
        return ServerSecurity(plaintext=True)
    if pub.secret_key is None or pub.allowed_keys is None:
        raise ConfigError(f"{config.path}: [publish] needs secret_key and allowed_keys")
    return ServerSecurity(
        server=load_keypair(pub.secret_key), allowed_clients=load_allowed_keys(pub.allowed_keys)
    )


def shaping_plan(config: Config, subs: Sequence[tuple[Subscriber, int, Plan]]) -> Any:
    """The HTB plan for (subscriber, slot, enforced plan) triples; raises ShaperError if invalid."""
    link = Link(
        down_bps=config.link.down_bps, up_bps=config.link.up_bps, headroom=config.shaping.headroom
    )
    plans = [
        SubscriberPlan(
            sub.id, slot, plan.down_min_bps, plan.down_max_bps, plan.up_min_bps, plan.up_max_bps
        )
        for sub, slot, plan in subs
    ]
    return build_plan(link, plans, config.shaping.leaf, config.shaping.rtt_ms)


class Gateway:
    """One gateway: checked at construction, `start()` touches the kernel, `run()` loops."""

    def __init__(self, config_path: str | Path) -> None:
        self.config_path = Path(config_path)
        self.config = load_config(self.config_path)
        cfg = self.config
        require_lan(cfg)
        self.subscribers = load_subscribers(cfg.subscribers_file, cfg.link, cfg.capacity)
        self.security = server_security(cfg)
        self.slots = SlotTable(cfg.state_dir / "slots.json", cfg.capacity)
        self.control = ControlState(cfg.state_dir)
        self.by_id = {s.id: s for s in self.subscribers}
        self.slots.assign(self.by_id)
        try:
            shaping_plan(cfg, self._enforced())
        except ValidationError as err:
            raise ConfigError(f"{cfg.subscribers_file}: {err}") from err
        self.collector = GatewayCollector()
        self.events: list[dict[str, Any]] = []
        self._unpublished: list[UsageEvent] = []
        self.leaf_in_use = cfg.shaping.leaf
        self.warnings: list[str] = []
        self.seq = 0
        self.started_ms = now_ms()
        self._status_ms = 0
        self._stop = False
        self._reload = False
        self._file_stamp = self._stamp()

    def _enforced(self) -> list[tuple[Subscriber, int, Plan]]:
        return [(s, self.slots.slots[s.id], self._enforce(s).plan) for s in self.subscribers]

    def _stamp(self) -> tuple[float, int]:
        try:
            st = self.config.subscribers_file.stat()
        except OSError:
            return (0.0, 0)
        return (st.st_mtime, st.st_size)

    # -- start and stop ----------------------------------------------------------------------

    def start(self) -> None:
        """Shape, attach, provision, then open the stream, the control endpoint and metrics."""
        cfg = self.config
        cfg.state_dir.mkdir(parents=True, exist_ok=True)
        other = running_pid(cfg.state_dir)
        if other is not None:
            raise DesanetError(
                f"another `desanet run` (pid {other}) uses {cfg.state_dir}; stop it first"
            )
        (cfg.state_dir / PID_FILE).write_text(f"{os.getpid()}\n")
        self.control.open()
        # Removed from the file while the service was down.
        self.control.forget([i for i in self.control.records if i not in self.by_id])
        # Endpoints first: a port already taken is refused before the kernel is touched.
        self.meter = MeterService(
            cfg.gateway_id,
            cfg.state_dir,
            StreamConfig(cfg.publish.usage, cfg.publish.replay, self.security),
            self._slot_ids(),
        )
        self.endpoint = ControlEndpoint(cfg.control.endpoint, self.security)
        ifb = upload_ifb_name(cfg.lan)
        self.shaper = Shaper(cfg.lan, ifb)
        self.shaper.ensure_ifb()
        self.datapath = Datapath(cfg.lan, cfg.gateway_id, capacity=cfg.capacity, upload_ifb=ifb)
        self.datapath.attach()
        self.aggregator = load_backend().Aggregator(cfg.capacity + 1)
        # Billed bytes are what left each subscriber's class, not what entered the queue.
        # cast: ClassStats is frozen, the SentStats protocol declares plain attributes.
        self.delivered = DeliveredReader(
            CounterReader.for_datapath(cfg.gateway_id, cfg.lan), cast(Any, self.shaper.class_stats)
        )
        if self.meter.restored_state is not None:
            aggregator_state, delivered_state = split_state(self.meter.restored_state)
            self.aggregator.restore(aggregator_state)
            if delivered_state:
                self.delivered.restore(delivered_state)
        # cast: Poller is annotated with CounterReader; DeliveredReader has the same interface.
        self.poller = Poller(self.delivered, self.aggregator)
        self.seq = self.meter.last_seq
        # Slots the kernel still steers but no subscriber holds (removed while we were down).
        stale = set(self.datapath.prefixes()) - set(self.slots.slots.values())
        self._shape_and_provision(set(self.by_id), sorted(stale))
        if cfg.metrics_listen is not None:
            serve(self.collector, *cfg.metrics_listen)
        log.info(
            "gateway %s running: %d subscribers on %s, usage on %s, control on %s",
            cfg.gateway_id,
            len(self.subscribers),
            cfg.lan,
            self.meter.usage_endpoint,
            self.endpoint.endpoint,
        )

    def close(self) -> None:
        """Flush the last usage and close everything; the kernel state stays as it is."""
        self._status_ms = 0  # the last status is always written
        self.tick()
        self.endpoint.close()
        self.meter.close()
        self.poller.reader.close()
        self.control.close()
        (self.config.state_dir / PID_FILE).unlink(missing_ok=True)
        log.info(
            "gateway %s stopped at seq %d; shaping left in place", self.config.gateway_id, self.seq
        )

    def _slot_ids(self) -> dict[int, str]:
        return {slot: sub_id for sub_id, slot in self.slots.slots.items()}

    # -- applying subscribers ------------------------------------------------------------------

    def _shape_and_provision(self, touched: set[str], freed_slots: Iterable[int] = ()) -> None:
        # Order keeps every packet in a class: stop steering removed subscribers, shape
        # (classes exist before anyone is steered to them), then provision.
        for slot in freed_slots:
            self.datapath.unprovision(slot)
        result = self.shaper.apply(shaping_plan(self.config, self._enforced()))
        self.leaf_in_use = result.leaf_in_use
        self.warnings = list(result.warnings)
        # One call for every touched subscriber: the datapath withdraws the prefixes
        # they lose before it stores the ones they gain, so prefixes may change hands.
        self.datapath.provision_many(
            [self._provision_entry(self.by_id[s]) for s in sorted(touched)]
        )
        self.slots.save()
        self.meter.set_subscribers(self._slot_ids())
        log.info("applied: %d shaper operations, %d provisioned", result.operations, len(touched))

    def _provision_entry(self, sub: Subscriber) -> Provision:
        slot = self.slots.slots[sub.id]
        down_classid, up_classid = classids_for_slot(slot)
        flags = self._enforce(sub).flags
        return Provision(slot, tuple(sub.prefixes), down_classid, up_classid, flags)

    def _provision(self, sub: Subscriber) -> None:
        self.datapath.provision_many([self._provision_entry(sub)])

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
        old_slots = dict(self.slots.slots)
        old_high = self.slots.high_water
        added, freed = self.slots.assign(s.id for s in new)
        old_subscribers, old_by_id = self.subscribers, self.by_id
        self.subscribers, self.by_id = new, {s.id: s for s in new}
        try:
            shaping_plan(cfg, self._enforced())
        except ValidationError as err:
            log.error("reload refused, still running the previous subscribers: %s", err)
            self.subscribers, self.by_id = old_subscribers, old_by_id
            self.slots.slots, self.slots.high_water = old_slots, old_high
            return
        for slot in added.values():
            if slot <= old_high:
                self.aggregator.reset_slot(slot)
        self.control.forget(change.removed)
        touched = set(change.added) | set(change.readdressed)
        self._shape_and_provision(touched, freed.values())
        log.info(
            "reload: %s (added %s, removed %s)", change.summary(), change.added, change.removed
        )

    def _reenforce(self, sub_id: str) -> None:
        # A new ceiling can replace the subscriber's leaf qdisc, whose counters then start
        # from zero: account what it delivered so far first, so no delivered byte is lost.
        self.poller.poll(now_ms())
        self.shaper.apply(shaping_plan(self.config, self._enforced()))
        self._provision(self.by_id[sub_id])

    # -- control ---------------------------------------------------------------------------------

    def _enforce(self, sub: Subscriber) -> Enforced:
        return enforce(sub, self.control.get(sub.id), self.config.control)

    def _total_of(self, sub_id: str) -> int:
        return usage_bytes(self.aggregator.totals(), self.slots.slots[sub_id])

    def _check_plan(self, sub_id: str, plan: Plan) -> None:
        # The shaper's validation names the subscriber when the plan does not fit the link.
        trial = [(s, slot, plan if s.id == sub_id else p) for s, slot, p in self._enforced()]
        shaping_plan(self.config, trial)

    def handle_request(self, request: object) -> dict[str, Any]:
        """Answer one control request, re-enforcing the subscriber it changed."""
        ctx = control_requests.Context(
            self.by_id, self.config.control, self.config.link, self._total_of, self._check_plan
        )
        reply, changed = control_requests.handle(request, self.control, ctx)
        self.collector.count_request(bool(reply.get("ok")))
        if changed is not None:
            try:
                self._reenforce(changed)
            except DesanetError as err:
                # Journaled but not in the kernel: the next start applies it.
                log.error("subscriber %s: control change recorded, not applied: %s", changed, err)
                return {
                    "ok": False,
                    "error": f"recorded, not applied ({err}); applied at the next start",
                }
            op = request.get("op") if isinstance(request, dict) else "control"
            self._event(UsageEvent(now_ms(), changed, str(op), f"now {reply['state']}"))
        return reply

    def _event(self, event: UsageEvent) -> None:
        log.info("subscriber %s: %s %s", event.sub, event.kind, event.detail)
        self.events = [*self.events[-_MAX_EVENTS + 1 :], event._asdict()]
        # Billing hears of it in the next usage message (key `ev`), journaled like the usage.
        self._unpublished.append(event)

    # -- the loop --------------------------------------------------------------------------------

    def tick(self) -> None:
        """One interval: read counters, publish the usage, check quotas, write the status."""
        t = now_ms()
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
        if len(interval) or self._unpublished:
            state = {**self.aggregator.state(), **self.delivered.state()}
            self.seq = self.meter.publish(interval, state, self._unpublished)
            self._unpublished = []
        # The snapshot costs about 10 us per subscriber: a large village refreshes it less
        # often than every interval, so the status never eats the poll budget.
        status_period_ms = max(self.config.interval_ms, len(self.subscribers) // 2)
        if t - self._status_ms >= status_period_ms:
            self._status_ms = t
            self._write_status(t, totals)

    def _write_status(self, t: int, totals: Any) -> None:
        rates = self.aggregator.rates_bps()
        rows = []
        packets = {}
        for sub in self.subscribers:
            slot = self.slots.slots[sub.id]
            record = self.control.get(sub.id)
            enforced = enforce(sub, record, self.config.control)
            rows.append(
                status.SubscriberStatus(
                    id=sub.id,
                    name=sub.name,
                    slot=slot,
                    state=enforced.state,
                    down_max_bps=enforced.plan.down_max_bps,
                    up_max_bps=enforced.plan.up_max_bps,
                    down_bps=float(rates[slot][1]),
                    up_bps=float(rates[slot][0]),
                    down_total=int(totals[slot][2]),
                    up_total=int(totals[slot][0]),
                    period_bytes=used_in_period(usage_bytes(totals, slot), record),
                    quota_bytes=quota_in_force(sub, record),
                )
            )
            packets[sub.id] = (int(totals[slot][1]), int(totals[slot][3]))
        snapshot = status.Snapshot(
            gateway=self.config.gateway_id,
            t_ms=t,
            started_ms=self.started_ms,
            link_down_bps=self.config.link.down_bps,
            link_up_bps=self.config.link.up_bps,
            leaf_wanted=self.config.shaping.leaf,
            leaf_in_use=self.leaf_in_use,
            seq=self.seq,
            subscribers=rows,
            warnings=self.warnings,
            events=self.events,
        )
        status.write_snapshot(self.config.state_dir, snapshot)
        self.collector.update(snapshot, packets)

    def _signal(self, signum: int, frame: FrameType | None) -> None:
        if signum == signal.SIGHUP:
            self._reload = True
        else:
            self._stop = True

    def run(self) -> None:
        """Loop until SIGTERM or SIGINT: serve control requests between ticks."""
        for signum in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
            signal.signal(signum, self._signal)
        interval_s = self.config.interval_ms / 1000
        next_tick = time.monotonic() + interval_s
        while not self._stop:
            wait_ms = max(0, int((next_tick - time.monotonic()) * 1000))
            if self.endpoint.sock.poll(min(wait_ms, 200)):
                self.endpoint.serve_pending(self.handle_request)
            stamp = self._stamp()
            if self._reload or stamp != self._file_stamp:
                self._reload, self._file_stamp = False, stamp
                self.reload()
            if time.monotonic() >= next_tick:
                self.tick()
                # A slow tick skips the missed ones instead of bursting to catch up.
                next_tick = max(next_tick + interval_s, time.monotonic())
