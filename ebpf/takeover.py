"""Taking over the maps of a datapath that still runs in tc but whose pins are gone.

The pins can vanish while tc keeps the programs, and with them their maps
(a bpffs that died with a mount namespace, pins removed by hand). The
counters are still in those maps, incremented by every packet. Found through
the filters (tc gives each filter's program id, the program's info lists its
map ids) and pinned again under the datapath's pin directory, they are what
the next program is compiled against, so the replacement continues the very
counters the running program increments: nothing lost, nothing counted twice.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Collection
from pathlib import Path

from desanet.ebpf import bpf_syscall, tc

log = logging.getLogger(__name__)


def pin_running_maps(lan_index: int, pin_dir: Path, names: Collection[str]) -> list[str]:
    """Pin, under `pin_dir`, the maps named in `names` that our filters on ifindex
    `lan_index` use; returns the names pinned (none when no filter of ours runs)."""
    found: dict[str, int] = {}
    try:
        for prog_id in tc.attached_program_ids(lan_index):
            prog_fd = bpf_syscall.prog_fd_by_id(prog_id)
            try:
                map_ids = bpf_syscall.prog_map_ids(prog_fd)
            finally:
                os.close(prog_fd)
            for map_id in map_ids:
                fd = bpf_syscall.map_fd_by_id(map_id)
                name = bpf_syscall.map_shape(fd).name
                if name in names and name not in found:
                    found[name] = fd
                else:
                    os.close(fd)
        if found:
            pin_dir.mkdir(parents=True, exist_ok=True)
        for name, fd in found.items():
            # What the running filters use is the truth; a leftover pin of that name is not.
            (pin_dir / name).unlink(missing_ok=True)
            bpf_syscall.obj_pin(fd, str(pin_dir / name))
    finally:
        for fd in found.values():
            os.close(fd)
    if found:
        log.warning("the datapath was running without pins: pinned its maps again in %s", pin_dir)
    return sorted(found)
