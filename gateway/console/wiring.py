"""Builds the console from the gateway's configuration file and the console's own options.

The gateway's TOML says where its status, subscribers file, control endpoint
and usage stream are; the console reads it and nothing else of the service.
"""

from __future__ import annotations

import os
import secrets
from dataclasses import dataclass
from pathlib import Path
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from flask import Flask

from desanet.durable import create_private
from desanet.errors import ConfigError
from desanet.gateway.config import Config, load_config
from desanet.gateway.console.app import Settings, create_app
from desanet.gateway.console.control_link import ControlLink, client_security
from desanet.gateway.console.history import UsageHistory
from desanet.gateway.console.services import Console
from desanet.gateway.console.status_source import StatusSource
from desanet.gateway.console.store import Database
from desanet.gateway.console.subscribers_file import SubscribersFile
from desanet.gateway.console.users import UserStore

SECRET_FILE = "session-secret"


@dataclass(frozen=True)
class Options:
    """The console's own options (command line or systemd unit)."""

    config: Path
    state_dir: Path
    timezone: str
    secure_cookies: bool
    client_key: Path | None = None


def system_timezone() -> str:
    """The machine's time zone name (TZ, else /etc/localtime), UTC when neither says."""
    name = os.environ.get("TZ", "")
    if not name:
        try:
            name = str(Path("/etc/localtime").resolve()).split("/zoneinfo/", 1)[1]
        except (OSError, IndexError):
            name = "UTC"
    return name


def check_timezone(name: str) -> ZoneInfo:
    """The zone called `name`; raises ConfigError for an unknown one."""
    try:
        return ZoneInfo(name)
    except (ZoneInfoNotFoundError, ValueError) as err:
        raise ConfigError(f"time zone {name!r} is unknown (use e.g. Asia/Jakarta)") from err


def session_secret(state_dir: Path) -> bytes:
    """The key that signs session cookies: made once, 0600, kept across restarts."""
    path = state_dir / SECRET_FILE
    if not path.exists():
        state_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
        create_private(path, secrets.token_hex(32).encode())
    return path.read_bytes().strip()


def _server_public_key(config: Config) -> Path | None:
    if config.publish.plaintext or config.publish.secret_key is None:
        return None
    secret = config.publish.secret_key
    # `desanet keygen` writes <name>.key (public) beside <name>.key_secret.
    public = secret.with_name(secret.name.removesuffix("_secret"))
    return public if public.exists() else secret


def build_console(options: Options) -> tuple[Console, Config]:
    """The console's collaborators for the gateway `options.config` describes."""
    config = load_config(options.config)
    tz = check_timezone(options.timezone)
    db = Database(options.state_dir)
    security = client_security(_server_public_key(config), options.client_key)
    if not security.plaintext and options.client_key is None:
        raise ConfigError(
            f"{config.path}: the gateway uses CURVE keys: give the console its own key "
            "(--client-key, made with `desanet keygen`, its public key in allowed_keys)"
        )
    console = Console(
        status=StatusSource(config.state_dir, config.interval_ms),
        control=ControlLink(config.control.endpoint, security),
        file=SubscribersFile(config.subscribers_file, config.link, config.capacity),
        history=UsageHistory(db, config.publish.usage, config.publish.replay, security, tz),
        users=UserStore(db),
    )
    return console, config


def build_app(options: Options) -> Flask:
    """The console application for `options`, its history follower started."""
    console, config = build_console(options)
    settings = Settings(
        secret_key=session_secret(options.state_dir),
        secure_cookies=options.secure_cookies,
        timezone=options.timezone,
        live_interval_ms=max(1000, config.interval_ms),
    )
    app = create_app(console, settings)
    console.history.start()
    return app
