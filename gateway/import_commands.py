"""`desanet import`: subscribers files from other systems' exports (LibreQoS for now)."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from desanet.gateway.libreqos import import_libreqos


def register(subparsers: Any) -> None:
    """Add the import verbs to the `desanet` parser."""
    verb = subparsers.add_parser("import", help="write a subscribers file from another system's")
    kinds = verb.add_subparsers(dest="kind", metavar="FORMAT")
    kinds.required = True
    lqos = kinds.add_parser("libreqos", help="from LibreQoS's ShapedDevices.csv")
    lqos.add_argument("devices", type=Path, help="ShapedDevices.csv")
    lqos.add_argument("--network", type=Path, help="network.json: check the Parent Node names")
    lqos.add_argument(
        "-o", "--output", type=Path, default=Path("subscribers.csv"), help="subscribers file"
    )
    lqos.add_argument(
        "--mac",
        action="store_true",
        help="also write the devices' MACs into a `mac` column (the gateway must know it)",
    )
    lqos.set_defaults(func=cmd_import_libreqos)


def cmd_import_libreqos(args: argparse.Namespace) -> int:
    """Import, then say what was written and what the operator still has to decide."""
    imported = import_libreqos(args.devices, args.output, args.network, args.mac)
    circuits = imported.circuits
    print(f"{args.output}: {len(circuits)} subscribers from {args.devices}")
    macs = sum(len(c.macs) for c in circuits)
    if macs and not args.mac:
        print(f"  {macs} MAC addresses left out (pass --mac to write a `mac` column)")
    if imported.leaf:
        print(f'  LibreQoS sqm: set [shaping] leaf = "{imported.leaf}" in gateway.toml')
    for note in imported.notes:
        print(f"  note: {note}")
    return 0
