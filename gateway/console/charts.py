"""The 30-day usage chart: an SVG drawn on the server by matplotlib (already a desanet dependency).

Server-side SVG needs no JavaScript, no chart library in the page and no
network: it works on the slowest phone and under a strict content policy.
The page also lists the same figures as a table, for screen readers.
"""

from __future__ import annotations

import io
import threading
from collections.abc import Sequence

import matplotlib

matplotlib.use("svg")
from matplotlib.figure import Figure

from desanet.gateway.console.history import DayUsage

# matplotlib's font and text caches are not thread-safe; charts are rare, so one at a time.
_lock = threading.Lock()
SCALE_UNITS = {1e12: "TB", 1e9: "GB", 1e6: "MB", 1e3: "kB"}
DOWN_COLOUR = "#1f6f8b"
UP_COLOUR = "#e0a100"


def scale_for(days: Sequence[DayUsage]) -> tuple[float, str]:
    """The largest unit (kB, MB, GB, TB) at which the busiest day is at least 1, and its symbol."""
    peak = max((d.down + d.up for d in days), default=0)
    scale = next((s for s in (1e12, 1e9, 1e6) if peak >= s), 1e3)
    return scale, SCALE_UNITS[scale]


def usage_svg(
    days: Sequence[DayUsage],
    labels: Sequence[str],
    down_label: str,
    up_label: str,
    axis_label: str,
    scale: float,
) -> bytes:
    """Stacked daily bars (download, upload) in units of `scale` bytes, one label per week."""
    down = [d.down / scale for d in days]
    up = [d.up / scale for d in days]
    # Large type: on a phone the 720-pixel drawing is shown about half size.
    with _lock, matplotlib.rc_context({"font.size": 15}):
        fig = Figure(figsize=(7.2, 3.4), dpi=100)
        ax = fig.add_subplot()
        positions = list(range(len(days)))
        ax.bar(positions, down, color=DOWN_COLOUR, label=down_label)
        ax.bar(positions, up, bottom=down, color=UP_COLOUR, label=up_label)
        ticks = positions[::7] if len(positions) > 7 else positions
        ax.set_xticks(ticks, [labels[i] for i in ticks])
        ax.set_ylabel(axis_label)
        ax.ticklabel_format(axis="y", style="plain", useOffset=False)
        ax.spines[["top", "right"]].set_visible(False)
        ax.legend(loc="upper left", frameon=False, ncols=2)
        ax.margins(x=0.01)
        fig.tight_layout()
        out = io.BytesIO()
        fig.savefig(out, format="svg", metadata={"Date": None})
    return out.getvalue()
