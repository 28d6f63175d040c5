"""The service loop's lab without root: fakes of the kernel parts, a configuration folder.

Only the kernel parts are fakes (the datapath's steering table and counters,
the shaper's trees, the clock). The usage stream and the control endpoint are
the real ones on loopback, so the tests read what billing would receive.
"""

from __future__ import annotations

import ipaddress
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

from desanet.clock import Clock
from desanet.ebpf.datapath import Provision
from desanet.errors import ControlError, ShaperError
from desanet.gateway.compose import control_port, outbound_parts, radius_part
from desanet.gateway.config import Config
from desanet.gateway.control import ControlEndpoint, request, request_many
from desanet.gateway.parts import Parts
from desanet.gateway.roles import Roles
from desanet.gateway.service import GatewayService
from desanet.meter.client import UsageClient
from desanet.meter.keys import ClientSecurity
from desanet.meter.service import MeterService, StreamConfig
from desanet.meter.wire import UsageMessage
from desanet.shaper.apply import ApplyResult
from desanet.shaper.plan import ShapingPlan, classids_for_slot

MAY_2026 = 1_779_000_000_000  # 2026-05-17, UTC
JUNE_2026 = 1_781_000_000_000  # 2026-06-09
CAPACITY = 16
CONFIG = """\
[gateway]
id = "desa-loop"
lan = "lo"
state_dir = "state"
capacity = 16

[link]
down = "20mbit"
up = "5mbit"

[meter]
interval = "1s"

[publish]
usage = "tcp://127.0.0.1:*"
replay = "tcp://127.0.0.1:*"
plaintext = true

[control]
endpoint = "tcp://127.0.0.1:*"
suspend = "block"

[subscribers]
file = "subscribers.csv"
settle = "1s"
"""
HEADER = "id,name,prefixes,down_min,down_max,up_min,up_max,quota\n"
S1 = "s1,A,10.0.0.1,1mbit,10mbit,256kbit,2mbit,1MB"
S2 = "s2,B,10.0.0.2,1mbit,10mbit,256kbit,2mbit,"
S3 = "s3,C,10.0.0.3 fd00::3,1mbit,8mbit,256kbit,2mbit,"


class FakeClock:
    """Wall and monotonic time that move only when a test says so."""

    def __init__(self, now_ms: int) -> None:
        self.wall_ms = now_ms
        self.mono_s = 1000.0

    def now_ms(self) -> int:
        return self.wall_ms

    def monotonic_s(self) -> float:
        return self.mono_s

    def advance(self, seconds: float) -> None:
        self.wall_ms += int(seconds * 1000)
        self.mono_s += seconds


class FakeDatapath:
    """The datapath's steering table (prefix -> slot), slot settings and counters, in memory.

    `send` counts traffic the way the kernel does: into the slot whose prefix
    holds the address, slot 0 (billed to nobody) when none does.
    """

    def __init__(self, steered: Mapping[int, Sequence[str]] = ()) -> None:
        self.counters = np.zeros((CAPACITY + 1, 4), dtype=np.uint64)
        self.steering: dict[str, int] = {p: s for s, ps in dict(steered).items() for p in ps}
        self.slots: dict[int, Provision] = {}
        self.attached = False
        self.unreadable: str | None = None  # the counters map's read error, when set
        self.drops: dict[str, tuple[int, int]] = {}

    def attach(self) -> None:
        self.attached = True

    def provision_many(self, entries: Sequence[Provision]) -> None:
        mine = {e.slot for e in entries}
        self.steering = {p: s for p, s in self.steering.items() if s not in mine}
        for entry in entries:
            self.slots[entry.slot] = entry
            for prefix in entry.prefixes:
                self.steering[str(ipaddress.ip_network(prefix))] = entry.slot

    def unprovision(self, slot: int) -> None:
        self.steering = {p: s for p, s in self.steering.items() if s != slot}
        self.slots.pop(slot, None)

    def read_drops(self) -> dict[str, tuple[int, int]]:
        return dict(self.drops)

    def macs(self) -> dict[int, list[str]]:
        result: dict[int, list[str]] = {}
        for slot, entry in self.slots.items():
            if entry.macs:
                result[slot] = list(entry.macs)
        return result

    def prefixes(self) -> dict[int, list[str]]:
        result: dict[int, list[str]] = {}
        for prefix, slot in self.steering.items():
            result.setdefault(slot, []).append(prefix)
        return result

    def slot_of(self, address: str) -> int:
        addr = ipaddress.ip_address(address)
        matches = [
            (ipaddress.ip_network(p).prefixlen, s)
            for p, s in self.steering.items()
            if addr in ipaddress.ip_network(p)
        ]
        return max(matches)[1] if matches else 0

    def send(self, address: str, up: int = 0, down: int = 0) -> None:
        slot = self.slot_of(address)
        self.counters[slot] += np.array([up, 1 if up else 0, down, 1 if down else 0], np.uint64)


class FakeCounters:
    """A counter source reading the fake datapath's counters."""

    def __init__(self, datapath: FakeDatapath) -> None:
        self.datapath = datapath
        self.n_slots = CAPACITY + 1
        self.identity = b"boot-1/map-7"

    def read(self) -> npt.NDArray[np.uint64]:
        if self.datapath.unreadable is not None:
            raise OSError(self.datapath.unreadable)
        return self.datapath.counters.copy()

    def repinned(self) -> bool:
        return False

    def reopen(self) -> FakeCounters:
        return self

    def close(self) -> None:
        pass


