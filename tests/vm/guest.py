"""Inside the test VM: prepare the kernel like a gateway, run one command, report its exit code.

Usage (from tests.vm.machine): `python -m tests.vm.guest SHARE -- COMMAND...`.
SHARE is the directory shared with the host: `started.json` there tells the
host the boot finished, `result.json` carries the command's exit code.
"""

from __future__ import annotations

import json
import os
import platform
import subprocess
import sys
from pathlib import Path

# Everything the gateway and the tests ask the stock kernel for. They would
# load on demand too; loading them first makes a missing one fail here, by name.
MODULES = (
    "sch_htb",
    "sch_fq_codel",
    "sch_cake",
    "sch_netem",
    "sch_ingress",
    "cls_bpf",
    "act_mirred",
    "ifb",
)

IN_VM_ENV = "DESANET_IN_VM"


def prepare() -> None:
    """Mount bpffs and load the qdisc modules, as a gateway's boot would."""
    with open("/proc/mounts") as mounts:
        if not any(line.split()[1] == "/sys/fs/bpf" for line in mounts):
            subprocess.run(["mount", "-t", "bpf", "bpf", "/sys/fs/bpf"], check=True)
    subprocess.run(["modprobe", "-a", *MODULES], check=True)


def main(argv: list[str]) -> int:
    """Entry point: `SHARE -- COMMAND...`; returns the command's exit code."""
    if len(argv) < 3 or argv[1] != "--":
        print("usage: python -m tests.vm.guest SHARE -- COMMAND...", file=sys.stderr)
        return 2
    share = Path(argv[0])
    command = argv[2:]
    (share / "started.json").write_text(json.dumps({"kernel": platform.release()}) + "\n")
    print(f"== stock-kernel VM up: Linux {platform.release()}", flush=True)
    try:
        prepare()
        env = dict(os.environ, **{IN_VM_ENV: "1", "PYTHONUNBUFFERED": "1"})
        code = subprocess.run(command, stderr=subprocess.STDOUT, env=env).returncode
    except (OSError, subprocess.CalledProcessError) as exc:
        print(f"== VM preparation failed: {exc}", flush=True)
        code = 1
    sys.stdout.flush()
    (share / "result.json").write_text(json.dumps({"exit_code": code}) + "\n")
    return code


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
