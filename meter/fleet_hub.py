"""`desanet hub init`: the hub's nats-server fragment, stream definition and per-gateway keys.

For a list of gateway ids it writes, into one directory:

    desanet-hub.conf        included by every hub node's nats-server.conf: the
                            account DESANET (JetStream on), one NKEY user per
                            gateway and per collector with its permissions, TLS
    stream.json             the DESANET_USAGE stream (JetStream API JSON), which
                            `desanet hub collect --stream-config` creates if missing
    gateways/<id>.nk        each gateway's NKEY seed (0600): copy it to that
                            gateway only; it is its `[fleet] credentials`
    collectors/<name>.nk    each collector's seed (0600)
    billing/<name>.nk       each billing user's seed (0600): the control role

A gateway may publish only `desanet.usage.<own id>` and subscribe only
`desanet.control.<own id>` and its own reply inbox (JetStream acks come
there); `allow_responses` lets it answer the control requests it received.
A billing user (`--billing NAME`) holds the control role over NATS: it may
publish `desanet.control.*` and read its own reply inbox, nothing else; the
collectors (readers) and the gateways may publish no control subject, so only
a user listed as billing can change a gateway from the hub.
Running it again with more gateways keeps every existing seed, so the hub's
configuration can be reloaded without touching gateways already deployed;
a gateway left out of the list loses its access at the next reload.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import nkeys

from desanet.durable import create_private, replace_atomically
from desanet.errors import ConfigError
from desanet.meter.fleet import (
    CONSUMER,
    CONTROL_PREFIX,
    STREAM,
    billing_inbox,
    check_collector_name,
    collector_inbox,
    control_subject,
    gateway_inbox,
    stream_config,
    usage_subject,
)
from desanet.validate import check_gateway_id

ACCOUNT = "DESANET"
CONFIG_NAME = "desanet-hub.conf"
STREAM_NAME = "stream.json"
SEED_SUFFIX = ".nk"
PUBLIC_FILE = 0o644


@dataclass(frozen=True)
class HubTLS:
    """The hub's certificate and key (PEM files on the hub nodes)."""

    cert_file: Path
    key_file: Path


@dataclass(frozen=True)
class HubFiles:
    """What `init_hub` wrote: the fragment, the stream, and every user's seed file."""

    config: Path
    stream: Path
    gateways: dict[str, Path] = field(default_factory=dict)
    collectors: dict[str, Path] = field(default_factory=dict)
    billing: dict[str, Path] = field(default_factory=dict)
    created: list[Path] = field(default_factory=list)


def gateway_permissions(gateway_id: str) -> dict[str, Any]:
    """What gateway `gateway_id` may do on the hub, in nats-server's permissions syntax."""
    return {
        "publish": {"allow": [usage_subject(gateway_id)]},
        "subscribe": {"allow": [control_subject(gateway_id), gateway_inbox(gateway_id) + ".>"]},
        "allow_responses": True,
    }


def collector_permissions(name: str) -> dict[str, Any]:
    """What a collector may do: read the stream through its one durable consumer, and ack."""
    api = "$JS.API"
    return {
        "publish": {
            "allow": [
                f"{api}.INFO",
                f"{api}.STREAM.INFO.{STREAM}",
                f"{api}.STREAM.CREATE.{STREAM}",
                f"{api}.CONSUMER.INFO.{STREAM}.{CONSUMER}",
                f"{api}.CONSUMER.CREATE.{STREAM}.{CONSUMER}",
                f"{api}.CONSUMER.CREATE.{STREAM}.{CONSUMER}.>",
                f"{api}.CONSUMER.DURABLE.CREATE.{STREAM}.{CONSUMER}",
                f"{api}.CONSUMER.MSG.NEXT.{STREAM}.{CONSUMER}",
                f"$JS.ACK.{STREAM}.{CONSUMER}.>",
            ]
        },
        "subscribe": {"allow": [collector_inbox(name) + ".>"]},
    }


