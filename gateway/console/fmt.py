"""Numbers, sizes, rates, dates and times in the reader's language (Babel, via Flask-Babel).

Pages never format a number themselves: a rate is "2,4 Mbit/s" in
Indonesian and "2.4 Mbit/s" in English, a date "1 Des" or "Dec 1", a time in
the console's time zone. A page formats hundreds of figures, so the locale
and the translated unit patterns are looked up once per request.
"""

from __future__ import annotations

import datetime as dt
from typing import Any

from babel import Locale
from babel.numbers import NumberPattern, parse_pattern
from flask import g
from flask_babel import format_date, format_datetime, format_percent, get_locale, gettext


def _cached() -> tuple[Locale, dict[str, str]]:
    found: tuple[Locale, dict[str, str]] | None = g.get("desanet_fmt")
    if found is None:
        locale = get_locale() or Locale.parse("id")
        # gettext fills in its arguments: each pattern is fetched with its placeholders kept.
        keep = {"n": "%(n)s", "unit": "%(unit)s"}
        patterns = {
            "G": gettext("%(n)s Gbit/s", **keep),
            "M": gettext("%(n)s Mbit/s", **keep),
            "k": gettext("%(n)s kbit/s", **keep),
            "": gettext("%(n)s bit/s", **keep),
            "size": gettext("%(n)s %(unit)s", **keep),
            "B": gettext("%(n)s B", **keep),
        }
        found = (locale, patterns)
        g.desanet_fmt = found
    return found


# Parsed once: parsing a number pattern costs as much as applying it.
_NUMBER_PATTERNS: dict[str, NumberPattern] = {
    p: parse_pattern(p) for p in ("#,##0.0", "#,##0", "#,##0.##")
}


def _number(value: float, pattern: str) -> str:
    return _NUMBER_PATTERNS[pattern].apply(value, _cached()[0])


def _fill(key: str, **values: Any) -> str:
    return _cached()[1][key] % values


def rate(bps: float) -> str:
    """A bit rate: "2,4 Mbit/s"."""
    if bps >= 1e9:
        return _fill("G", n=_number(bps / 1e9, "#,##0.0"))
    if bps >= 1e6:
        return _fill("M", n=_number(bps / 1e6, "#,##0.0"))
    if bps >= 1e3:
        return _fill("k", n=_number(bps / 1e3, "#,##0"))
    return _fill("", n=_number(bps, "#,##0"))


def size(count: float) -> str:
    """A byte count: "1,25 GB" (decimal units, as quotas are written)."""
    for scale, unit in ((1e12, "TB"), (1e9, "GB"), (1e6, "MB"), (1e3, "kB")):
        if count >= scale:
            return _fill("size", n=_number(count / scale, "#,##0.##"), unit=unit)
    return _fill("B", n=_number(count, "#,##0"))


def percent(share: float) -> str:
    """A share: "42%" ("42 %" where the locale says so)."""
    return format_percent(share, format="#,##0%")


def number(value: float) -> str:
    """A plain number with the locale's grouping."""
    return _number(value, "#,##0")


def when(t_ms: int) -> str:
    """A moment in the console's time zone: date and time, short."""
    return format_datetime(dt.datetime.fromtimestamp(t_ms / 1000, dt.UTC), "short")


def clock(t_ms: int) -> str:
    """A time of day with seconds, for "updated at"."""
    return format_datetime(dt.datetime.fromtimestamp(t_ms / 1000, dt.UTC), "HH:mm:ss")


def day(value: dt.date) -> str:
    """A day of the month and the month, short: "1 Des"."""
    return format_date(value, "d MMM")
