"""The console's Flask application factory: configuration, extensions, blueprints, headers.

`create_app(console, settings)` takes its collaborators (the gateway's
interfaces, the users) instead of building them, so tests run it against
files in a temporary folder and a fake control endpoint.
"""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass
from pathlib import Path

from flask import Flask, Response, render_template, request, session
from flask_babel import Babel
from flask_babel import gettext as _
from flask_wtf.csrf import CSRFError, CSRFProtect
from werkzeug.exceptions import HTTPException

from desanet.gateway.console import actions, admin, api, auth, helpers, pages
from desanet.gateway.console.services import Console

LANGUAGES = ("id", "en")
TRANSLATIONS = Path(__file__).parent / "translations"
# Inline SVG charts are served as images, so no page needs inline script or style.
CSP = (
    "default-src 'self'; img-src 'self'; style-src 'self'; script-src 'self'; "
    "form-action 'self'; frame-ancestors 'none'; base-uri 'none'; object-src 'none'"
)


@dataclass(frozen=True)
class Settings:
    """How the console runs: its secret, cookies, time zone and refresh period."""

    secret_key: bytes
    secure_cookies: bool
    timezone: str
    live_interval_ms: int = 2000
    session_hours: int = 12
    login_limit: str = "5 per minute"
    login_limit_per_address: str = "20 per minute"


def create_app(console: Console, settings: Settings) -> Flask:
    """The console application."""
    app = Flask(__name__)
    app.config.update(
        SECRET_KEY=settings.secret_key,
        # __Host-: the browser only accepts it over HTTPS, for this host, for every path.
        SESSION_COOKIE_NAME="__Host-desanet" if settings.secure_cookies else "desanet",
        SESSION_COOKIE_SECURE=settings.secure_cookies,
        SESSION_COOKIE_HTTPONLY=True,
        SESSION_COOKIE_SAMESITE="Strict",
        PERMANENT_SESSION_LIFETIME=dt.timedelta(hours=settings.session_hours),
        # The token lives as long as the session: a form left open for an hour still works.
        WTF_CSRF_TIME_LIMIT=None,
        BABEL_DEFAULT_LOCALE="id",
        BABEL_DEFAULT_TIMEZONE=settings.timezone,
        BABEL_TRANSLATION_DIRECTORIES=str(TRANSLATIONS),
        MAX_CONTENT_LENGTH=64 * 1024,
        DESANET_LIVE_INTERVAL_MS=settings.live_interval_ms,
    )
    app.extensions["desanet_console"] = console
    CSRFProtect(app)
    Babel(app, locale_selector=_locale)
    auth.limiter.init_app(app)
    auth.configure_limits(settings.login_limit, settings.login_limit_per_address)
    for blueprint in (
        auth.blueprint,
        pages.blueprint,
        actions.blueprint,
        admin.blueprint,
        api.blueprint,
    ):
        app.register_blueprint(blueprint)
    # Who is asking is settled before anything else, CSRF included: without a session
    # nothing but the login page answers.
    app.before_request_funcs.setdefault(None, []).insert(0, auth.load_user)
    app.context_processor(helpers.context)
    app.after_request(_headers)
    app.register_error_handler(CSRFError, _csrf_error)
    app.register_error_handler(HTTPException, _http_error)
    return app


def _locale() -> str:
    chosen = session.get("lang")
    if chosen in LANGUAGES:
        return str(chosen)
    return request.accept_languages.best_match(LANGUAGES) or "id"


def _headers(response: Response) -> Response:
    response.headers.setdefault("Content-Security-Policy", CSP)
    response.headers["X-Content-Type-Options"] = "nosniff"
    response.headers["Referrer-Policy"] = "same-origin"
    response.headers["X-Frame-Options"] = "DENY"
    if request.endpoint != "static":
        response.headers["Cache-Control"] = "no-store"
    return response


def _csrf_error(err: CSRFError) -> tuple[str, int]:
    message = _("This form has expired or did not come from the console. Open it again.")
    return render_template("error.html", message=message), 400


def _http_error(err: HTTPException) -> Response | tuple[str, int]:
    if request.path.startswith("/api/"):
        return Response(
            f'{{"error": "{err.name}"}}', status=err.code or 500, mimetype="application/json"
        )
    messages = {
        403: _("Your role does not allow this. Ask an admin."),
        404: _("There is no such page or subscriber."),
        405: _("This address does not take that kind of request."),
        413: _("That request is too large."),
        429: _("Too many attempts. Wait a minute, then try again."),
    }
    message = messages.get(err.code or 500, _("Something went wrong. Try again."))
    return render_template("error.html", message=message), err.code or 500
