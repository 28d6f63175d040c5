"""Logging in and out, who is asking (every request), and what their role lets them do.

The session is Flask's signed cookie; it names the user and the user's
epoch, which a password or role change bumps, so old sessions end at once.
Failed logins are limited per user name and per address (Flask-Limiter).
"""

from __future__ import annotations

from collections.abc import Callable
from functools import wraps
from typing import Any, TypeVar
from urllib.parse import urlsplit

from flask import (
    Blueprint,
    Response,
    abort,
    current_app,
    flash,
    g,
    jsonify,
    redirect,
    render_template,
    request,
    session,
    url_for,
)
from flask_babel import gettext as _
from flask_limiter import Limiter
from flask_limiter.util import get_remote_address
from werkzeug.wrappers import Response as BaseResponse

from desanet.gateway.console.forms import LoginForm
from desanet.gateway.console.services import Console
from desanet.gateway.console.users import User

blueprint = Blueprint("auth", __name__)
limiter = Limiter(key_func=get_remote_address, storage_uri="memory://")
# Reachable without a session: the login page, its language switch and style sheet.
PUBLIC_ENDPOINTS = {"auth.login", "pages.language", "static"}
F = TypeVar("F", bound=Callable[..., Any])
_limits = {"name": "5 per minute", "address": "20 per minute"}


def configure_limits(per_name: str, per_address: str) -> None:
    """Set how many failed logins a user name and an address may have per period."""
    _limits["name"], _limits["address"] = per_name, per_address


def console() -> Console:
    """The console's collaborators, for the current application."""
    found: Console = current_app.extensions["desanet_console"]
    return found


def load_user() -> BaseResponse | None:
    """Before every request: find the session's user, or send the browser to log in."""
    g.user = None
    name = session.get("user")
    if isinstance(name, str):
        user = console().users.get(name)
        if user is not None and user.epoch == session.get("epoch"):
            g.user = user
        else:
            session.clear()
    if g.user is None and request.endpoint not in PUBLIC_ENDPOINTS:
        if request.path.startswith("/api/"):
            response = jsonify(error="log in first")
            response.status_code = 401
            return response
        if request.method != "GET":
            abort(401)
        return redirect(url_for("auth.login", next=request.full_path.rstrip("?")))
    return None


def require(role: str) -> Callable[[F], F]:
    """Refuse (403) a user whose role is below `role`: the server decides, not the page."""

    def decorate(view: F) -> F:
        @wraps(view)
        def wrapped(*args: Any, **kwargs: Any) -> Any:
            user: User | None = g.get("user")
            if user is None or not user.can(role):
                abort(403)
            return view(*args, **kwargs)

        return wrapped  # type: ignore[return-value]

    return decorate


def _failed(response: Response) -> bool:
    # Only refused attempts count against the limit: a successful login redirects.
    return response.status_code != 302


def _name_key() -> str:
    return "login-name:" + request.form.get("name", "").strip().lower()


def _safe_next(target: str | None) -> str:
    # Only a path on this console: never a redirect to another site.
    if target and target.startswith("/") and not target.startswith("//"):
        parts = urlsplit(target)
        if not parts.scheme and not parts.netloc:
            return target
    return url_for("pages.home")


@blueprint.route("/login", methods=["GET", "POST"])
@limiter.limit(lambda: _limits["name"], key_func=_name_key, methods=["POST"], deduct_when=_failed)
@limiter.limit(lambda: _limits["address"], methods=["POST"], deduct_when=_failed)
def login() -> Any:
    """The login form; a wrong name or password is refused with the same message."""
    form = LoginForm()
    if form.validate_on_submit():
        name = (form.name.data or "").strip().lower()
        user = console().users.verify(name, form.password.data or "")
        console().users.audit(name, "login", name, request.remote_addr or "", user is not None)
        if user is not None:
            language = session.get("lang")
            session.clear()
            session.permanent = True
            session["user"], session["epoch"] = user.name, user.epoch
            if user.language or language:
                session["lang"] = user.language or language
            return redirect(_safe_next(request.args.get("next")))
        flash(_("Wrong user name or password."), "danger")
        return render_template("login.html", form=form, user=None), 401
    status = 400 if request.method == "POST" else 200
    return render_template("login.html", form=form, user=None), status


@blueprint.route("/logout", methods=["POST"])
def logout() -> BaseResponse:
    """End the session (a POST with the CSRF token, so no other site can log anyone out)."""
    language = session.get("lang")
    session.clear()
    if language:
        session["lang"] = language
    return redirect(url_for("auth.login"))
