"""Boot Debian's stock kernel in QEMU (through virtme-ng) and run one command inside it.

The guest sees the host's own root filesystem read-only, with copy-on-write
overlays (the repository included, so nothing it writes reaches the host), and
one shared directory, mounted at /mnt, through which `tests.vm.guest` reports
that the boot finished and what the command returned. The command's output goes
straight to the host's standard output; the guest console (kernel log) is kept
in a file and shown when the boot or the command fails.

KVM is used only when a short probe boot proves it works: on the development
machines the nested guest hangs before its first console line with KVM, while
TCG (pure emulation) boots in about 20 seconds.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import select
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from desanet.errors import DesanetError

REPO = Path(__file__).resolve().parents[2]
GUEST_SHARE = "/mnt"
STARTED = "started.json"
RESULT = "result.json"
# A KVM probe that has not reached the kernel's panic by then is stuck (~1 s when KVM works).
KVM_PROBE_TIMEOUT_S = 8.0


class VmError(DesanetError):
    """The test VM could not be booted (missing kernel, QEMU or virtme-ng)."""


@dataclass(frozen=True)
class VmRun:
    """What happened to one VM run: booted or not, the command's exit code, the console log."""

    booted: bool
    finished: bool
    exit_code: int | None
    guest_kernel: str | None
    accel: str
    console: str
    timed_out: bool

    def console_after_boot(self) -> str:
        """The console from the moment the guest started the command: the kernel log of the run."""
        marker = self.console.find("virtme-ng-init: starting script")
        return self.console if marker < 0 else self.console[marker:]


def stock_kernel() -> tuple[Path, str]:
    """The newest installed distribution kernel image that has its modules: (vmlinuz, release)."""
    candidates = []
    for image in Path("/boot").glob("vmlinuz-*"):
        release = image.name.removeprefix("vmlinuz-")
        if (Path("/lib/modules") / release / "kernel").is_dir() and os.access(image, os.R_OK):
            candidates.append((_version_key(release), image, release))
    if not candidates:
        raise VmError(
            "no stock kernel with modules under /boot and /lib/modules: "
            "run `make setup` (it installs linux-image-amd64)"
        )
    _, image, release = max(candidates)
    return image, release


def _version_key(release: str) -> tuple[int, ...]:
    return tuple(int(n) for n in re.findall(r"\d+", release))


def choose_accel(kernel: Path) -> str:
    """ "kvm" when a probe boot under KVM reaches the kernel quickly, else "tcg".

    DESANET_VM_ACCEL=kvm|tcg skips the probe.
    """
    forced = os.environ.get("DESANET_VM_ACCEL", "").strip().lower()
    if forced in ("kvm", "tcg"):
        return forced
    if forced:
        raise VmError(f"DESANET_VM_ACCEL must be kvm or tcg, not {forced!r}")
    if not os.access("/dev/kvm", os.R_OK | os.W_OK):
        return "tcg"
    # Without a root filesystem the kernel panics right after booting and QEMU
    # exits (-no-reboot): reaching that panic is proof that KVM runs this kernel.
    cmd = [
        _qemu(),
        "-accel",
        "kvm",
        "-cpu",
        "host",
        "-m",
        "256M",
        "-nodefaults",
        "-display",
        "none",
        "-no-reboot",
        "-serial",
        "stdio",
        "-kernel",
        str(kernel),
        "-append",
        "console=ttyS0 panic=-1 loglevel=4",
    ]
    try:
        proc = subprocess.run(
            cmd, capture_output=True, text=True, errors="replace", timeout=KVM_PROBE_TIMEOUT_S
        )
    except subprocess.TimeoutExpired:
        return "tcg"
    return "kvm" if "Kernel panic" in proc.stdout else "tcg"


def _qemu() -> str:
    qemu = shutil.which("qemu-system-x86_64")
    if qemu is None:
        raise VmError("qemu-system-x86_64 is missing: run `make setup` (package qemu-system-x86)")
    return qemu


def _vng() -> str:
    vng = Path(sys.executable).parent / "vng"
    if not vng.exists():
        raise VmError(f"{vng} is missing: run `make setup` (virtme-ng is a dev dependency)")
    return str(vng)


def run_in_vm(
    argv: Sequence[str],
    *,
    timeout_s: float,
    cpus: int = 2,
    memory: str = "2G",
    share: Path | None = None,
) -> VmRun:
    """Boot the stock kernel, run `argv` (through tests.vm.guest) in the repository, power off.

    `share` is a host directory the guest sees at /mnt (a fresh temporary one
    when None); the command may leave files there for the host to read.
    """
    kernel, _release = stock_kernel()
    accel = choose_accel(kernel)
    _qemu()  # vng runs it: fail here with the package to install, not in vng's words
    with contextlib.ExitStack() as stack:
        if share is None:
            share = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="desanet-vm-")))
        for stale in (STARTED, RESULT):
            (share / stale).unlink(missing_ok=True)
        console_path = share / "console.log"
        guest_cmd = [sys.executable, "-m", "tests.vm.guest", GUEST_SHARE, "--", *argv]
        cmd = [
            _vng(),
            "--run",
            str(kernel),
            "--verbose",
            "--force-9p",
            "--cpus",
            str(cpus),
            "--memory",
            memory,
            "--cwd",
            str(REPO),
            "--rwdir",
            f"{GUEST_SHARE}={share}",
            "--overlay-rwdir",
            str(REPO),
            "--exec",
            shlex.join(guest_cmd),
        ]
        if accel == "tcg":
            cmd.append("--disable-kvm")
        env = dict(os.environ)
        # vng starts its helpers (virtme-run, virtme-ng-init) from the venv's bin directory.
        env["PATH"] = f"{Path(sys.executable).parent}:{env.get('PATH', '/usr/bin:/bin')}"
        with open(console_path, "wb") as console:
            # --verbose sends the guest console to stderr and the command's stdout to stdout.
            # QEMU reopens its stdout by path: handed a file, it would write from offset 0
            # over the host's own lines, so the output comes through a pipe and is copied.
            proc = subprocess.Popen(
                cmd,
                stdout=subprocess.PIPE,
                stderr=console,
                stdin=subprocess.DEVNULL,
                env=env,
                start_new_session=True,
            )
            timed_out = _relay(proc, timeout_s)
        started = _read_json(share / STARTED)
        result = _read_json(share / RESULT)
        return VmRun(
            booted=started is not None,
            finished=result is not None,
            exit_code=None if result is None else int(result["exit_code"]),
            guest_kernel=None if started is None else str(started["kernel"]),
            accel=accel,
            console=console_path.read_text(errors="replace"),
            timed_out=timed_out,
        )


def _relay(proc: subprocess.Popen[bytes], timeout_s: float) -> bool:
    """Copy the guest's output to our stdout until it exits; kill it at the deadline (True)."""
    assert proc.stdout is not None
    deadline = time.monotonic() + timeout_s
    out = sys.stdout.buffer
    fd = proc.stdout.fileno()
    while True:
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
            return True
        ready, _, _ = select.select([fd], [], [], min(remaining, 1.0))
        if not ready:
            continue
        chunk = os.read(fd, 65536)
        if not chunk:
            proc.wait()
            return False
        out.write(chunk)
        out.flush()


def _read_json(path: Path) -> dict[str, Any] | None:
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None
