"""Who may do what: reading usage and changing things are separate rights.

Readers (billing systems, collectors) are the keys in `[publish]
allowed_keys`: they may subscribe to the usage stream and ask the replay
endpoint. Controllers are the keys in `[control] allowed_keys`: they may
change plans, suspend and set quotas. A reader's key is never let into the
control endpoint unless the operator lists it there too. Without `[control]
allowed_keys` (and with CURVE) nobody may control the gateway.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

from desanet.gateway.config import Config
from desanet.meter.keys import ServerSecurity, load_allowed_keys, load_server_security

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Roles:
    """The security of the reading endpoints (usage, replay) and of the control endpoint."""

    read: ServerSecurity
    control: ServerSecurity


def load_roles(config: Config) -> Roles:
    """Load the gateway's key and both allowed-key lists; raises ConfigError naming a file."""
    pub = config.publish
    read = load_server_security(pub.secret_key, pub.allowed_keys, pub.plaintext)
    if read.plaintext:
        return Roles(read, read)
    keys = config.control.allowed_keys
    if keys is None:
        log.warning(
            "%s: no [control] allowed_keys: no client may change plans, suspend or set quotas "
            "([publish] allowed_keys may only read usage)",
            config.path,
        )
        return Roles(read, ServerSecurity(server=read.server))
    return Roles(read, ServerSecurity(server=read.server, allowed_clients=load_allowed_keys(keys)))
