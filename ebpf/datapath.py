# Over 400 lines: it is one class whose attach, open and provisioning share the maps' handles and
# the owner tables; the policy maps' own work (MACs, the gateway's addresses, drops) is in
# ebpf/policy_maps.py.
"""The loader: compile the datapath with BCC, pin its maps, attach it to the LAN interface.

Maps live in bpffs under <bpffs>/desanet/<gateway id>/<lan>/, so a restarted
loader finds the same counters and keeps counting; the counter summing program
(ebpf/counter_sums.py) is loaded and pinned there with them. `open()` reaches
an attached datapath through those pins alone (bpf(2), no BCC, no compiler);
`detach()` removes the tc filters, the clsact qdisc and the pins, leaving
nothing behind. The bpffs must outlive the process (ebpf/bpffs.py checks);
pins lost while our filters run are taken over from them (ebpf/takeover.py).
"""

from __future__ import annotations

import contextlib
import ctypes
import logging
import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
from pyroute2 import IPRoute

from desanet.ebpf import abi, bpf_syscall, bpffs, build, counter_sums, policy_maps, takeover, tc
from desanet.ebpf.counter_sums import CounterSums
from desanet.ebpf.maps import BpfMap
from desanet.ebpf.prefixes import KeyTuple, format_mac, key_of, parse_prefix, prefix_of
from desanet.errors import DatapathError, ValidationError
from desanet.validate import check_gateway_id

log = logging.getLogger(__name__)

SOURCE = build.EBPF_DIR / "datapath.bpf.c"
BPFFS = abi.BPFFS
_HOST = 128  # key length of a whole address: such keys live in the `hosts` hash


def compile_program(capacity: int, pin_dir: Path, rtt_track: bool = True) -> Any:
    """Compile the datapath with BCC for `capacity` subscribers, maps pinned under `pin_dir`;
    `rtt_track` False compiles the passive RTT tracker out (its maps stay, with no samples)."""
    defines: dict[str, str | int] = {
        "DESANET_CAPACITY": capacity,
        "DESANET_PIN_DIR": f'"{pin_dir}"',
        "DESANET_RTT_TRACK": int(rtt_track),
    }
    return build.compile_source(SOURCE, defines, "the datapath")


# Key and value types of each map the datapath provisions, as ctypes.
MAP_TYPES: dict[str, tuple[type[Any], type[Any]]] = {
    abi.MAP_SUBSCRIBERS: (abi.LpmKey, ctypes.c_uint32),
    abi.MAP_HOSTS: (abi.HostKey, ctypes.c_uint32),
    abi.MAP_SLOTS: (ctypes.c_uint32, abi.Slot),
    abi.MAP_SETTINGS: (ctypes.c_uint32, abi.Settings),
    abi.MAP_MACS: (abi.MacKey, ctypes.c_uint32),
    abi.MAP_GATEWAY_ADDRS: (abi.HostKey, ctypes.c_uint32),
    abi.MAP_DROPS: (ctypes.c_uint32, abi.Drops),
}


@dataclass(frozen=True)
class Provision:
    """One slot as the datapath should hold it: its prefixes, MACs, HTB classids and flags.

    MACs with prefixes bind the prefixes to those MACs (ingress from another
    MAC is dropped); MACs alone make the slot follow the device to whatever
    address it uses. Either way an address no one owns, seen from one of the
    MACs, is the slot's.
    """

    slot: int
    prefixes: tuple[str, ...]
    down_classid: int = 0
    up_classid: int = 0
    flags: int = 0
    macs: tuple[str, ...] = ()

    @property
    def slot_flags(self) -> int:
        """The flags as the datapath holds them: MAC_BOUND added for prefixes with MACs."""
        bound = abi.SLOT_MAC_BOUND if self.macs and self.prefixes else 0
        return self.flags | bound