def billing_permissions(name: str) -> dict[str, Any]:
    """The control role: request any gateway's control subject, read its own replies."""
    return {
        "publish": {"allow": [CONTROL_PREFIX + "*"]},
        "subscribe": {"allow": [billing_inbox(name) + ".>"]},
    }


def _seed(path: Path, created: list[Path]) -> str:
    """The public key of the seed in `path`, generating the seed if the file is new."""
    if path.exists():
        try:
            seed = path.read_bytes().strip()
            return str(nkeys.from_seed(bytearray(seed)).public_key.decode())
        except (OSError, nkeys.ErrInvalidSeed, nkeys.ErrInvalidPrefixByte) as err:
            raise ConfigError(
                f"{path} is not an NKEY seed ({err}); move it aside to make a new key"
            ) from None
    seed = nkeys.encode_seed(os.urandom(32), nkeys.PREFIX_BYTE_USER)
    path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    create_private(path, seed + b"\n")
    created.append(path)
    return str(nkeys.from_seed(bytearray(seed)).public_key.decode())


def init_hub(
    out_dir: Path,
    gateway_ids: Sequence[str],
    tls: HubTLS | None,
    collectors: Sequence[str] = ("collector",),
    replicas: int = 1,
    billing: Sequence[str] = (),
) -> HubFiles:
    """Write the hub's fragment, stream definition and seeds into `out_dir` (see module doc)."""
    ids = [check_gateway_id(g) for g in gateway_ids]
    names = [check_collector_name(c) for c in collectors]
    billers = [check_collector_name(b) for b in billing]
    checks = (("gateway id", ids), ("collector name", names), ("billing user", billers))
    for kind, values in checks:
        dupes = sorted({v for v in values if values.count(v) > 1})
        if dupes:
            raise ConfigError(f"{kind} listed twice: {', '.join(dupes)}")
    if not ids:
        raise ConfigError("hub init: give at least one gateway id")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    files = HubFiles(out_dir / CONFIG_NAME, out_dir / STREAM_NAME)
    users: list[dict[str, Any]] = []
    legend: list[str] = []
    for gw in ids:
        path = out_dir / "gateways" / f"{gw}{SEED_SUFFIX}"
        public = _seed(path, files.created)
        files.gateways[gw] = path
        users.append({"nkey": public, "permissions": gateway_permissions(gw)})
        legend.append(f"#   gateway {gw}: {public}")
    for name in names:
        path = out_dir / "collectors" / f"{name}{SEED_SUFFIX}"
        public = _seed(path, files.created)
        files.collectors[name] = path
        users.append({"nkey": public, "permissions": collector_permissions(name)})
        legend.append(f"#   collector {name}: {public}")
    for name in billers:
        path = out_dir / "billing" / f"{name}{SEED_SUFFIX}"
        public = _seed(path, files.created)
        files.billing[name] = path
        users.append({"nkey": public, "permissions": billing_permissions(name)})
        legend.append(f"#   billing {name}: {public}")
    # One user per line: a thousand gateways stay a thousand lines a person can grep.
    user_lines = ",\n".join(f"      {json.dumps(u)}" for u in users)
    text = [
        "# desanet hub: include this file in every hub node's nats-server.conf",
        "# (written by `desanet hub init`; run it again to add gateways, then reload).",
        *legend,
        "accounts: {",
        f"  {json.dumps(ACCOUNT)}: {{",
        '    "jetstream": "enabled",',
        f'    "users": [\n{user_lines}\n    ]',
        "  }",
        "}",
    ]
    if tls is not None:
        block = {
            "cert_file": str(Path(tls.cert_file).resolve()),
            "key_file": str(Path(tls.key_file).resolve()),
            "timeout": 5,
        }
        text.append(f"tls: {json.dumps(block, indent=2)}")
    replace_atomically(files.config, ("\n".join(text) + "\n").encode(), mode=PUBLIC_FILE)
    stream = json.dumps(stream_config(replicas), indent=2) + "\n"
    replace_atomically(files.stream, stream.encode(), mode=PUBLIC_FILE)
    return files
