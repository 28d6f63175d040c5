"""The fleet's contract on NATS JetStream: names, subjects, message ids, the stream, connecting.

Every part of the fleet (the gateway's forwarder, `desanet hub init`, the hub
collector) takes these from here, so the subjects billing codes against are
written once (DESIGN.md, "Fleet"):

- stream `DESANET_USAGE` holds subjects `desanet.usage.>`; gateway `gw`
  publishes the unchanged usage message bytes to `desanet.usage.<gw>` with
  header `Nats-Msg-Id` = `<gw>:<epoch>:<seq>`, which JetStream deduplicates
  within the stream's duplicate window;
- control requests reach gateway `gw` on `desanet.control.<gw>`;
- collectors share the durable pull consumer `desanet-collector`;
- a gateway's reply inbox is `_INBOX.gw.<gw>`, a collector's `_INBOX.hub.<name>`,
  a billing user's `_INBOX.billing.<name>`, so permissions can let each read its
  own acknowledgements and replies and nobody else's.
"""

from __future__ import annotations

import json
import ssl
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from nats.js.api import StreamConfig
from nats.js.client import JetStreamContext
from nats.js.errors import NotFoundError

from desanet.errors import ConfigError, StreamError, ValidationError
from desanet.validate import check_gateway_id

STREAM = "DESANET_USAGE"
USAGE_PREFIX = "desanet.usage."
USAGE_SUBJECTS = USAGE_PREFIX + ">"
CONTROL_PREFIX = "desanet.control."
CONSUMER = "desanet-collector"
MSG_ID_HEADER = "Nats-Msg-Id"
INBOX_ROOT = "_INBOX"

# JetStream takes durations in nanoseconds.
_NS = 1_000_000_000
DUPLICATE_WINDOW_S = 120
MAX_AGE_S = 31 * 86400


def usage_subject(gateway_id: str) -> str:
    """`desanet.usage.<gateway id>`: where that gateway's usage messages go."""
    return USAGE_PREFIX + check_gateway_id(gateway_id)


def control_subject(gateway_id: str) -> str:
    """`desanet.control.<gateway id>`: where control requests for that gateway go."""
    return CONTROL_PREFIX + check_gateway_id(gateway_id)


def gateway_inbox(gateway_id: str) -> str:
    """The reply-subject prefix of a gateway (JetStream acks and request replies come here)."""
    return f"{INBOX_ROOT}.gw.{check_gateway_id(gateway_id)}"


def billing_inbox(name: str) -> str:
    """The reply-subject prefix of billing user `name` (its control requests' replies)."""
    return f"{INBOX_ROOT}.billing.{check_collector_name(name)}"


def check_collector_name(name: str) -> str:
    """`name` if it can name a hub collector (the gateway id rule: it is a subject token)."""
    try:
        return check_gateway_id(name)
    except ValidationError:
        raise ValidationError(
            f"collector name {name!r}: lowercase letters, digits and '-' (at most 63)"
        ) from None


def collector_inbox(name: str) -> str:
    """The reply-subject prefix of a hub collector."""
    return f"{INBOX_ROOT}.hub.{check_collector_name(name)}"


def message_id(gateway_id: str, epoch: str, seq: int) -> str:
    """`<gateway id>:<epoch>:<seq>`, the `Nats-Msg-Id` of one usage message."""
    return f"{gateway_id}:{epoch}:{seq}"


def parse_message_id(text: str) -> tuple[str, str, int]:
    """(gateway id, epoch, seq) of a `Nats-Msg-Id`; raises StreamError if malformed."""
    gw, sep, rest = text.partition(":")
    epoch, sep2, seq = rest.rpartition(":")
    if not (sep and sep2 and gw and epoch and seq.isdigit()):
        raise StreamError(f"Nats-Msg-Id {text!r} is not <gateway id>:<epoch>:<seq>")
    return gw, epoch, int(seq)