@dataclass
class FakeShaper:
    """The two HTB trees as the last applied plan."""

    applied: list[ShapingPlan] = field(default_factory=list)
    refuse: str | None = None  # the kernel's answer to the next apply, when set

    def ensure_ifb(self) -> int:
        return 42

    def apply(
        self, plan: ShapingPlan, *, before_removing: Callable[[], None] | None = None
    ) -> ApplyResult:
        if self.refuse is not None:
            raise ShaperError(self.refuse)
        self.applied.append(plan)
        return ApplyResult(operations=1, leaf_in_use=plan.leaf, warnings=[], plan=plan)

    def class_stats(self) -> dict[str, dict[int, Any]]:
        return {}

    def class_stats_of(self, slots: Mapping[str, Sequence[int]]) -> dict[str, dict[int, Any]]:
        return {}

    def ceilings_bps(self, slot: int) -> tuple[int, int]:
        """(down, up) ceiling of the class of `slot` in the last applied plan."""
        down, up = classids_for_slot(slot)
        plan = self.applied[-1]
        return plan.down.classes[down].ceil_bytes_ps * 8, plan.up.classes[up].ceil_bytes_ps * 8


class Lab:
    """A configuration folder, the fakes, and the service built on them."""

    def __init__(self, folder: Path, steered: Mapping[int, Sequence[str]] = ()) -> None:
        self.folder = folder
        (folder / "gateway.toml").write_text(CONFIG)
        self.datapath = FakeDatapath(steered)
        self.shaper = FakeShaper()
        self.clock = FakeClock(MAY_2026)
        self.meter: MeterService | None = None
        # Builds the service's clock from its usage stream (default: the fake clock).
        self.make_clock: Callable[[MeterService], Clock] = lambda meter: self.clock

    def write(self, *rows: str) -> None:
        tmp = self.folder / "subscribers.tmp"
        tmp.write_text(HEADER + "\n".join(rows) + "\n")
        tmp.replace(self.folder / "subscribers.csv")

    def compose(self, config: Config, roles: Roles, slot_owners: Mapping[int, str]) -> Parts:
        self.meter = MeterService(
            config.gateway_id,
            config.state_dir,
            StreamConfig(config.publish.usage, config.publish.replay, roles.read),
            slot_owners,
        )
        outbound = outbound_parts(config, self.meter)
        local = ControlEndpoint(config.control.endpoint, roles.control)
        radius = radius_part(config, self.meter)
        return Parts(
            datapath=self.datapath,
            shaper=self.shaper,
            meter=self.meter,
            endpoint=control_port(local, outbound),
            open_counters=lambda: FakeCounters(self.datapath),
            clock=self.make_clock(self.meter),
            outbound=[*outbound, *([radius] if radius else [])],
            radius=radius,
        )

    def service(self) -> GatewayService:
        return GatewayService(self.folder / "gateway.toml", compose=self.compose)

    def tick(self, service: GatewayService, seconds: float = 1.0) -> None:
        self.clock.advance(seconds)
        service.step()

    def settle(self, service: GatewayService) -> None:
        """Two passes a settle period apart: a changed file is seen, then applied."""
        self.tick(service)
        self.tick(service)

    def received(self) -> list[UsageMessage]:
        """Every usage message billing can fetch, in seq order."""
        assert self.meter is not None
        with UsageClient(self.meter.usage_endpoint, self.meter.replay_endpoint) as client:
            return list(client.messages(1, follow=False))

    def billed(self) -> dict[str, tuple[int, int]]:
        """The latest (up_total, down_total) of each subscriber in the stream."""
        totals: dict[str, tuple[int, int]] = {}
        for msg in self.received():
            for rec in msg.records():
                totals[rec.sub] = (rec.up_total, rec.down_total)
        return totals

    def events(self) -> list[tuple[str, str]]:
        return [(e.sub, e.kind) for m in self.received() for e in m.events]


def control(
    service: GatewayService,
    lab: Lab,
    body: dict[str, Any],
    security: ClientSecurity | None = None,
    timeout_ms: int = 5000,
) -> dict[str, Any]:
    """Send `body` through the real control endpoint while the loop serves it."""
    outcome: list[Any] = []
    endpoint = service.parts.endpoint.endpoint

    def send() -> None:
        try:
            outcome.append(request(endpoint, body, security or ClientSecurity(), timeout_ms))
        except ControlError as err:
            outcome.append(err)

    sender = threading.Thread(target=send)
    sender.start()
    while sender.is_alive():
        service.step()
    sender.join()
    if isinstance(outcome[0], ControlError):
        raise outcome[0]
    return dict(outcome[0])


def control_many(service: GatewayService, bodies: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """Send every body at once (pipelined), let them all arrive, then let the loop serve them."""
    outcome: list[list[dict[str, Any]]] = []
    endpoint = service.parts.endpoint.endpoint
    sender = threading.Thread(
        target=lambda: outcome.append(request_many(endpoint, bodies, ClientSecurity(), 10_000))
    )
    sender.start()
    time.sleep(0.3)  # all of them queued at the endpoint: they arrive together
    while sender.is_alive():
        service.step()
    sender.join()
    return outcome[0]