class Datapath:
    """The metering and steering program of one LAN interface of one gateway."""

    def __init__(
        self,
        lan: str,
        gateway_id: str,
        *,
        capacity: int = abi.DEFAULT_CAPACITY,
        upload_ifb: str | None = None,
        bpffs: Path = BPFFS,
        block_unprovisioned: bool = False,
        rtt_track: bool = True,
    ) -> None:
        check_gateway_id(gateway_id)
        if not 1 <= capacity <= 4_000_000:
            raise ValidationError(
                f"datapath capacity {capacity} must be 1 to 4,000,000 subscribers"
            )
        self.lan = lan
        self.gateway_id = gateway_id
        self.capacity = capacity
        self.upload_ifb = upload_ifb
        self.bpffs = bpffs
        self.block_unprovisioned = block_unprovisioned
        self.rtt_track = rtt_track
        self.pin_dir = abi.pin_dir(gateway_id, lan, bpffs)
        self._bpf: Any = None  # the BCC module, in the process that attached
        self._maps: dict[str, BpfMap] = {}
        self._sums: CounterSums | None = None
        self._owner: dict[KeyTuple, int] = {}
        self._mac_owner: dict[bytes, int] = {}

    # -- attach / detach -------------------------------------------------------------------

    def attach(self) -> None:
        """Compile, pin and attach; a second attach replaces the program and keeps the counters."""
        if os.geteuid() != 0:
            raise DatapathError("attaching the datapath needs root (CAP_BPF and CAP_NET_ADMIN)")
        with IPRoute() as ipr:
            lan_index = self._ifindex(ipr, self.lan)
            upload_index = self._ifindex(ipr, self.upload_ifb) if self.upload_ifb else 0
        where = bpffs.durable(self.bpffs)
        created_pins = not self.pin_dir.exists()
        # Pins lost while our filters still run: pin their maps again, so the new program
        # is compiled against them (BPF_TABLE_PINNED reuses a pinned map).
        adopted: list[str] = []
        if not (self.pin_dir / abi.MAP_COUNTERS).exists():
            adopted = takeover.pin_running_maps(lan_index, self.pin_dir, abi.PINNED)
        self._check_pinned_capacity()
        self.pin_dir.mkdir(parents=True, exist_ok=True)
        try:
            bpf = compile_program(self.capacity, self.pin_dir, self.rtt_track)
            ingress = bpf.load_func(b"desanet_ingress", bpf.SCHED_CLS)
            egress = bpf.load_func(b"desanet_egress", bpf.SCHED_CLS)
            steer = bpf.load_func(b"desanet_steer", bpf.SCHED_CLS)
            # Before the filters: a kernel that cannot sum the counters leaves tc untouched.
            counter_sums.load(self.pin_dir)
            tc.attach_filters(self.lan, lan_index, ingress, egress, steer, upload_index)
        except BaseException:
            if created_pins:
                self._unpin()
            raise
        self._close_maps()
        self._bpf = bpf
        self._open_maps()
        self._set_settings(upload_index)
        self._load_owners()
        self.refresh_gateway_addresses()
        log.log(
            logging.INFO if where.certain else logging.WARNING,
            "datapath attached to %s (capacity %d, %s); pins in %s (%s)",
            self.lan,
            self.capacity,
            (
                f"maps {', '.join(adopted)} taken over from the running filters"
                if adopted
                else "new maps"
                if created_pins
                else "pinned maps kept"
            ),
            self.pin_dir,
            where.why,
        )

    def open(self) -> None:
        """Reach the maps of an already attached datapath without touching tc (a second process)."""
        if not (self.pin_dir / abi.MAP_COUNTERS).exists():
            raise DatapathError(
                f"no datapath is attached to {self.lan} for gateway {self.gateway_id} "
                f"(nothing pinned at {self.pin_dir})"
            )
        self._check_pinned_capacity()
        self._close_maps()
        self._open_maps()
        self._load_owners()

    def close(self) -> None:
        """Release this process's handles on the maps; the datapath stays attached."""
        self._close_maps()
        self._bpf = None
        self._owner.clear()
        self._mac_owner.clear()

    def detach(self) -> None:
        """Remove the filters, the clsact qdisc and the pinned maps of this interface."""
        tc.remove_clsact(self.lan)
        self.close()
        self._unpin()
        log.info("datapath detached from %s", self.lan)

    @staticmethod
    def _ifindex(ipr: IPRoute, name: str) -> int:
        found = ipr.link_lookup(ifname=name)
        if not found:
            raise DatapathError(f"interface {name!r} does not exist")
        return int(found[0])

    def _check_pinned_capacity(self) -> None:
        path = self.pin_dir / abi.MAP_COUNTERS
        if not path.exists():
            return
        fd = bpf_syscall.obj_get(str(path))
        try:
            shape = bpf_syscall.map_shape(fd)
        finally:
            os.close(fd)
        if shape.max_entries != self.capacity + 1:
            raise DatapathError(
                f"the counters pinned at {path} hold {shape.max_entries - 1} subscribers, not "
                f"{self.capacity}: publish the usage, then `desanet stop --detach` before "
                "changing capacity"
            )

    def _unpin(self) -> None:
        staged = (
            self.pin_dir.glob(f"{counter_sums.STAGING_PREFIX}*") if self.pin_dir.exists() else []
        )
        for path in [*(self.pin_dir / name for name in abi.PINNED), *staged]:
            with contextlib.suppress(FileNotFoundError):
                path.unlink()
        # Remove the per-interface, per-gateway and desanet directories once empty.
        for directory in (self.pin_dir, self.pin_dir.parent, self.pin_dir.parent.parent):
            with contextlib.suppress(FileNotFoundError, OSError):
                directory.rmdir()

    # -- provisioning --------------------------------------------------------------------------

    def _open_maps(self) -> None:
        for name, (key_type, value_type) in MAP_TYPES.items():
            self._maps[name] = BpfMap.open(self.pin_dir / name, key_type, value_type)

    def _close_maps(self) -> None:
        for table in self._maps.values():
            table.close()
        self._maps.clear()
        if self._sums is not None:
            self._sums.close()
            self._sums = None

    def _check_reached(self) -> None:
        if not self._maps:
            raise DatapathError("the datapath is not attached: call attach() or open() first")

    def _table(self, name: str) -> BpfMap:
        self._check_reached()
        return self._maps[name]

    def _load_owners(self) -> None:
        self._owner = {
            (int(k.prefixlen), bytes(k.addr)): int(v.value)
            for k, v in self._table(abi.MAP_SUBSCRIBERS).items()
        }
        self._owner.update(
            ((_HOST, bytes(k.addr)), int(v)) for k, v in self._table(abi.MAP_HOSTS).items_batch()
        )
        self._mac_owner = {
            bytes(k.addr): int(v) for k, v in self._table(abi.MAP_MACS).items_batch()
        }

    def _host_key(self, key: KeyTuple) -> abi.HostKey:
        return abi.HostKey((ctypes.c_uint8 * 16)(*key[1]))

    def _erase(self, key: KeyTuple) -> None:
        if key[0] == _HOST:
            self._table(abi.MAP_HOSTS).delete(self._host_key(key))
        else:
            self._table(abi.MAP_SUBSCRIBERS).delete(self._key(key))

    def _check_slot(self, slot: int) -> None:
        if not 1 <= slot <= self.capacity:
            raise ValidationError(
                f"slot {slot} is outside 1..{self.capacity}: the datapath holds {self.capacity} "
                "subscribers (raise [meter] capacity)"
            )

    def provision(
        self,
        slot: int,
        prefixes: Sequence[str],
        down_classid: int = 0,
        up_classid: int = 0,
        flags: int = 0,
    ) -> None:
        """Map `prefixes` to `slot` and set its classids; all or nothing."""
        self.provision_many([Provision(slot, tuple(prefixes), down_classid, up_classid, flags)])

    def provision_many(self, entries: Sequence[Provision]) -> None:
        """Provision many slots at once (a village at startup); everything is checked first.

        Each slot ends up with exactly the prefixes listed for it: prefixes it
        held before and no longer lists are withdrawn. Host addresses and slot
        settings are written with batch updates, one system call per map.
        """
        slots = {entry.slot for entry in entries}
        if len(slots) != len(entries):
            raise ValidationError("a slot is listed twice in one provisioning")
        wanted: dict[KeyTuple, int] = {}
        wanted_macs = policy_maps.wanted_macs(entries, slots, self._mac_owner)
        for entry in entries:
            self._check_slot(entry.slot)
            for text in entry.prefixes:
                key = key_of(parse_prefix(text))
                if wanted.setdefault(key, entry.slot) != entry.slot:
                    first = wanted[key]
                    raise ValidationError(
                        f"prefix {prefix_of(key)} is listed for slots {first} and {entry.slot}"
                    )
                owner = self._owner.get(key, entry.slot)
                if owner not in slots:
                    raise ValidationError(
                        f"prefix {prefix_of(key)} already belongs to slot {owner}"
                    )
        stale = [k for k, owner in self._owner.items() if owner in slots and wanted.get(k) != owner]
        limit = self.capacity * abi.PREFIXES_PER_SUBSCRIBER
        if len(self._owner) - len(stale) + len(set(wanted) - set(self._owner)) > limit:
            raise DatapathError(f"the datapath holds {limit} prefixes and is full")

        for key in stale:  # withdrawn first, so a prefix can move between slots in one call
            self._erase(key)
            del self._owner[key]
        policy_maps.replace_macs(self._table(abi.MAP_MACS), self._mac_owner, slots, wanted_macs)
        self._write_slots([(e.slot, e.down_classid, e.up_classid, e.slot_flags) for e in entries])
        fresh = [(k, s) for k, s in wanted.items() if self._owner.get(k) != s]
        written: list[KeyTuple] = []
        try:
            hosts = [(k, s) for k, s in fresh if k[0] == _HOST]
            if hosts:
                keys = (abi.HostKey * len(hosts))(*(self._host_key(k) for k, _ in hosts))
                values = (ctypes.c_uint32 * len(hosts))(*(s for _, s in hosts))
                self._table(abi.MAP_HOSTS).update_batch(keys, values)
                written.extend(k for k, _ in hosts)
            for key, slot in fresh:
                if key[0] != _HOST:
                    self._table(abi.MAP_SUBSCRIBERS).update(self._key(key), ctypes.c_uint32(slot))
                    written.append(key)
        except Exception as err:
            for key in written:
                with contextlib.suppress(KeyError):
                    self._erase(key)
            raise DatapathError(f"cannot store subscriber prefixes: {err}") from err
        self._owner.update(fresh)

    def _write_slots(self, rows: Sequence[tuple[int, int, int, int]]) -> None:
        if not rows:
            return
        keys = (ctypes.c_uint32 * len(rows))(*(r[0] for r in rows))
        values = (abi.Slot * len(rows))(*(abi.Slot(r[1], r[2], r[3], 0) for r in rows))
        self._table(abi.MAP_SLOTS).update_batch(keys, values)

    def set_slot(self, slot: int, down_classid: int, up_classid: int, flags: int = 0) -> None:
        """Set the HTB classids (0 = default class) and flags of a slot."""
        if slot != abi.SLOT_UNMATCHED:
            self._check_slot(slot)
        self._table(abi.MAP_SLOTS).update(
            ctypes.c_uint32(slot), abi.Slot(down_classid, up_classid, flags, 0)
        )

    def unprovision(self, slot: int) -> None:
        """Withdraw a slot's prefixes and classids; its traffic counts as unmatched from now on."""
        self._check_slot(slot)
        for key in [k for k, owner in self._owner.items() if owner == slot]:
            self._erase(key)
            del self._owner[key]
        policy_maps.replace_macs(self._table(abi.MAP_MACS), self._mac_owner, {slot}, {})
        self.set_slot(slot, 0, 0, 0)

    def prefixes(self) -> dict[int, list[str]]:
        """Slot -> the prefixes that map to it, as the kernel holds them."""
        result: dict[int, list[str]] = {}
        for key, slot in self._owner.items():
            result.setdefault(slot, []).append(str(prefix_of(key)))
        return result

    def macs(self) -> dict[int, list[str]]:
        """Slot -> the MACs that map to it, as the kernel holds them."""
        result: dict[int, list[str]] = {}
        for mac, slot in self._mac_owner.items():
            result.setdefault(slot, []).append(format_mac(mac))
        return result

    def _key(self, key: KeyTuple) -> abi.LpmKey:
        length, addr = key
        return abi.LpmKey(length, (ctypes.c_uint8 * 16)(*addr))

    def _set_settings(self, upload_ifindex: int) -> None:
        flags = abi.SETTING_BLOCK_UNPROVISIONED if self.block_unprovisioned else 0
        self._table(abi.MAP_SETTINGS).update(
            ctypes.c_uint32(0), abi.Settings(upload_ifindex, flags)
        )

    def refresh_gateway_addresses(self) -> None:
        """Tell the datapath the gateway's own addresses: every address of its namespace.

        Traffic to them (ingress) or from them (egress) passes every rule, so
        DHCP, DNS and the console work for any device; call again when an
        address of the gateway changes (a new WAN lease).
        """
        policy_maps.store_gateway_addresses(
            self._table(abi.MAP_GATEWAY_ADDRS), policy_maps.own_addresses()
        )

    def read_drops(self) -> dict[str, tuple[int, int]]:
        """Drop reason name (abi.DropReason, lower case) -> (packets, IP bytes) since attach."""
        return policy_maps.read_drops(self._table(abi.MAP_DROPS))

    # -- reading -------------------------------------------------------------------------------

    def read_counters(self) -> npt.NDArray[np.uint64]:
        """Cumulative counters summed over CPUs: (capacity + 1, 4), columns abi.COUNTER_FIELDS.

        The same path as the meter's (ebpf/counter_sums.py): summed in the kernel."""
        self._check_reached()
        if self._sums is None:
            self._sums = CounterSums.open(self.pin_dir)
        return self._sums.read().copy()

    def program_fd(self, name: str) -> int:
        """File descriptor of one of the program's functions (for BPF_PROG_TEST_RUN)."""
        if self._bpf is None:
            raise DatapathError(
                "the datapath's programs are reached through attach() in this process, "
                "not through open()"
            )
        return int(self._bpf.load_func(name.encode(), self._bpf.SCHED_CLS).fd)


@contextlib.contextmanager
def attached(lan: str, gateway_id: str, **kwargs: Any) -> Iterator[Datapath]:
    """A datapath attached for the duration of a `with` block, detached after."""
    datapath = Datapath(lan, gateway_id, **kwargs)
    datapath.attach()
    try:
        yield datapath
    finally:
        datapath.detach()
