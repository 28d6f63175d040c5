"""The service's RADIUS part: accounting from the journal, and RFC 5176 requests into control.

Built by compose from `[radius]` (none without it). To the service it is one
more consumer of the journal (an OutboundPort: `start` sends Accounting-On,
`stop` Accounting-Off), plus three hooks the loop calls in its own thread:

- `set_subscribers`: who RADIUS names and how (User-Name: the `radius_user`
  column or the id, Framed-IP-Address, Calling-Station-Id), also to find the
  subscriber a Disconnect/CoA names; a subscriber whose User-Name changed
  gets its Accounting-Stop under the old name;
- `end_session`: a subscriber removed from the file or suspended with block
  gets its Accounting-Stop, in the journal's order;
- `serve_pending(handle)`: answers the waiting Disconnect/CoA requests with
  the same handler the control endpoint uses, so a change from RADIUS is one
  more journaled control batch and an event in the usage stream.

Every secret is read here, from files only the service may read, before
anything binds.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from desanet.errors import DesanetError
from desanet.gateway.config import Config, RadiusConfig
from desanet.gateway.radius_coa import CoaClient, CoaConfig, DynamicAuthServer, Handle, resolver
from desanet.gateway.registry import Subscriber
from desanet.meter.journal import Journal
from desanet.meter.radius import AccountingConfig, RadiusAccounting, subscriber_attributes
from desanet.meter.radius_dictionary import load_dictionary
from desanet.meter.radius_sessions import SubscriberAttributes
from desanet.meter.radius_transport import RadiusServer, read_secret


def _refuse(_request: dict[str, Any]) -> dict[str, Any]:
    return {"ok": False, "error": "the gateway is not serving control requests yet"}


class RadiusPart:
    """The accounting forwarder and, with `coa_listen`, the dynamic authorization server."""

    def __init__(self, config: Config, radius: RadiusConfig, journal: Journal) -> None:
        secret = read_secret(radius.secret_file, "[radius] secret_file")
        servers = tuple(RadiusServer(host, port, secret) for host, port in radius.servers)
        coa = None
        if radius.coa_listen is not None:
            clients = tuple(
                CoaClient(c.address, read_secret(c.secret_file, f"[radius] coa client {c.address}"))
                for c in radius.coa_clients
            )
            host, port = radius.coa_listen
            coa = CoaConfig(clients, host, port, config.gateway_id, radius.disconnect)
        self._attributes: dict[str, SubscriberAttributes] = {}
        self._handle: Handle = _refuse
        self.accounting = RadiusAccounting(
            config.gateway_id,
            journal,
            config.state_dir,
            AccountingConfig(servers, nas_ip=radius.nas_ip, interim_s=radius.interim_ms // 1000),
            # The accounting thread reads the map the service replaces whole (never edits).
            lambda sub: self._attributes.get(sub),
        )
        try:
            self.coa = (
                DynamicAuthServer(
                    coa, lambda body: self._handle(body), resolver({}, {}), load_dictionary()
                )
                if coa is not None
                else None
            )
        except BaseException:
            self.accounting.close()
            raise

    # -- the journal consumer (OutboundPort) -----------------------------------------------

    def start(self) -> None:
        """Start accounting: Accounting-On, then the journal from the cursor."""
        self.accounting.start()

    def notify(self) -> None:
        """The journal grew."""
        self.accounting.wake()

    def stop(self) -> None:
        """Stop listening for CoA; Stop every session and Accounting-Off (briefly waited for)."""
        if self.coa is not None:
            self.coa.close()
        self.accounting.close()
        if self.accounting.error is not None:
            raise self.accounting.error

    def progress(self) -> dict[str, Any]:
        """For the status file: the last seq RADIUS acknowledged everything of."""
        endpoints = self.accounting.sender.endpoints
        error = self.accounting.error
        return {
            "name": "radius",
            "acked_seq": self.accounting.cursor,
            "connected": any(e.failed_at is None for e in endpoints),
            "error": str(error) if isinstance(error, DesanetError) else "",
        }

    # -- the service loop's hooks -----------------------------------------------------------

    def set_subscribers(self, subscribers: Sequence[Subscriber]) -> None:
        """The subscribers running now: their RADIUS names, addresses and MACs."""
        attributes = {
            s.id: subscriber_attributes(
                s.id, s.prefixes, s.macs[0] if s.macs else None, s.user_name
            )
            for s in subscribers
        }
        renamed = [
            sub
            for sub, a in attributes.items()
            if sub in self._attributes and self._attributes[sub].user_name != a.user_name
        ]
        # A removed subscriber's Stop is sent after this: it keeps naming it as before.
        self._attributes = {**self._attributes, **attributes}
        for sub in renamed:
            # Its session keeps the old User-Name to its Stop; the next one has the new name.
            self.accounting.end_session(sub, "renamed")
        if self.coa is not None:
            self.coa.resolve = resolver(
                {a.user_name: sub for sub, a in attributes.items()},
                {a.framed_ip: sub for sub, a in attributes.items() if a.framed_ip},
                self.accounting.session_owner,
            )

    def end_session(self, sub: str, why: str) -> None:
        """End `sub`'s session now: `why` is "removed" or "suspended" (with block)."""
        self.accounting.end_session(sub, why)

    def serve_pending(self, handle: Handle) -> int:
        """Answer every waiting Disconnect/CoA request through `handle`; returns the answers."""
        if self.coa is None:
            return 0
        self._handle = handle
        return self.coa.serve_pending()
