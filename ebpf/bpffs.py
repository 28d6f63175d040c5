"""Where the datapath's pins live: a bpffs that outlives the process, or a refusal naming the fix.

A pin lives as long as the bpffs mount that holds it. The host's /sys/fs/bpf
lives as long as the machine, so the counters pinned there survive a kill -9
of the service. `ip netns exec` gives the command a private mount namespace
and a fresh /sys without a bpffs: one mounted there by the service would die
with the last process of that namespace, and its pins with it. So a bpffs is
mounted only in the initial mount namespace; elsewhere one must already be
there, or the service refuses to start and says how to run it instead.
"""

from __future__ import annotations

import ctypes
import os
from dataclasses import dataclass
from pathlib import Path

from desanet.errors import DatapathError

BPF_FS_MAGIC = 0xCAFE4A11
# The inode of the initial mount namespace where the kernel numbers it statically (Linux 6.x).
PROC_MNT_INIT_INO = 0xEFFFFFF8
_libc = ctypes.CDLL(None, use_errno=True)


class _StatFs(ctypes.Structure):
    # struct statfs begins with f_type (a long on every Linux ABI); the rest is room.
    _fields_ = [("f_type", ctypes.c_long), ("_rest", ctypes.c_uint8 * 120)]


@dataclass(frozen=True)
class Bpffs:
    """A bpffs whose pins outlive this process, and why we trust it to."""

    root: Path
    why: str
    certain: bool = True  # False: it may be a namespace's own bpffs, dying with it


def is_bpffs(path: Path) -> bool:
    """True when `path` is on a bpffs (statfs says BPF_FS_MAGIC)."""
    buf = _StatFs()
    if _libc.statfs(str(path).encode(), ctypes.byref(buf)) != 0:
        return False
    return (buf.f_type & 0xFFFFFFFF) == BPF_FS_MAGIC


def in_initial_mount_namespace() -> bool | None:
    """Whether this process shares the mount namespace of PID 1; None when that cannot be told."""
    own = os.stat("/proc/self/ns/mnt").st_ino
    try:
        return own == os.stat("/proc/1/ns/mnt").st_ino
    except OSError:
        # PID 1 hidden from us (a sandbox): the kernel's static number still tells.
        return True if own == PROC_MNT_INIT_INO else None


def _peer_group(root: Path) -> str | None:
    """The propagation tag (shared:N / master:N) of the mount at `root`, if it has one."""
    tag = None
    for line in Path("/proc/self/mountinfo").read_text().splitlines():
        fields = line.split(" - ")[0].split()
        if len(fields) >= 5 and fields[4] == str(root):
            # The last mount at a path is the one seen there.
            tag = next((f for f in fields[6:] if f.startswith(("shared:", "master:"))), None)
    return tag


def refusal(root: Path) -> str:
    """What the operator is told when no bpffs that outlives the service is in reach."""
    return (
        f"{root} is not a bpffs in this mount namespace and a bpffs mounted here would vanish "
        "with this process, taking the pinned counters with it (a kill -9 would lose usage). "
        "`ip netns exec` remounts /sys without one: enter only the network namespace instead "
        "(`nsenter --net=/run/netns/NS desanet run ...`, or systemd's NetworkNamespacePath=), "
        f"or bind-mount the host's bpffs at {root} before starting"
    )


def _mount(root: Path) -> None:
    root.mkdir(parents=True, exist_ok=True)
    if _libc.mount(b"bpf", str(root).encode(), b"bpf", 0, None) != 0:
        err = ctypes.get_errno()
        raise DatapathError(f"cannot mount bpffs at {root}: {os.strerror(err)}")


def durable(root: Path, *, mount: bool = True) -> Bpffs:
    """The bpffs at `root` if its pins outlive this process, mounted there when that is safe
    (the initial mount namespace) and `mount` is true; a check alone with `mount` false.
    Raises DatapathError naming the fix when the pins would die with this process."""
    initial = in_initial_mount_namespace()
    if is_bpffs(root):
        if initial:
            return Bpffs(root, "bpffs of the initial mount namespace")
        tag = _peer_group(root)
        if tag is not None:
            return Bpffs(root, f"bpffs propagated from another mount namespace ({tag})")
        # A private namespace's copy of the host's mount, or one mounted by a process here:
        # the two look alike from inside. The pins live as long as this mount does.
        return Bpffs(
            root,
            "bpffs of a private mount namespace: if it was mounted inside that namespace, "
            "the pins vanish with its last process (the next start takes the maps over)",
            certain=False,
        )
    if not initial:
        raise DatapathError(refusal(root))
    if mount:
        _mount(root)
        return Bpffs(root, "bpffs mounted now in the initial mount namespace")
    return Bpffs(root, "to be mounted in the initial mount namespace")
