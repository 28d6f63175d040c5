"""The datapath's policy maps: subscribers' MACs, the gateway's own addresses, drops by reason.

What `Datapath` provisions beside the address maps (see docs/datapath.md,
"Traffic of no subscriber and MAC binding"): `macs` (MAC -> slot) for MAC
binding and MAC-only subscribers, `gateway_addrs` (the addresses whose
traffic passes every rule) and `drops` (what each rule dropped).
"""

from __future__ import annotations

import ctypes
from collections.abc import Iterable, Mapping, Sequence
from typing import Protocol

from pyroute2 import IPRoute

from desanet.ebpf import abi
from desanet.ebpf.maps import BpfMap
from desanet.ebpf.prefixes import format_mac, key_of, parse_mac, parse_prefix
from desanet.errors import DatapathError, ValidationError


class HasMacs(Protocol):
    """A slot's provisioning as far as MACs go (datapath.Provision)."""

    @property
    def slot(self) -> int: ...

    @property
    def macs(self) -> tuple[str, ...]: ...


def _mac_key(mac: bytes) -> abi.MacKey:
    return abi.MacKey((ctypes.c_uint8 * 6)(*mac))


def wanted_macs(
    entries: Sequence[HasMacs], slots: set[int], owner: Mapping[bytes, int]
) -> dict[bytes, int]:
    """MAC -> slot asked for by `entries`; refuses a MAC of two slots or held outside `slots`."""
    wanted: dict[bytes, int] = {}
    for entry in entries:
        if len(entry.macs) > abi.MACS_PER_SUBSCRIBER:
            raise ValidationError(
                f"slot {entry.slot}: {len(entry.macs)} MACs, at most {abi.MACS_PER_SUBSCRIBER}"
            )
        for text in entry.macs:
            mac = parse_mac(text)
            if wanted.setdefault(mac, entry.slot) != entry.slot:
                raise ValidationError(
                    f"MAC {format_mac(mac)} is listed for slots {wanted[mac]} and {entry.slot}"
                )
            held = owner.get(mac, entry.slot)
            if held not in slots:
                raise ValidationError(f"MAC {format_mac(mac)} already belongs to slot {held}")
    return wanted


def replace_macs(
    table: BpfMap, owner: dict[bytes, int], slots: set[int], wanted: Mapping[bytes, int]
) -> None:
    """Give `slots` exactly the MACs of `wanted` (checked by `wanted_macs`); `owner` follows."""
    for mac, slot in list(owner.items()):
        if slot in slots and wanted.get(mac) != slot:
            table.delete(_mac_key(mac))
            del owner[mac]
    fresh = [(m, s) for m, s in wanted.items() if owner.get(m) != s]
    if not fresh:
        return
    keys = (abi.MacKey * len(fresh))(*(_mac_key(m) for m, _ in fresh))
    values = (ctypes.c_uint32 * len(fresh))(*(s for _, s in fresh))
    try:
        table.update_batch(keys, values)
    except Exception as err:
        raise DatapathError(f"cannot store subscriber MACs: {err}") from err
    owner.update(fresh)


def own_addresses() -> set[bytes]:
    """Every address of every interface in this network namespace, as 16-byte keys."""
    with IPRoute() as ipr:
        # IFA_LOCAL is the interface's own address where IFA_ADDRESS is a point-to-point peer.
        texts = [m.get_attr("IFA_LOCAL") or m.get_attr("IFA_ADDRESS") for m in ipr.get_addr()]
    return {key_of(parse_prefix(str(text)))[1] for text in texts if text}


def store_gateway_addresses(table: BpfMap, addresses: Iterable[bytes]) -> None:
    """Make the `gateway_addrs` map hold exactly `addresses`."""
    found = set(addresses)
    if len(found) > abi.GATEWAY_ADDRS_MAX:
        raise DatapathError(
            f"the gateway has {len(found)} addresses; the datapath knows at most "
            f"{abi.GATEWAY_ADDRS_MAX}"
        )
    held = {bytes(k.addr) for k, _ in table.items_batch()}
    for addr in held - found:
        table.delete(abi.HostKey((ctypes.c_uint8 * 16)(*addr)))
    for addr in found - held:
        table.update(abi.HostKey((ctypes.c_uint8 * 16)(*addr)), ctypes.c_uint32(1))


def read_drops(table: BpfMap) -> dict[str, tuple[int, int]]:
    """Drop reason name (lower case) -> (packets, IP bytes) dropped since the map was made."""
    result = {}
    for reason in abi.DropReason:
        value = table.lookup(ctypes.c_uint32(reason.value))
        counts = (int(value.packets), int(value.bytes)) if value is not None else (0, 0)
        result[reason.name.lower()] = counts
    return result
