"""Operators' actions: add, edit and remove subscribers (the file); plan, suspend, resume, quota
(the control endpoint). Every one is a POST with a CSRF token, refused below the operator role."""

from __future__ import annotations

from typing import Any

from flask import Blueprint, abort, flash, g, redirect, render_template, request, url_for
from flask_babel import gettext as _
from werkzeug.wrappers import Response as BaseResponse

from desanet.gateway.console.auth import console, require
from desanet.gateway.console.forms import (
    ActionForm,
    PlanForm,
    RemoveForm,
    SubscriberForm,
    SuspendForm,
)
from desanet.gateway.console.services import Outcome
from desanet.gateway.console.subscribers_file import Entry
from desanet.gateway.registry import COLUMNS

blueprint = Blueprint("actions", __name__, url_prefix="/subscribers")


def _entry(form: SubscriberForm) -> Entry:
    cells = {name: (getattr(form, name).data or "").strip() for name in COLUMNS}
    cells["prefixes"] = " ".join(cells["prefixes"].split())
    return Entry(**cells)


def _refusal(form: Any, outcome: Outcome) -> None:
    """Put a refusal on the field it is about (or on the form when it is about none)."""
    if outcome.changed_meanwhile:
        form.form_errors.append(
            _(
                "Someone changed the subscribers file meanwhile. "
                "Nothing was saved; check and try again."
            )
        )
        return
    field = getattr(form, outcome.column, None) if outcome.column else None
    message = _("Refused by the gateway's check: %(reason)s", reason=outcome.error)
    if field is not None:
        field.errors = [*field.errors, message]
    else:
        form.form_errors.append(message)


@blueprint.route("/new", methods=["GET", "POST"])
@require("operator")
def new() -> Any:
    """Add a subscriber to the subscribers file."""
    form = SubscriberForm()
    if request.method == "GET":
        form.version.data = console().file.version()
    elif form.validate_on_submit():
        outcome = console().add(g.user, _entry(form), form.version.data or "")
        if outcome.ok:
            flash(
                _(
                    "Subscriber %(id)s added; the gateway applies it within seconds.",
                    id=form.id.data,
                ),
                "ok",
            )
            return redirect(url_for("pages.subscriber", sub_id=form.id.data))
        _refusal(form, outcome)
    status = 422 if request.method == "POST" else 200
    return render_template("subscriber_form.html", form=form, title=_("Add a subscriber")), status


@blueprint.route("/<sub_id>/edit", methods=["GET", "POST"])
@require("operator")
def edit(sub_id: str) -> Any:
    """Change a subscriber's line of the subscribers file."""
    entry = console().file.entry(sub_id)
    if entry is None:
        abort(404)
    form = SubscriberForm(data=entry.__dict__ if request.method == "GET" else None)
    if request.method == "GET":
        form.version.data = console().file.version()
    elif form.validate_on_submit():
        outcome = console().update(g.user, sub_id, _entry(form), form.version.data or "")
        if outcome.ok:
            flash(
                _(
                    "Subscriber %(id)s saved; the gateway applies it within seconds.",
                    id=form.id.data,
                ),
                "ok",
            )
            return redirect(url_for("pages.subscriber", sub_id=form.id.data))
        _refusal(form, outcome)
    status = 422 if request.method == "POST" else 200
    title = _("Edit subscriber %(id)s", id=sub_id)
    return render_template("subscriber_form.html", form=form, title=title), status


@blueprint.route("/<sub_id>/remove", methods=["GET", "POST"])
@require("operator")
def remove(sub_id: str) -> Any:
    """Ask, then remove a subscriber from the subscribers file."""
    if console().file.entry(sub_id) is None:
        abort(404)
    form = RemoveForm()
    if request.method == "GET":
        form.version.data = console().file.version()
    elif form.validate_on_submit():
        outcome = console().remove(g.user, sub_id, form.version.data or "")
        if outcome.ok:
            flash(_("Subscriber %(id)s removed.", id=sub_id), "ok")
            return redirect(url_for("pages.subscribers"))
        _refusal(form, outcome)
    return render_template("remove.html", form=form, sub_id=sub_id)


@blueprint.route("/<sub_id>/plan", methods=["GET", "POST"])
@require("operator")
def plan(sub_id: str) -> Any:
    """Set a plan through the control endpoint (it holds until reset to the file's)."""
    declared = console().file.entry(sub_id)
    if declared is None:
        abort(404)
    form = PlanForm(data=declared.__dict__ if request.method == "GET" else None)
    if form.validate_on_submit():
        rates = {
            name: (getattr(form, name).data or "").strip() for name in SubscriberForm.RATE_FIELDS
        }
        outcome = console().act(g.user, "plan", sub_id, rates)
        if outcome.ok:
            flash(_("Plan of %(id)s changed.", id=sub_id), "ok")
            return redirect(url_for("pages.subscriber", sub_id=sub_id))
        form.form_errors.append(_("The gateway refused: %(reason)s", reason=outcome.error))
    status = 422 if request.method == "POST" else 200
    return render_template("plan.html", form=form, sub_id=sub_id), status


def _token_checked() -> None:
    # The button's form carries only the CSRF token; CSRFProtect has checked it already,
    # this refuses a POST that somehow lacks the form.
    if not ActionForm().validate_on_submit():
        abort(400)


def _control(sub_id: str, op: str, args: dict[str, Any], done: str) -> BaseResponse:
    outcome = console().act(g.user, op, sub_id, args)
    if outcome.ok:
        flash(done, "ok")
    else:
        flash(_("The gateway refused: %(reason)s", reason=outcome.error), "danger")
    return redirect(url_for("pages.subscriber", sub_id=sub_id))


@blueprint.route("/<sub_id>/suspend", methods=["POST"])
@require("operator")
def suspend(sub_id: str) -> BaseResponse:
    """Suspend a subscriber, walled or blocked."""
    form = SuspendForm()
    if not form.validate_on_submit():
        abort(400)
    return _control(sub_id, "suspend", {"mode": form.mode.data}, _("%(id)s suspended.", id=sub_id))


@blueprint.route("/<sub_id>/resume", methods=["POST"])
@require("operator")
def resume(sub_id: str) -> BaseResponse:
    """Lift a suspension."""
    _token_checked()
    return _control(sub_id, "resume", {}, _("%(id)s resumed.", id=sub_id))


@blueprint.route("/<sub_id>/quota-reset", methods=["POST"])
@require("operator")
def quota_reset(sub_id: str) -> BaseResponse:
    """Start the subscriber's quota period again from now (lifts a fair-use throttle)."""
    _token_checked()
    return _control(sub_id, "quota_reset", {}, _("Quota of %(id)s reset.", id=sub_id))


@blueprint.route("/<sub_id>/plan-reset", methods=["POST"])
@require("operator")
def plan_reset(sub_id: str) -> BaseResponse:
    """Go back to the plan the subscribers file gives."""
    _token_checked()
    return _control(sub_id, "plan_reset", {}, _("Plan of %(id)s back to the file's.", id=sub_id))
