"""`desanet hub init` and `desanet hub collect`: the district hub's verbs (NATS JetStream)."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from desanet.errors import ConfigError
from desanet.meter.fleet_hub import HubTLS, init_hub


def register(subparsers: Any) -> None:
    """Add the `hub` verb and its subcommands to the `desanet` parser."""
    hub = subparsers.add_parser("hub", help="the district hub: NATS configuration, collectors")
    verbs = hub.add_subparsers(dest="hub_command", metavar="HUB_COMMAND")
    verbs.required = True

    init = verbs.add_parser(
        "init",
        help="write the nats-server fragment, the stream and one NKEY per gateway",
        description="Writes OUT/desanet-hub.conf (include it in each hub node's "
        "nats-server.conf), OUT/stream.json and OUT/gateways/<id>.nk (give each gateway its "
        "own). Existing keys are kept: run it again to add gateways, then reload nats-server.",
    )
    init.add_argument("gateways", nargs="*", metavar="GATEWAY_ID", help="gateway ids")
    init.add_argument(
        "--gateways-file", type=Path, help="file with one gateway id per line ('#' comments)"
    )
    init.add_argument("--out", type=Path, default=Path("hub"), help="output folder (./hub)")
    init.add_argument(
        "--collector",
        action="append",
        metavar="NAME",
        help="collector user name (default: one named 'collector'); repeatable",
    )
    init.add_argument("--replicas", type=int, default=1, help="stream replicas (3 on a cluster)")
    init.add_argument("--tls-cert", type=Path, help="the hub's TLS certificate (PEM)")
    init.add_argument("--tls-key", type=Path, help="the hub's TLS private key (PEM)")
    init.set_defaults(func=cmd_hub_init)


def _gateway_ids(args: argparse.Namespace) -> list[str]:
    ids = list(args.gateways)
    if args.gateways_file is not None:
        try:
            lines = args.gateways_file.read_text().splitlines()
        except OSError as err:
            raise ConfigError(f"{args.gateways_file}: {err.strerror}") from None
        ids += [s for line in lines if (s := line.split("#", 1)[0].strip())]
    return ids


def cmd_hub_init(args: argparse.Namespace) -> int:
    """Write the hub's configuration files; prints what to copy where."""
    if (args.tls_cert is None) != (args.tls_key is None):
        raise ConfigError("hub init: give both --tls-cert and --tls-key, or neither")
    tls = HubTLS(args.tls_cert, args.tls_key) if args.tls_cert is not None else None
    files = init_hub(
        args.out,
        _gateway_ids(args),
        tls,
        collectors=args.collector or ("collector",),
        replicas=args.replicas,
    )
    print(f"nats-server fragment: {files.config} (include it on every hub node)")
    print(f"stream definition: {files.stream}")
    print(f"{len(files.gateways)} gateway keys, {len(files.created)} new:")
    for path in files.created:
        print(f"  new key {path}")
    if tls is None:
        print("warning: no TLS: gateways' traffic to this hub would cross the internet in clear")
    return 0
