"""`desanet usage`, `desanet collect` and `desanet keygen`: the billing integrator's verbs."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from desanet.meter.client import UsageClient
from desanet.meter.collector import UsageStore, collect, month_bounds_ms
from desanet.meter.dsn import read_dsn
from desanet.meter.keys import ClientSecurity, generate_keypair, load_keypair
from desanet.meter.wire import UsageMessage
from desanet.units import format_bytes


def register(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Add the usage, collect and keygen verbs."""
    usage = subparsers.add_parser(
        "usage",
        help="print the usage stream (replayed from a seq and/or live)",
        description="Without --from-seq or --follow, print every subscriber's totals now.",
    )
    _client_args(usage)
    usage.add_argument("--from-seq", type=int, help="replay journaled messages from this seq")
    usage.add_argument("--follow", action="store_true", help="keep printing live messages")
    usage.add_argument("--json", action="store_true", help="one JSON object per line")
    usage.set_defaults(func=_usage)

    coll = subparsers.add_parser(
        "collect",
        help="store the usage stream in SQLite or PostgreSQL, or report a billing period",
    )
    _client_args(coll, required=False)
    coll.add_argument("--db", type=Path, default=Path("usage.sqlite"), help="SQLite file")
    coll.add_argument(
        "--dsn", help="PostgreSQL DSN instead of --db (no password here: PGPASSFILE holds it)"
    )
    coll.add_argument("--dsn-file", type=Path, help="a file holding the DSN, password included")
    coll.add_argument(
        "--idle-exit", type=float, help="exit after this many seconds without a message"
    )
    coll.add_argument("--report", metavar="YYYY-MM", help="print usage per subscriber and exit")
    coll.set_defaults(func=_collect)

    keygen = subparsers.add_parser("keygen", help="create a CURVE key pair (gateway or billing)")
    keygen.add_argument("name", help="file name: NAME.key (public) and NAME.key_secret")
    keygen.add_argument("--dir", type=Path, default=Path("."), help="where to write the files")
    keygen.set_defaults(func=_keygen)


def _client_args(parser: argparse.ArgumentParser, required: bool = True) -> None:
    parser.add_argument(
        "--connect", required=required, metavar="ENDPOINT", help="usage endpoint, tcp://host:7570"
    )
    parser.add_argument("--replay", metavar="ENDPOINT", help="replay endpoint (default: port + 1)")
    parser.add_argument("--server-key", type=Path, help="the gateway's public key file (CURVE)")
    parser.add_argument("--key", type=Path, help="this client's secret key file (CURVE)")
    parser.add_argument("--gateway", help="only this gateway id")
    parser.add_argument("--timeout", type=float, default=5.0, help="replay answer timeout, s")


def _client(args: argparse.Namespace) -> UsageClient:
    security = ClientSecurity(
        server_public=load_keypair(args.server_key).public if args.server_key else None,
        client=load_keypair(args.key) if args.key else None,
    )
    return UsageClient(
        args.connect,
        args.replay,
        security=security,
        gateway_id=args.gateway,
        timeout_ms=int(args.timeout * 1000),
    )


def _usage(args: argparse.Namespace) -> int:
    with _client(args) as client:
        if args.from_seq is None and not args.follow:
            snap = client.snapshot()
            for sub, (up, down) in sorted(snap.totals.items()):
                if args.json:
                    row = {"gw": snap.gw, "epoch": snap.epoch, "seq": snap.seq, "sub": sub}
                    print(json.dumps(row | {"up_total": up, "down_total": down}))
                else:
                    print(f"{snap.gw} {snap.epoch} seq {snap.seq} {sub}: up {up} B, down {down} B")
            return 0
        for msg in client.messages(args.from_seq, follow=args.follow):
            _print_message(msg, args.json)
    return 0


def _print_message(msg: UsageMessage, as_json: bool) -> None:
    if as_json:
        body = {
            "v": 1,
            "gw": msg.gw,
            "epoch": msg.epoch,
            "seq": msg.seq,
            "t0": msg.t0,
            "t1": msg.t1,
            "sub": msg.sub,
            "up": msg.up,
            "down": msg.down,
            "up_pkts": msg.up_pkts,
            "down_pkts": msg.down_pkts,
            "up_total": msg.up_total,
            "down_total": msg.down_total,
        }
        if msg.snapshot:
            body["snapshot"] = True
        if msg.events:
            body["ev"] = [e._asdict() for e in msg.events]
        print(json.dumps(body), flush=True)
        return
    kind = " snapshot" if msg.snapshot else ""
    print(
        f"{msg.gw} {msg.epoch} seq {msg.seq}{kind} [{msg.t0}, {msg.t1}) {len(msg)} subscribers",
        flush=True,
    )
    for event in msg.events:
        print(f"  event {event.sub}: {event.kind}: {event.detail}", flush=True)
    for rec in msg.records():
        print(
            f"  {rec.sub}: up {rec.up} B ({rec.up_pkts} pkts), down {rec.down} B "
            f"({rec.down_pkts} pkts); totals up {rec.up_total} B, down {rec.down_total} B"
        )


def _collect(args: argparse.Namespace) -> int:
    if args.dsn is not None or args.dsn_file is not None:
        store = UsageStore.postgres(read_dsn(args.dsn, args.dsn_file))
    else:
        store = UsageStore.sqlite(args.db)
    try:
        if args.report:
            start, end = month_bounds_ms(args.report)
            print(f"usage in {args.report} (UTC); totals since provisioning")
            for row in store.report(start, end):
                print(
                    f"{row.gw} {row.sub}: up {row.up} B ({format_bytes(row.up)}), "
                    f"down {row.down} B ({format_bytes(row.down)}); "
                    f"totals up {row.up_total} B, down {row.down_total} B"
                )
            return 0
        if not args.connect:
            print("desanet collect: give --connect ENDPOINT, or --report YYYY-MM", file=sys.stderr)
            return 2
        idle = int(args.idle_exit * 1000) if args.idle_exit is not None else None
        with _client(args) as client:
            stored = collect(client, store, args.gateway, idle_timeout_ms=idle)
        print(f"stored {stored} messages", file=sys.stderr)
        return 0
    finally:
        store.close()


def _keygen(args: argparse.Namespace) -> int:
    public, secret = generate_keypair(args.dir, args.name)
    print(f"public key: {public} (give this file to the other side)")
    print(f"secret key: {secret} (keep it here, mode 0600)")
    return 0
