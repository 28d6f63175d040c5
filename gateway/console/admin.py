"""Admins' pages: the users (add, change role, remove) and the audit log."""

from __future__ import annotations

from typing import Any

from flask import Blueprint, flash, g, redirect, render_template, request, url_for
from flask_babel import gettext as _
from werkzeug.wrappers import Response as BaseResponse

from desanet.gateway.console import fmt
from desanet.gateway.console.auth import console, require
from desanet.gateway.console.forms import ActionForm, RoleForm, UserForm
from desanet.gateway.console.users import UserError

blueprint = Blueprint("admin", __name__, url_prefix="/admin")


@blueprint.route("/users", methods=["GET", "POST"])
@require("admin")
def users() -> Any:
    """The users, and a form to add one."""
    store = console().users
    form = UserForm()
    status = 200
    if form.validate_on_submit():
        name = (form.name.data or "").strip().lower()
        try:
            store.add(name, str(form.role.data), form.password.data or "")
        except UserError as err:
            form.name.errors = [*form.name.errors, _("Refused: %(reason)s", reason=str(err))]
            store.audit(g.user.name, "user_add", name, str(err), False)
            status = 422
        else:
            store.audit(g.user.name, "user_add", name, f"role={form.role.data}", True)
            flash(_("User %(name)s added.", name=name), "ok")
            return redirect(url_for("admin.users"))
    elif request.method == "POST":
        status = 422
    people = [(u, RoleForm(role=u.role, prefix=u.name)) for u in store.all()]
    return render_template("users.html", form=form, people=people, action_form=ActionForm()), status


@blueprint.route("/users/<name>/role", methods=["POST"])
@require("admin")
def role(name: str) -> BaseResponse:
    """Change a user's role (the last admin keeps theirs)."""
    store = console().users
    form = RoleForm(prefix=name)
    target = store.get(name)
    if form.validate_on_submit() and target is not None:
        if target.role == "admin" and form.role.data != "admin" and store.count_admins() <= 1:
            flash(_("The last admin cannot lose the admin role."), "danger")
        else:
            store.set_role(name, str(form.role.data))
            store.audit(g.user.name, "user_role", name, f"role={form.role.data}", True)
            flash(_("Role of %(name)s changed.", name=name), "ok")
    return redirect(url_for("admin.users"))


@blueprint.route("/users/<name>/remove", methods=["POST"])
@require("admin")
def remove(name: str) -> BaseResponse:
    """Remove a user (not oneself, not the last admin)."""
    store = console().users
    target = store.get(name)
    if ActionForm().validate_on_submit() and target is not None:
        if name == g.user.name:
            flash(_("You cannot remove yourself."), "danger")
        elif target.role == "admin" and store.count_admins() <= 1:
            flash(_("The last admin cannot be removed."), "danger")
        else:
            store.remove(name)
            store.audit(g.user.name, "user_remove", name, "", True)
            flash(_("User %(name)s removed.", name=name), "ok")
    return redirect(url_for("admin.users"))


@blueprint.route("/audit")
@require("admin")
def audit() -> str:
    """Who did what, newest first."""
    entries = [(fmt.when(e.t_ms), e) for e in console().users.audit_log()]
    return render_template("audit.html", entries=entries)