def stream_config(
    replicas: int = 1, max_age_s: int = MAX_AGE_S, duplicate_window_s: int = DUPLICATE_WINDOW_S
) -> dict[str, Any]:
    """The JetStream configuration of DESANET_USAGE, as the JetStream API's JSON takes it.

    Limits retention (collectors ack, but messages stay for `max_age_s` so a new
    collector or a rebuilt database can read them again); file storage; the
    duplicate window is what makes a republish after a lost ack harmless.
    """
    if not 1 <= replicas <= 5:
        raise ConfigError(f"stream replicas {replicas}: JetStream takes 1 to 5 (3 for a cluster)")
    return {
        "name": STREAM,
        "subjects": [USAGE_SUBJECTS],
        "retention": "limits",
        "storage": "file",
        "discard": "old",
        "num_replicas": replicas,
        "max_age": max_age_s * _NS,
        "duplicate_window": duplicate_window_s * _NS,
    }


def load_stream_config(path: Path) -> dict[str, Any]:
    """The stream definition `desanet hub init` wrote (stream.json), checked against DESIGN."""
    try:
        config = json.loads(Path(path).read_text())
    except (OSError, ValueError) as err:
        raise ConfigError(f"stream definition {path}: {err}") from None
    if not isinstance(config, dict) or config.get("name") != STREAM:
        raise ConfigError(f"stream definition {path}: not the {STREAM} stream")
    if config.get("subjects") != [USAGE_SUBJECTS]:
        raise ConfigError(f"stream definition {path}: subjects must be [{USAGE_SUBJECTS!r}]")
    return config


async def ensure_stream(js: JetStreamContext, config: dict[str, Any] | None) -> None:
    """Check that DESANET_USAGE exists with the fleet's subjects; create it from `config` if not."""
    try:
        info = await js.stream_info(STREAM)
    except NotFoundError:
        if config is None:
            raise StreamError(
                f"the hub has no stream {STREAM}: start one collector with "
                "--stream-config stream.json (written by `desanet hub init`)"
            ) from None
        await js.add_stream(StreamConfig.from_response(dict(config)))
        return
    if info.config.subjects != [USAGE_SUBJECTS]:
        raise StreamError(
            f"stream {STREAM} on the hub takes {info.config.subjects}, not [{USAGE_SUBJECTS!r}]"
        )


@dataclass(frozen=True)
class FleetConnection:
    """How one process reaches the hub: servers, its own credentials, the CA that signed the hub."""

    servers: Sequence[str]
    credentials: Path
    name: str
    inbox: str
    ca_file: Path | None = None

    def connect_options(self) -> dict[str, Any]:
        """Keyword arguments for `nats.connect` (never gives up reconnecting)."""
        if not self.servers:
            raise ConfigError("fleet: give at least one hub server, e.g. tls://hub-1.example:4222")
        try:
            text = self.credentials.read_text()
        except OSError as err:
            raise ConfigError(
                f"fleet credentials {self.credentials}: {err.strerror}; "
                "`desanet hub init` writes one file per gateway"
            ) from None
        options: dict[str, Any] = {
            "servers": list(self.servers),
            "name": self.name,
            "inbox_prefix": self.inbox,
            "max_reconnect_attempts": -1,
            "reconnect_time_wait": 1,
            "connect_timeout": 5,
        }
        if "BEGIN NATS USER JWT" in text:
            options["user_credentials"] = str(self.credentials)
        elif text.strip().startswith("SU"):
            options["nkeys_seed"] = str(self.credentials)
        else:
            raise ConfigError(
                f"fleet credentials {self.credentials}: neither an NKEY seed (SU...) "
                "nor a NATS .creds file"
            )
        if self.ca_file is not None or any(s.startswith("tls://") for s in self.servers):
            try:
                options["tls"] = ssl.create_default_context(
                    cafile=str(self.ca_file) if self.ca_file else None
                )
            except (OSError, ssl.SSLError) as err:
                raise ConfigError(f"fleet CA file {self.ca_file}: {err}") from None
        return options
