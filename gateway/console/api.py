"""The live numbers pages poll: the link and the rows a page shows, formatted for the reader.

Small on purpose: a page asks only for the ids it displays, and the answer
comes from the status already parsed for the current snapshot.
"""

from __future__ import annotations

from typing import Any

from flask import Blueprint, jsonify, request
from werkzeug.wrappers import Response as BaseResponse

from desanet.gateway.console import fmt, views
from desanet.gateway.console.auth import console

blueprint = Blueprint("api", __name__, url_prefix="/api")
MAX_IDS = 200


@blueprint.route("/live")
def live() -> BaseResponse:
    """Link use and, for each id in `ids` (comma-separated), rates, usage and state."""
    c = console()
    reading = c.status.read()
    ids = [i for i in request.args.get("ids", "").split(",") if i][:MAX_IDS]
    link = views.link(reading)
    rows: dict[str, Any] = {}
    for sub_id in ids:
        found = reading.by_id.get(sub_id)
        if found is None:
            continue
        row = views.row(found, reading)
        down_bps, up_bps = reading.rate(found)
        rows[sub_id] = {
            "down": row.down,
            "up": row.up,
            "down_bps": down_bps,
            "up_bps": up_bps,
            "usage": row.usage,
            "usage_share": row.usage_share,
            "state": row.state,
            "state_label": row.state_label,
        }
    body: dict[str, Any] = {
        "ok": reading.snapshot is not None and not c.status.stale(reading),
        "updated": fmt.clock(reading.snapshot.t_ms) if reading.snapshot else "",
        "rows": rows,
    }
    if link is not None:
        body["link"] = {
            "down": link.down,
            "up": link.up,
            "down_share": link.down_share,
            "up_share": link.up_share,
            "down_percent": link.down_percent,
            "up_percent": link.up_percent,
        }
    return jsonify(body)
