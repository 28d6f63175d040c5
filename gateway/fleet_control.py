"""The control port with `[fleet]`: the ZeroMQ endpoint and the requests arriving over the hub.

Requests from the hub (meter.fleet_control's inbox) are served by the same
handler, batch boundary and reply maps as the ZeroMQ endpoint's, from the
service loop's thread: a NATS request is journaled, enforced and told in the
usage stream exactly as a ZeroMQ one. `wait()` ends when either has a request.
"""

from __future__ import annotations

import time

from desanet.gateway.control import (
    MAX_BATCH,
    BatchHandler,
    ControlEndpoint,
    answer_batch,
    pack_reply,
    unpack_request,
)
from desanet.meter.fleet_control import ControlInbox


class FleetControl:
    """A ControlPort serving the local ZeroMQ endpoint first, then the hub's requests."""

    def __init__(self, local: ControlEndpoint, inbox: ControlInbox) -> None:
        self.local = local
        self.inbox = inbox
        self.endpoint = local.endpoint
        local.watch(inbox.wake_fd)
        self._request_cost_s = 0.001  # seconds per request, measured batch by batch

    def wait(self, timeout_ms: int) -> bool:
        """Wait up to `timeout_ms` for a request on either; True when one is waiting."""
        return self.inbox.pending() > 0 or self.local.wait(timeout_ms)

    def serve_pending(self, handler: BatchHandler, budget_s: float | None = None) -> int:
        """Serve one local batch, then one batch from the hub within what is left of `budget_s`."""
        started = time.monotonic()
        served = self.local.serve_pending(handler, budget_s)
        limit = MAX_BATCH
        if budget_s is not None:
            left = budget_s - (time.monotonic() - started)
            if left <= 0:
                return served
            limit = max(1, min(MAX_BATCH, int(left / self._request_cost_s)))
        begun = time.monotonic()
        requests = self.inbox.take(limit)
        if not requests:
            return served
        bodies: list[object] = [unpack_request(r.data) for r in requests]
        for request, reply in zip(requests, answer_batch(handler, bodies), strict=True):
            self.inbox.reply(request, pack_reply(reply))
        cost = (time.monotonic() - begun) / len(requests)
        self._request_cost_s = (self._request_cost_s + cost) / 2
        return served + len(requests)

    def close(self) -> None:
        """Close the local endpoint and the inbox's descriptor."""
        self.local.close()
        self.inbox.close()
