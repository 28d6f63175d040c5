"""The datapath's place in tc: a clsact qdisc, two direct-action cls_bpf filters, upload steering.

Our filters have fixed handles and priorities, so attaching again replaces
them instead of adding a second copy; deleting the clsact qdisc removes them all.
"""

from __future__ import annotations

import contextlib
import errno
import struct
from typing import Any

from pyroute2 import IPRoute
from pyroute2.netlink.exceptions import NetlinkError

from desanet.errors import DatapathError

# clsact's two hooks, as tc parents.
PARENT_INGRESS = 0xFFFFFFF2
PARENT_EGRESS = 0xFFFFFFF3
FILTER_PRIO = 0xDE5A >> 4  # a fixed priority so a re-attach replaces our own filter
ETH_P_ALL = 0x0003
TCA_BPF_ID = 11  # linux/pkt_cls.h: the kernel id of a cls_bpf filter's program


def attach_filters(
    lan: str, index: int, ingress: Any, egress: Any, steer: Any, upload_index: int
) -> None:
    """Put the programs (BCC functions: .fd, .name) on clsact of `lan` (ifindex `index`);
    with `upload_index`, steer what ingress passes on to that device. Replaces our own filters."""
    with IPRoute() as ipr:
        created_qdisc = False
        try:
            ipr.tc("add", "clsact", index)
            created_qdisc = True
        except NetlinkError as err:
            if err.code != errno.EEXIST:
                raise DatapathError(f"cannot add clsact to {lan}: {err}") from err
        try:
            for parent, fn in ((PARENT_INGRESS, ingress), (PARENT_EGRESS, egress)):
                ipr.tc(
                    "replace-filter",
                    "bpf",
                    index,
                    handle=1,
                    prio=FILTER_PRIO,
                    parent=parent,
                    fd=fn.fd,
                    name=fn.name.decode(),
                    direct_action=True,
                    protocol=ETH_P_ALL,
                )
            steering = {"handle": 2, "prio": FILTER_PRIO + 1, "parent": PARENT_INGRESS}
            if upload_index:
                ipr.tc(
                    "replace-filter",
                    "bpf",
                    index,
                    fd=steer.fd,
                    name=steer.name.decode(),
                    classid=1,
                    protocol=ETH_P_ALL,
                    action={
                        "kind": "mirred",
                        "direction": "egress",
                        "action": "redirect",
                        "ifindex": upload_index,
                    },
                    **steering,
                )
            else:
                # A previous attach may have steered upload to an IFB; this one does not.
                with contextlib.suppress(NetlinkError):
                    ipr.tc("del-filter", "bpf", index, protocol=ETH_P_ALL, **steering)
        except NetlinkError as err:
            if created_qdisc:
                with contextlib.suppress(NetlinkError):
                    ipr.tc("del", "clsact", index)
            raise DatapathError(f"cannot attach the datapath to {lan}: {err}") from err


def attached_program_ids(index: int) -> list[int]:
    """Kernel ids of the programs in our own metering filters on ifindex `index` (none if bare).

    A datapath whose pins were lost is still running in them; their maps hold its counters."""
    ids: list[int] = []
    with IPRoute() as ipr:
        for parent in (PARENT_INGRESS, PARENT_EGRESS):
            try:
                found = ipr.get_filters(index=index, parent=parent)
            except NetlinkError as err:
                if err.code in (errno.EINVAL, errno.ENOENT):  # no clsact on this device
                    continue
                raise DatapathError(
                    f"cannot list the tc filters of ifindex {index}: {err}"
                ) from err
            for msg in found:
                options = msg.get_attr("TCA_OPTIONS")
                if msg["info"] >> 16 != FILTER_PRIO or msg["handle"] != 1 or options is None:
                    continue
                prog_id = bpf_prog_id(
                    bytes(options.data[options.offset : options.offset + options.length])
                )
                if prog_id:
                    ids.append(prog_id)
    return ids


def bpf_prog_id(options: bytes) -> int:
    """TCA_BPF_ID from the raw TCA_OPTIONS attribute of a cls_bpf filter (0 if absent).

    pyroute2 does not decode this attribute, so the nested attributes are walked here."""
    pos = 4  # past the TCA_OPTIONS header itself
    while pos + 4 <= len(options):
        length, kind = struct.unpack_from("=HH", options, pos)
        if length < 4:
            break
        if kind & 0x3FFF == TCA_BPF_ID and length >= 8:
            return int(struct.unpack_from("=I", options, pos + 4)[0])
        pos += (length + 3) & ~3
    return 0


def remove_clsact(lan: str) -> None:
    """Delete the clsact qdisc of `lan` and with it every filter on it; nothing if absent."""
    with IPRoute() as ipr:
        found = ipr.link_lookup(ifname=lan)
        if found:
            with contextlib.suppress(NetlinkError):
                ipr.tc("del", "clsact", found[0])
