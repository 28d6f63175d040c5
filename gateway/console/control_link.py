"""The console's one door to the control endpoint: every plan, suspend, resume and quota change.

The console sends the same requests as billing (`desanet control`), so every
action is journaled by the service and published as an event in the usage
stream. This module is the only caller of the control client: a change to
that client's interface is one edit here.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from desanet.gateway.control import request
from desanet.meter.keys import ClientSecurity, load_keypair


@dataclass(frozen=True)
class ControlLink:
    """The endpoint and CURVE keys the console sends control requests with."""

    endpoint: str
    security: ClientSecurity = field(default_factory=ClientSecurity)
    timeout_ms: int = 5000

    def send(self, op: str, sub_id: str, **args: Any) -> dict[str, Any]:
        """One request; returns the service's reply map (`ok`, and `error` when refused).

        Raises ControlError when the service does not answer.
        """
        return request(
            self.endpoint, {"op": op, "sub": sub_id, **args}, self.security, self.timeout_ms
        )


def client_security(server_public: Path | None, client_secret: Path | None) -> ClientSecurity:
    """Plaintext without a server key, else CURVE with the console's own key pair."""
    if server_public is None:
        return ClientSecurity()
    client = load_keypair(client_secret) if client_secret is not None else None
    return ClientSecurity(load_keypair(server_public).public, client)
