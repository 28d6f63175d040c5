"""The pages every user may read: home, the subscribers table, one subscriber, its usage chart."""

from __future__ import annotations

from zoneinfo import ZoneInfo

from flask import Blueprint, Response, abort, g, redirect, render_template, request, session
from flask_babel import get_timezone
from flask_babel import gettext as _
from werkzeug.wrappers import Response as BaseResponse

from desanet.gateway.console import charts, fmt, views
from desanet.gateway.console.auth import console
from desanet.gateway.console.forms import ActionForm, LanguageForm, SuspendForm
from desanet.gateway.console.helpers import column_labels

blueprint = Blueprint("pages", __name__)


@blueprint.route("/")
def home() -> str:
    """The link now, the busiest subscribers, recent events and alerts."""
    c = console()
    reading = c.status.read()
    _, file_error = c.index.read()
    return render_template(
        "home.html",
        link=views.link(reading),
        busiest=views.busiest(reading),
        events=views.recent_events(reading),
        alerts=views.alerts(c.status, reading, file_error, c.history.state.error),
        updated=fmt.clock(reading.snapshot.t_ms) if reading.snapshot else "",
    )


@blueprint.route("/subscribers")
def subscribers() -> str:
    """The subscribers table: search, sort and pages, on the server."""
    c = console()
    reading = c.status.read()
    in_file, file_error = c.index.read()
    sort = request.args.get("sort", "id")
    table = views.table(
        reading,
        in_file,
        request.args.get("q", "")[:100],
        sort,
        request.args.get("dir") == "desc",
        request.args.get("page", 1, type=int) or 1,
    )
    return render_template(
        "subscribers.html",
        table=table,
        labels=column_labels(),
        file_error=file_error,
        can_act=g.user.can("operator"),
    )


@blueprint.route("/subscribers/<sub_id>")
def subscriber(sub_id: str) -> str:
    """One subscriber: plan, addresses, state, this month's usage, 30 days, events, actions."""
    c = console()
    in_file, _file_error = c.index.read()
    tz = ZoneInfo(str(get_timezone()))
    page = views.subscriber_page(
        c.status.read(),
        in_file.get(sub_id),
        sub_id,
        c.history.days(sub_id, views.today(tz)),
        c.history.events(sub_id),
    )
    if page is None:
        abort(404)
    return render_template(
        "subscriber.html",
        page=page,
        row=page.row,
        can_act=g.user.can("operator"),
        suspend_form=SuspendForm(),
        action_form=ActionForm(),
    )


@blueprint.route("/subscribers/<sub_id>/usage.svg")
def usage_chart(sub_id: str) -> Response:
    """The subscriber's last 30 days as stacked bars (an image the page links)."""
    c = console()
    tz = ZoneInfo(str(get_timezone()))
    days = c.history.days(sub_id, views.today(tz))
    scale, unit = charts.scale_for(days)
    labels = [fmt.day(d.day) for d in days]
    axis = _("%(unit)s per day", unit=unit)
    svg = charts.usage_svg(days, labels, _("download"), _("upload"), axis, scale)
    response = Response(svg, mimetype="image/svg+xml")
    # matplotlib styles its SVG inline; as an image it can never run a script.
    response.headers["Content-Security-Policy"] = "default-src 'none'; style-src 'unsafe-inline'"
    return response


@blueprint.route("/language", methods=["POST"])
def language() -> BaseResponse:
    """Switch the language, for this session and, for a logged-in user, for good."""
    form = LanguageForm()
    if form.validate_on_submit():
        session["lang"] = form.language.data
        if g.user is not None:
            console().users.set_language(g.user.name, str(form.language.data))
    target = form.next.data or "/"
    return redirect(target if target.startswith("/") and not target.startswith("//") else "/")
