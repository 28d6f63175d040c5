"""The production parts of `desanet run`, built from the configuration.

The one place that names the concrete classes: the eBPF datapath, the HTB
shaper, the counter reader, the usage stream and the control endpoint. The
endpoints bind here, before the service touches the kernel, so a port already
taken is refused first.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

from desanet.clock import SteadyClock
from desanet.ebpf import abi, bpffs
from desanet.gateway.config import Config
from desanet.gateway.control import MAX_REQUEST_BYTES, ControlEndpoint
from desanet.gateway.datapath_commands import SpawnedDatapath
from desanet.gateway.fleet_control import FleetControl
from desanet.gateway.parts import ControlPort, OutboundPort, Parts
from desanet.gateway.radius_part import RadiusPart
from desanet.gateway.roles import Roles
from desanet.meter.fleet import FleetConnection, gateway_inbox
from desanet.meter.fleet_control import ControlInbox
from desanet.meter.fleet_forward import Forwarder, ForwarderConfig
from desanet.meter.journal import Retention
from desanet.meter.latency import RttReader
from desanet.meter.poll import CounterReader, CounterSource
from desanet.meter.service import MeterService, StreamConfig
from desanet.shaper.apply import Shaper, upload_ifb_name

FLEET_CURSOR = "fleet-cursor.json"  # the last seq the hub acknowledged, in state_dir

# What builds the parts: `production_parts`, or a test's fakes.
Compose = Callable[[Config, Roles, Mapping[int, str]], Parts]


def open_counters(config: Config) -> CounterSource:
    """The reader of the attached datapath's pinned counters map."""
    return CounterReader.for_datapath(config.gateway_id, config.lan)


def production_parts(config: Config, roles: Roles, slot_owners: Mapping[int, str]) -> Parts:
    """Bind the usage and control endpoints, then build the kernel parts (not yet touched).

    A gateway whose pins would not outlive the service is refused first of all."""
    bpffs.durable(abi.BPFFS, mount=False)
    meter = MeterService(
        config.gateway_id,
        config.state_dir,
        StreamConfig(
            config.publish.usage, config.publish.replay, roles.read, retention=retention(config)
        ),
        slot_owners,
    )
    try:
        local = ControlEndpoint(config.control.endpoint, roles.control)
        outbound = outbound_parts(config, meter)
        endpoint = control_port(local, outbound)
        radius = radius_part(config, meter)  # last: nothing after it can fail and leave it bound
        outbound = [*outbound, *([radius] if radius else [])]
    except BaseException:
        meter.close()
        raise
    ifb = upload_ifb_name(config.lan)
    return Parts(
        datapath=SpawnedDatapath(
            config.lan,
            config.gateway_id,
            capacity=config.capacity,
            upload_ifb=ifb,
            block_unprovisioned=config.policy.unprovisioned == "block",
            rtt_track=config.latency.track,
        ),
        shaper=Shaper(config.lan, ifb),
        meter=meter,
        endpoint=endpoint,
        open_counters=lambda: open_counters(config),
        clock=steady_clock(meter),
        outbound=outbound,
        radius=radius,
        open_latency=lambda: RttReader.for_datapath(config.gateway_id, config.lan),
    )


def retention(config: Config) -> Retention:
    """How long the journal keeps messages: `[fleet] retention` (days) with a hub."""
    if config.fleet is None:
        return Retention()
    return Retention(max_age_s=config.fleet.retention_ms / 1000)


def outbound_parts(config: Config, meter: MeterService) -> list[OutboundPort]:
    """The journal's consumers the configuration asks for: the fleet forwarder with `[fleet]`.

    Bad credentials or CA files are refused here, before the kernel is touched.
    """
    if config.fleet is None:
        return []
    fleet = config.fleet
    connection = FleetConnection(
        fleet.servers,
        fleet.credentials,
        config.gateway_id,
        gateway_inbox(config.gateway_id),
        fleet.ca,
    )
    forwarder = Forwarder(
        config.gateway_id,
        meter.journal,
        config.state_dir / FLEET_CURSOR,
        connection,
        ForwarderConfig(window=fleet.window),
        control=ControlInbox(MAX_REQUEST_BYTES) if fleet.control else None,
    )
    # Retention never drops what the hub has not acknowledged (below its hard size cap).
    meter.journal.hold(forwarder.delivered_seq)
    return [forwarder]


def radius_part(config: Config, meter: MeterService) -> RadiusPart | None:
    """With `[radius]`: accounting from the journal and the CoA listener (secrets read, bound)."""
    if config.radius is None:
        return None
    return RadiusPart(config, config.radius, meter.journal)


def control_port(local: ControlEndpoint, outbound: Sequence[OutboundPort]) -> ControlPort:
    """The local endpoint, joined by the hub's requests when a forwarder takes them."""
    for port in outbound:
        if isinstance(port, Forwarder) and port.control is not None:
            return FleetControl(local, port.control)
    return local


def steady_clock(meter: MeterService, **sources: Any) -> SteadyClock:
    """The service's clock: never earlier than the last interval the journal holds.

    A gateway without a real-time clock may boot in the wrong year; stamps
    (and with them quota months) follow the system clock only once the kernel
    reports it synchronized. `sources` replaces the system's clocks in tests
    (`SteadyClock`'s wall_ms, mono_ms, synchronized).
    """
    return SteadyClock(floor_ms=meter.last_t1_ms, **sources)
