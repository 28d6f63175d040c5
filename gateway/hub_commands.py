"""`desanet hub init` and `desanet hub collect`: the district hub's verbs (NATS JetStream)."""

from __future__ import annotations

import argparse
import asyncio
import signal
import sys
from pathlib import Path
from typing import Any

from desanet.errors import ConfigError
from desanet.meter.fleet_hub import HubTLS, init_hub
from desanet.units import format_bytes


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
    init.add_argument(
        "--billing",
        action="append",
        metavar="NAME",
        help="billing user with the control role (desanet.control.*); repeatable",
    )
    init.add_argument("--replicas", type=int, default=1, help="stream replicas (3 on a cluster)")
    init.add_argument("--tls-cert", type=Path, help="the hub's TLS certificate (PEM)")
    init.add_argument("--tls-key", type=Path, help="the hub's TLS private key (PEM)")
    init.set_defaults(func=cmd_hub_init)

    collect = verbs.add_parser(
        "collect",
        help="store the hub's usage stream in PostgreSQL (run as many as needed)",
        description="A durable JetStream pull consumer shared by every collector process; each "
        "batch is one PostgreSQL transaction, acknowledged after commit. SIGTERM stops it "
        "after the batch in hand.",
    )
    add_nats_collect_arguments(collect)
    collect.set_defaults(func=cmd_hub_collect)


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
        billing=args.billing or (),
    )
    print(f"nats-server fragment: {files.config} (include it on every hub node)")
    print(f"stream definition: {files.stream}")
    print(
        f"{len(files.gateways)} gateway keys, {len(files.billing)} billing keys, "
        f"{len(files.created)} new:"
    )
    for path in files.created:
        print(f"  new key {path}")
    if tls is None:
        print("warning: no TLS: gateways' traffic to this hub would cross the internet in clear")
    return 0


def add_nats_collect_arguments(parser: argparse.ArgumentParser) -> None:
    """The options of a hub collector (also usable by `desanet collect --nats`)."""
    parser.add_argument(
        "--nats", action="append", metavar="URL", help="hub server, tls://hub-1:4222; repeatable"
    )
    parser.add_argument("--credentials", type=Path, help="this collector's NKEY seed (hub init)")
    parser.add_argument("--ca", type=Path, help="CA certificate that signed the hub's (PEM)")
    parser.add_argument("--name", default="collector", help="collector user name (hub init)")
    parser.add_argument(
        "--dsn", help="PostgreSQL DSN without password (the password: PGPASSFILE or ~/.pgpass)"
    )
    parser.add_argument("--dsn-file", type=Path, help="file holding the DSN, password included")
    parser.add_argument(
        "--stream-config", type=Path, help="stream.json from hub init: create the stream if missing"
    )
    parser.add_argument("--batch", type=int, default=500, help="messages per transaction")
    parser.add_argument(
        "--ack-wait", type=float, default=30.0, help="s before the hub redelivers an unacked batch"
    )
    parser.add_argument("--idle-exit", type=float, help="exit after this many s without messages")
    parser.add_argument(
        "--consumer-replicas",
        type=int,
        default=0,
        help="replicas of the shared consumer when this collector creates it (0: as the stream)",
    )
    parser.add_argument("--report", metavar="YYYY-MM", help="print usage per subscriber and exit")


def _dsn(args: argparse.Namespace) -> str:
    from desanet.meter.dsn import read_dsn

    return read_dsn(args.dsn, args.dsn_file)


def cmd_hub_collect(args: argparse.Namespace) -> int:
    """Run one collector process until SIGTERM (or --idle-exit), or print a monthly report."""
    # Imported here: only the hub needs the PostgreSQL driver.
    from desanet.meter.fleet import FleetConnection, collector_inbox, load_stream_config
    from desanet.meter.fleet_collect import Collector, CollectorConfig

    dsn = _dsn(args)
    if args.report:
        return asyncio.run(_report(dsn, args.report))
    if not args.nats or args.credentials is None:
        raise ConfigError("hub collect: give --nats URL and --credentials (or --report)")
    connection = FleetConnection(
        args.nats, args.credentials, args.name, collector_inbox(args.name), args.ca
    )
    config = CollectorConfig(
        batch=args.batch,
        ack_wait_s=args.ack_wait,
        idle_exit_s=args.idle_exit,
        consumer_replicas=args.consumer_replicas,
    )
    stream = load_stream_config(args.stream_config) if args.stream_config else None
    collector = Collector(connection, dsn, config, stream)

    async def main() -> None:
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, collector.stop)
        await collector.run()

    try:
        asyncio.run(main())
    finally:
        st = collector.stats
        print(
            f"stored {st.messages} messages ({st.rows} rows), rejected {st.rejected}",
            file=sys.stderr,
        )
    return 0


async def _report(dsn: str, period: str) -> int:
    from desanet.meter.fleet_store import HubStore

    store = await HubStore.connect(dsn)
    try:
        rows = await store.report(period)
    finally:
        await store.close()
    print(f"usage in {period} (UTC); totals since provisioning, at the end of {period}")
    for row in rows:
        print(
            f"{row.gw} {row.sub}: up {row.up} B ({format_bytes(row.up)}), "
            f"down {row.down} B ({format_bytes(row.down)}); "
            f"totals up {row.up_total} B, down {row.down_total} B"
        )
    return 0
