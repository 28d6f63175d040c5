"""`desanet console` (serve the web console) and `desanet console user ...` (its users)."""

from __future__ import annotations

import argparse
import getpass
import sys
from pathlib import Path
from typing import Any

from desanet.errors import ConfigError, DesanetError
from desanet.validate import parse_host_port

DEFAULT_CONFIG = "/etc/desanet/gateway.toml"
DEFAULT_STATE = "/var/lib/desanet-console"
DEFAULT_LISTEN = "127.0.0.1:8443"
ROLES = ("viewer", "operator", "admin")


def register(subparsers: Any) -> None:
    """Add the console verbs to the `desanet` parser."""
    console = subparsers.add_parser(
        "console", help="the operator's web console (HTTPS; users with roles)"
    )
    console.add_argument("--config", default=DEFAULT_CONFIG, help="the gateway's TOML file")
    console.add_argument("--state", type=Path, default=Path(DEFAULT_STATE), help="console state")
    console.add_argument(
        "--listen", default=DEFAULT_LISTEN, help=f"host:port to serve on (default {DEFAULT_LISTEN})"
    )
    console.add_argument(
        "--plain-http", action="store_true", help="serve HTTP, not HTTPS (loopback only)"
    )
    console.add_argument("--cert", type=Path, help="certificate (PEM); default: self-signed")
    console.add_argument("--key", type=Path, help="the certificate's private key (PEM)")
    console.add_argument(
        "--client-key", type=Path, help="the console's CURVE secret key, when the gateway uses keys"
    )
    console.add_argument("--timezone", help="time zone of dates shown (default: the machine's)")
    console.set_defaults(func=cmd_serve)
    verbs = console.add_subparsers(dest="console_command", metavar="COMMAND")
    user = verbs.add_parser("user", help="add, change or remove console users")
    actions = user.add_subparsers(dest="user_command", metavar="ACTION")
    actions.required = True
    state = {"type": Path, "default": argparse.SUPPRESS, "help": "console state directory"}
    add = actions.add_parser("add", help="add a user (password from the terminal or stdin)")
    add.add_argument("name")
    add.add_argument("--role", choices=ROLES, default="viewer")
    add.add_argument("--state", **state)
    add.set_defaults(func=cmd_user_add)
    passwd = actions.add_parser("passwd", help="set a user's password (ends their sessions)")
    passwd.add_argument("name")
    passwd.add_argument("--state", **state)
    passwd.set_defaults(func=cmd_user_passwd)
    role = actions.add_parser("role", help="change a user's role (ends their sessions)")
    role.add_argument("name")
    role.add_argument("role", choices=ROLES)
    role.add_argument("--state", **state)
    role.set_defaults(func=cmd_user_role)
    remove = actions.add_parser("remove", help="remove a user")
    remove.add_argument("name")
    remove.add_argument("--state", **state)
    remove.set_defaults(func=cmd_user_remove)
    listing = actions.add_parser("list", help="list users and roles")
    listing.add_argument("--state", **state)
    listing.set_defaults(func=cmd_user_list)


def read_password(prompt: str = "Password: ") -> str:
    """A password from the terminal (asked twice) or one line of stdin; never from argv."""
    if sys.stdin.isatty():
        first = getpass.getpass(prompt)
        if getpass.getpass("Again: ") != first:
            raise DesanetError("the two passwords differ; nothing changed")
        return first
    line = sys.stdin.readline()
    return line.removesuffix("\n").removesuffix("\r")


def _users(args: argparse.Namespace) -> Any:
    from desanet.gateway.console.store import Database
    from desanet.gateway.console.users import UserStore

    return UserStore(Database(args.state))


def cmd_user_add(args: argparse.Namespace) -> int:
    """Add a user with the role given."""
    _users(args).add(args.name, args.role, read_password())
    print(f"user {args.name} added ({args.role})")
    return 0


def cmd_user_passwd(args: argparse.Namespace) -> int:
    """Set a user's password."""
    _users(args).set_password(args.name, read_password())
    print(f"password of {args.name} changed")
    return 0


def cmd_user_role(args: argparse.Namespace) -> int:
    """Change a user's role."""
    _users(args).set_role(args.name, args.role)
    print(f"{args.name} is now {args.role}")
    return 0


def cmd_user_remove(args: argparse.Namespace) -> int:
    """Remove a user."""
    _users(args).remove(args.name)
    print(f"user {args.name} removed")
    return 0


def cmd_user_list(args: argparse.Namespace) -> int:
    """Print every user and role."""
    for user in _users(args).all():
        print(f"{user.name}\t{user.role}")
    return 0


def cmd_serve(args: argparse.Namespace) -> int:
    """Check everything, then serve until SIGTERM."""
    from desanet.gateway.console.server import ConsoleServer
    from desanet.gateway.console.tls import ensure_self_signed
    from desanet.gateway.console.wiring import Options, build_console, system_timezone

    listen = parse_host_port(args.listen)
    if args.plain_http and not listen.is_loopback:
        raise ConfigError(
            f"--listen {args.listen}: plain HTTP is only allowed on loopback "
            "(passwords and sessions would cross the network in clear); drop --plain-http"
        )
    if (args.cert is None) != (args.key is None):
        raise ConfigError("give both --cert and --key, or neither (a self-signed one is made)")
    options = Options(
        config=Path(args.config),
        state_dir=args.state,
        timezone=args.timezone or system_timezone(),
        secure_cookies=not args.plain_http,
        client_key=args.client_key,
    )
    # Every check runs here, before the server forks its worker: a bad file is reported
    # as one line, not as a worker that fails to boot.
    console, _config = build_console(options)
    if not console.users.all():
        print(
            "desanet console: no users yet: add one with "
            f"`desanet console user add NAME --role admin --state {args.state}`",
            file=sys.stderr,
        )
    cert, key = (None, None)
    if not args.plain_http:
        cert, key = (
            (args.cert, args.key) if args.cert else ensure_self_signed(args.state, listen.host)
        )
    bind = (
        f"[{listen.host}]:{listen.port}" if ":" in listen.host else f"{listen.host}:{listen.port}"
    )
    scheme = "http" if args.plain_http else "https"
    print(f"desanet console on {scheme}://{bind}/", file=sys.stderr, flush=True)
    ConsoleServer(options, bind, cert, key).run()
    return 0
