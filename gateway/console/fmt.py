"""Numbers, sizes, rates, dates and times in the reader's language (Babel, via Flask-Babel).

Pages never format a number themselves: a rate is "2,4 Mbit/s" in
Indonesian and "2.4 Mbit/s" in English, a date "1 Des" or "Dec 1", a time in
the console's time zone.
"""

from __future__ import annotations

import datetime as dt

from flask_babel import format_date, format_datetime, format_decimal, format_percent, gettext


def rate(bps: float) -> str:
    """A bit rate: "2,4 Mbit/s"."""
    if bps >= 1e9:
        return gettext("%(n)s Gbit/s", n=format_decimal(bps / 1e9, format="#,##0.0"))
    if bps >= 1e6:
        return gettext("%(n)s Mbit/s", n=format_decimal(bps / 1e6, format="#,##0.0"))
    if bps >= 1e3:
        return gettext("%(n)s kbit/s", n=format_decimal(bps / 1e3, format="#,##0"))
    return gettext("%(n)s bit/s", n=format_decimal(bps, format="#,##0"))


def size(count: float) -> str:
    """A byte count: "1,25 GB" (decimal units, as quotas are written)."""
    for scale, unit in ((1e12, "TB"), (1e9, "GB"), (1e6, "MB"), (1e3, "kB")):
        if count >= scale:
            number = format_decimal(count / scale, format="#,##0.##")
            return gettext("%(n)s %(unit)s", n=number, unit=unit)
    return gettext("%(n)s B", n=format_decimal(count, format="#,##0"))


def percent(share: float) -> str:
    """A share: "42%" ("42 %" where the locale says so)."""
    return format_percent(share, format="#,##0%")


def number(value: float) -> str:
    """A plain number with the locale's grouping."""
    return format_decimal(value, format="#,##0")


def when(t_ms: int) -> str:
    """A moment in the console's time zone: date and time, short."""
    return format_datetime(dt.datetime.fromtimestamp(t_ms / 1000, dt.UTC), "short")


def clock(t_ms: int) -> str:
    """A time of day with seconds, for "updated at"."""
    return format_datetime(dt.datetime.fromtimestamp(t_ms / 1000, dt.UTC), "HH:mm:ss")


def day(value: dt.date) -> str:
    """A day of the month and the month, short: "1 Des"."""
    return format_date(value, "d MMM")
