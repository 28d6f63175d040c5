"""Control requests that arrive together, decided in order as one batch.

Each request is checked against the records as the requests before it in the
batch left them (two changes to one subscriber compose), and its enforcement
is staged into the batch's working plan by `stage`, which refuses a change
that does not fit the link. Nothing is stored here: the service stores every
accepted change in one transaction, applies the working plan with one shaper
call, and only then sends the replies, each telling what happened to it.
"""

from __future__ import annotations

import logging
from collections import ChainMap
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from desanet.errors import ValidationError
from desanet.gateway.control_record import SubscriberControl
from desanet.gateway.control_requests import Context, Decision, decide

log = logging.getLogger("desanet.gateway.service")

Stage = Callable[[str, SubscriberControl], None]


@dataclass
class Batch:
    """The decisions of a batch, in request order, and the records it changes."""

    decisions: list[Decision] = field(default_factory=list)
    changes: dict[str, SubscriberControl] = field(default_factory=dict)

    def replies(self, refusal: str | None, not_applied: set[str]) -> list[dict[str, Any]]:
        """One reply per request once the batch is stored and applied.

        `refusal`: why the kernel refused the batch's changes (recorded, enforced
        later), or None when they are applied.
        """
        replies = []
        for decision in self.decisions:
            reply = decision.reply
            if not reply.get("ok"):
                replies.append(reply)
            elif decision.changed and refusal is not None:
                replies.append(
                    {**reply, "applied": False, "error": f"recorded, not applied: {refusal}"}
                )
            else:
                replies.append({**reply, "applied": decision.sub_id not in not_applied})
        return replies

    def not_stored(self, error: Exception) -> list[dict[str, Any]]:
        """The replies when storing the changes failed: none of them happened."""
        refused = {"ok": False, "error": f"nothing changed: {error}"}
        return [
            refused if d.reply.get("ok") and d.sub_id in self.changes else d.reply
            for d in self.decisions
        ]


def decide_batch(
    requests: Sequence[object],
    records: dict[str, SubscriberControl],
    ctx: Context,
    stage: Stage,
) -> Batch:
    """Decide every request in order; `stage(sub, record)` stages an accepted change."""
    batch = Batch()
    view = ChainMap(batch.changes, records)
    for request in requests:
        try:
            decision = decide(request, view, ctx)
            if decision.changed:
                stage(decision.sub_id, decision.record)
                batch.changes[decision.sub_id] = decision.record
        except ValidationError as err:
            decision = Decision({"ok": False, "error": str(err)})
        except Exception as err:
            # One request's bug refuses that request; the rest of the batch goes on.
            log.error("control request refused by an error: %s: %s", type(err).__name__, err)
            decision = Decision({"ok": False, "error": f"nothing changed: {err}"})
        batch.decisions.append(decision)
    return batch
