"""The `desanet` command: one verb per job, all registered here by the composition root."""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Sequence

from desanet import __version__
from desanet.errors import DesanetError
from desanet.gateway import (
    commands,
    datapath_commands,
    hub_commands,
    import_commands,
    usage_commands,
)
from desanet.gateway.console import commands as console_commands

# Each module exposes `register(subparsers)`, adding its verbs with a `func(args) -> int`.
COMMAND_MODULES = (
    datapath_commands,
    usage_commands,
    commands,
    import_commands,
    console_commands,
    hub_commands,
)


def build_parser() -> argparse.ArgumentParser:
    """The argument parser with every verb of every package."""
    parser = argparse.ArgumentParser(
        prog="desanet",
        description="Edge engine of village cooperative ISPs: meter, shape, publish usage.",
    )
    parser.add_argument("--version", action="version", version=f"desanet {__version__}")
    parser.add_argument("-v", "--verbose", action="store_true", help="log debug detail")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND")
    subparsers.required = True
    for module in COMMAND_MODULES:
        module.register(subparsers)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the console script; returns the process exit code."""
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    try:
        return int(args.func(args))
    except DesanetError as err:
        print(f"desanet: error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("desanet: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
