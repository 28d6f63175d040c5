"""The parts the service loop drives, as small protocols, so the loop runs on fakes in tests.

Production builds them from the configuration (`desanet.gateway.compose`);
unit tests pass fakes of the kernel parts (datapath, shaper, counters) and
the real usage stream and control endpoint, which need no root.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

from desanet.clock import Clock
from desanet.cython_ext.usage import UsageInterval
from desanet.ebpf.datapath import Provision
from desanet.gateway.registry import Subscriber
from desanet.meter.delivered import LeafStats
from desanet.meter.latency import RttSource
from desanet.meter.poll import CounterSource
from desanet.meter.service import StreamStats
from desanet.meter.state import StateArrays
from desanet.meter.wire import UsageEvent
from desanet.shaper.apply import ApplyResult
from desanet.shaper.plan import ShapingPlan


class DatapathPort(Protocol):
    """The eBPF datapath: steering of prefixes to slots, and the slots' classes and flags."""

    def attach(self) -> None: ...

    def provision_many(self, entries: Sequence[Provision]) -> None: ...

    def unprovision(self, slot: int) -> None: ...

    def prefixes(self) -> dict[int, list[str]]: ...

    def macs(self) -> dict[int, list[str]]: ...

    def read_drops(self) -> dict[str, tuple[int, int]]: ...


class ShaperPort(Protocol):
    """The two HTB trees: kept equal to a plan, and what each class delivered."""

    def ensure_ifb(self) -> int: ...

    def apply(
        self, plan: ShapingPlan, *, before_removing: Callable[[], None] | None = None
    ) -> ApplyResult: ...

    def class_stats(self) -> Mapping[str, Mapping[int, LeafStats]]: ...

    def class_stats_of(
        self, slots: Mapping[str, Sequence[int]]
    ) -> Mapping[str, Mapping[int, LeafStats]]: ...


class UsageStream(Protocol):
    """The usage stream (meter.service.MeterService): journal, publish, replay."""

    usage_endpoint: str
    restored_state: StateArrays | None

    @property
    def last_seq(self) -> int: ...

    def set_subscribers(self, subscribers: Mapping[int, str]) -> None: ...

    def publish(
        self,
        interval: UsageInterval,
        aggregator_state: Mapping[str, Any],
        events: Sequence[UsageEvent] = (),
        drops: Mapping[str, tuple[int, int]] | None = None,
    ) -> int: ...

    def stats(self) -> StreamStats: ...

    def close(self) -> None: ...


class ControlPort(Protocol):
    """Where control requests arrive (gateway.control.ControlEndpoint)."""

    endpoint: str

    def wait(self, timeout_ms: int) -> bool: ...

    def serve_pending(
        self,
        handler: Callable[[Sequence[object]], Sequence[dict[str, Any]]],
        budget_s: float | None = None,
    ) -> int: ...

    def close(self) -> None: ...


class OutboundPort(Protocol):
    """A consumer of the journal in its own thread (the fleet forwarder): the journal is its
    outbox, so the service only starts it, wakes it after each journaled message, stops it."""

    def start(self) -> None: ...

    def notify(self) -> None: ...

    def stop(self) -> None: ...

    def progress(self) -> dict[str, Any]:
        """`name`, `acked_seq` (every message up to it delivered), `connected`, `error`."""
        ...


class RadiusPort(Protocol):
    """RADIUS (gateway.radius_part.RadiusPart, with `[radius]`): besides being an OutboundPort,
    it learns the subscribers, ends sessions, and has Disconnect/CoA requests answered."""

    def set_subscribers(self, subscribers: Sequence[Subscriber]) -> None: ...

    def end_session(self, sub: str, why: str) -> None: ...

    def serve_pending(self, handle: Callable[[dict[str, Any]], dict[str, Any]]) -> int: ...


@dataclass
class Parts:
    """Everything the service drives; `open_counters` is called once the datapath is attached."""

    datapath: DatapathPort
    shaper: ShaperPort
    meter: UsageStream
    endpoint: ControlPort
    open_counters: Callable[[], CounterSource]
    clock: Clock
    outbound: Sequence[OutboundPort] = ()
    radius: RadiusPort | None = None  # also in `outbound`
    # The datapath's RTT histograms (meter/latency.py), once it is attached; None: not read.
    open_latency: Callable[[], RttSource] | None = None
