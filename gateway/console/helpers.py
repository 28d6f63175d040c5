"""Functions templates call, so that the templates themselves hold no logic."""

from __future__ import annotations

from typing import Any

from flask import g, request, session, url_for
from flask_babel import get_locale
from flask_babel import lazy_gettext as _l

from desanet.gateway.console import fmt
from desanet.gateway.console.forms import LanguageForm
from desanet.gateway.console.views import Table

ROLE_LABELS = {"viewer": _l("viewer"), "operator": _l("operator"), "admin": _l("admin")}
SORT_COLUMNS = (
    ("id", _l("Id")),
    ("name", _l("Name")),
    ("plan", _l("Plan")),
    ("down", _l("Download now")),
    ("up", _l("Upload now")),
    ("usage", _l("This month")),
    ("state", _l("State")),
)


def _table_link(table: Table, **changes: Any) -> str:
    args: dict[str, Any] = {"sort": table.sort, "dir": "desc" if table.descending else "asc"}
    if table.query:
        args["q"] = table.query
    args.update(changes)
    return url_for("pages.subscribers", **args)


def sort_link(table: Table, key: str) -> str:
    """The table sorted by `key`; the same key again flips the order."""
    flip = key == table.sort and not table.descending
    return _table_link(table, sort=key, dir="desc" if flip else "asc")


def sort_state(table: Table, key: str) -> str:
    """The aria-sort value of a column header."""
    if key != table.sort:
        return "none"
    return "descending" if table.descending else "ascending"


def page_link(table: Table, page: int) -> str:
    """Another page of the same search and order."""
    return _table_link(table, page=page)


def column_labels() -> dict[str, str]:
    """The subscribers table's column names, translated once for every row."""
    return {key: str(label) for key, label in SORT_COLUMNS}


def context() -> dict[str, Any]:
    """What every template may call."""
    language = str(get_locale() or "id")
    return {
        "user": g.get("user"),
        "current_lang": language,
        "language_form": LanguageForm(
            language=session.get("lang") or language, next=request.full_path
        ),
        "role_label": lambda role: str(ROLE_LABELS.get(role, role)),
        "number": fmt.number,
        "sort_state": sort_state,
        "sort_link": sort_link,
        "page_link": page_link,
    }
