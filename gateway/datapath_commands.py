"""`desanet datapath ...`: attach, inspect and detach the datapath by hand; the service's loader.

The service attaches through `SpawnedDatapath`: the compiler (BCC and LLVM,
about 140 MB resident) runs in a short-lived `desanet datapath attach` child,
and the long-running process reaches the pinned maps by bpf(2) alone.
"""

from __future__ import annotations

import argparse
import logging
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np

from desanet.ebpf import abi, bpffs
from desanet.ebpf.datapath import Datapath
from desanet.errors import DatapathError
from desanet.units import format_bytes

log = logging.getLogger(__name__)
_ERROR_PREFIX = "desanet: error: "
# Compiling both programs takes a few seconds; a loader stuck far longer is broken.
LOADER_TIMEOUT_S = 300


class SpawnedDatapath(Datapath):
    """A datapath attached by a child process and then opened through its pins (no BCC here)."""

    def loader_command(self) -> list[str]:
        """The child that compiles, loads, pins and attaches (`desanet datapath attach`)."""
        # -P: the child imports the installed desanet, never one in the working directory.
        cmd = [sys.executable, "-P", "-m", "desanet.gateway.cli", "datapath", "attach"]
        cmd += ["--lan", self.lan, "--gateway-id", self.gateway_id]
        cmd += ["--capacity", str(self.capacity), "--bpffs", str(self.bpffs)]
        cmd += ["--block-unprovisioned"] if self.block_unprovisioned else []
        cmd += [] if self.rtt_track else ["--no-rtt"]
        return cmd + (["--upload-ifb", self.upload_ifb] if self.upload_ifb else [])

    def attach(self) -> None:
        """Attach in a child, then open the pins; the child's log lines are logged here."""
        bpffs.durable(self.bpffs, mount=False)  # refused here, before a compiler is started
        try:
            result = subprocess.run(
                self.loader_command(), capture_output=True, text=True, timeout=LOADER_TIMEOUT_S
            )
        except subprocess.TimeoutExpired as err:
            raise DatapathError(
                f"the datapath loader did not finish within {LOADER_TIMEOUT_S} s "
                "(compiling and loading the programs)"
            ) from err
        error = ""
        for line in result.stderr.splitlines():
            if line.startswith(_ERROR_PREFIX):
                error = line.removeprefix(_ERROR_PREFIX)
                continue
            # The child logs as `desanet` does: "date time LEVEL logger: message".
            parts = line.split(" ", 3)
            level = logging.getLevelName(parts[2]) if len(parts) == 4 else None
            if isinstance(level, int):
                log.log(level, "loader: %s", parts[3])
            elif line.strip():
                log.info("loader: %s", line)
        if result.returncode != 0:
            raise DatapathError(
                error or f"the datapath loader exited with status {result.returncode}"
            )
        self.open()


def register(subparsers: Any) -> None:
    """Add the `datapath` verb and its sub-verbs."""
    parser = subparsers.add_parser(
        "datapath", help="attach, provision, read or detach the datapath"
    )
    verbs = parser.add_subparsers(dest="datapath_command", metavar="ACTION")
    verbs.required = True

    def common(p: argparse.ArgumentParser) -> None:
        p.add_argument("--lan", required=True, help="interface facing the subscribers")
        p.add_argument("--gateway-id", required=True, help="gateway id (names the pinned maps)")
        p.add_argument(
            "--capacity", type=int, default=abi.DEFAULT_CAPACITY, help="subscriber slots"
        )
        p.add_argument("--bpffs", type=Path, default=abi.BPFFS, help="bpffs holding the pins")

    attach = verbs.add_parser(
        "attach", help="compile and attach (keeps counters of a previous attach)"
    )
    common(attach)
    attach.add_argument("--upload-ifb", help="IFB device carrying the upload HTB tree")
    attach.add_argument(
        "--block-unprovisioned",
        action="store_true",
        help="drop forwarded traffic of addresses no subscriber owns ([policy] block)",
    )
    attach.add_argument(
        "--no-rtt",
        action="store_true",
        help="compile the passive RTT tracker out ([latency] track = false)",
    )
    attach.set_defaults(func=_attach)

    detach = verbs.add_parser("detach", help="remove filters, clsact qdisc and pinned maps")
    common(detach)
    detach.set_defaults(func=_detach)

    provision = verbs.add_parser("provision", help="map prefixes to a subscriber slot")
    common(provision)
    provision.add_argument("--slot", type=int, required=True)
    provision.add_argument(
        "--prefixes", required=True, help='space-separated, e.g. "10.0.0.5 fd00::5"'
    )
    provision.add_argument("--down-classid", type=lambda v: int(v, 0), default=0)
    provision.add_argument("--up-classid", type=lambda v: int(v, 0), default=0)
    provision.set_defaults(func=_provision)

    counters = verbs.add_parser("counters", help="print the cumulative counters of every busy slot")
    common(counters)
    counters.set_defaults(func=_counters)


def _datapath(args: argparse.Namespace, **kwargs: Any) -> Datapath:
    return Datapath(args.lan, args.gateway_id, capacity=args.capacity, bpffs=args.bpffs, **kwargs)


def _attach(args: argparse.Namespace) -> int:
    datapath = _datapath(
        args,
        upload_ifb=args.upload_ifb,
        block_unprovisioned=args.block_unprovisioned,
        rtt_track=not args.no_rtt,
    )
    datapath.attach()
    print(f"datapath attached to {args.lan}; maps pinned in {datapath.pin_dir}")
    return 0


def _detach(args: argparse.Namespace) -> int:
    _datapath(args).detach()
    print(f"datapath detached from {args.lan}")
    return 0


def _provision(args: argparse.Namespace) -> int:
    datapath = _datapath(args)
    datapath.open()
    datapath.provision(args.slot, args.prefixes.split(), args.down_classid, args.up_classid)
    print(f"slot {args.slot}: {' '.join(args.prefixes.split())}")
    return 0


def _counters(args: argparse.Namespace) -> int:
    datapath = _datapath(args)
    datapath.open()
    counters = datapath.read_counters()
    prefixes = datapath.prefixes()
    print(f"{'slot':>6} {'up':>12} {'up pkts':>10} {'down':>12} {'down pkts':>10}  prefixes")
    for slot in np.flatnonzero(counters.any(axis=1)):
        up, up_pkts, down, down_pkts = (int(v) for v in counters[slot])
        names = " ".join(prefixes.get(int(slot), ["(unmatched)" if slot == 0 else "(withdrawn)"]))
        print(
            f"{slot:>6} {format_bytes(up):>12} {up_pkts:>10} {format_bytes(down):>12} "
            f"{down_pkts:>10}  {names}"
        )
    return 0
