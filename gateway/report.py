"""The demo's report: figures computed from what the demo recorded; Markdown, JSON and a PNG.

Kept apart from the demo driver so the figures (throughput per window, Jain's
index, latency percentiles, billed against ground truth) are plain functions
of recorded data, testable without a village.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from types import ModuleType
from typing import Any

from desanet.errors import DesanetError
from desanet.units import format_bytes, format_rate

LATENCY_PLOT = "latency.png"


@dataclass
class DemoSubscriber:
    """A village subscriber as the demo set it up."""

    id: str
    name: str
    role: str  # "standard", "capped", "premium", "quota", "suspended"
    plan: str


@dataclass
class Sample:
    """Cumulative billed bytes of every subscriber at `t_s` seconds into the load."""

    t_s: float
    down: dict[str, int]
    up: dict[str, int]
    state: dict[str, str]


@dataclass
class LatencySample:
    """The link's passive RTT as status showed it at `t_s`: direction -> (p50, p95) ms."""

    t_s: float
    link: dict[str, tuple[float, float]]


@dataclass
class DemoRecord:
    """Everything the demo observed, from which the report is computed."""

    subscribers: list[DemoSubscriber]
    samples: list[Sample] = field(default_factory=list)
    latency: list[LatencySample] = field(default_factory=list)
    idle_ping_ms: list[float] = field(default_factory=list)
    loaded_ping_ms: list[tuple[float, float]] = field(default_factory=list)
    billed: dict[str, tuple[int, int]] = field(default_factory=dict)  # id -> (up, down)
    # Delivered ground truth, id -> (up as received on the internet side, down by the subscriber)
    truth: dict[str, tuple[int, int]] = field(default_factory=dict)
    sent_up: dict[str, int] = field(default_factory=dict)  # what the subscriber sent
    events: list[tuple[float, str, str, str]] = field(default_factory=list)
    # Events as billing received them in the usage stream: (seq, sub, kind, detail).
    stream_events: list[tuple[int, str, str, str]] = field(default_factory=list)
    suspend_at_s: float = 0.0
    throttled_at_s: float | None = None
    uploads_paced: bool = False
    leaf_wanted: str = ""
    leaf_in_use: str = ""
    warnings: list[str] = field(default_factory=list)
    link_down_bps: int = 0
    link_up_bps: int = 0
    elapsed_s: float = 0.0
    console_url: str = ""  # where the operator's console was served during the run
    console_answered: bool = False


def jain(values: Sequence[float]) -> float:
    """Jain's fairness index: 1.0 when all equal, 1/n when one takes everything."""
    if not values:
        return 0.0
    square_sum = sum(v * v for v in values)
    return (sum(values) ** 2) / (len(values) * square_sum) if square_sum else 1.0


def percentile(values: Sequence[float], q: float) -> float:
    """The q-th percentile (0..100) by nearest rank; 0.0 for no values."""
    if not values:
        return 0.0
    ordered = sorted(values)
    rank = max(0, min(len(ordered) - 1, round(q / 100 * (len(ordered) - 1))))
    return ordered[rank]


def window_rates(
    record: DemoRecord, start_s: float, end_s: float
) -> dict[str, tuple[float, float]]:
    """Mean (down, up) bit/s of every subscriber between the samples nearest start and end."""
    inside = [s for s in record.samples if start_s <= s.t_s <= end_s]
    if len(inside) < 2:
        return {}
    first, last = inside[0], inside[-1]
    span = last.t_s - first.t_s
    return {
        sub.id: (
            8 * (last.down[sub.id] - first.down[sub.id]) / span,
            8 * (last.up[sub.id] - first.up[sub.id]) / span,
        )
        for sub in record.subscribers
    }


def series(
    record: DemoRecord, sub_id: str, direction: str, span_s: float = 1.0
) -> tuple[list[float], list[float]]:
    """(times, bit/s) for one subscriber and direction, each rate over the last `span_s`.

    Averaging over a span smooths the bursts of paced senders without hiding changes.
    """
    times, rates = [], []
    first = 0
    samples = record.samples
    for after in samples:
        # The window starts at the latest sample that still leaves `span_s` before `after`.
        while first + 1 < len(samples) and after.t_s - samples[first + 1].t_s >= span_s:
            first += 1
        before = samples[first]
        dt = after.t_s - before.t_s
        if dt <= 0:
            continue
        times.append(after.t_s)
        rates.append(
            8 * (getattr(after, direction)[sub_id] - getattr(before, direction)[sub_id]) / dt
        )
    return times, rates


def _rtt_points(record: DemoRecord) -> dict[str, list[tuple[float, float]]]:
    """Every status reading of the link's RTT, by direction: [(p50, p95)]."""
    points: dict[str, list[tuple[float, float]]] = {}
    for sample in record.latency:
        for direction, pair in sample.link.items():
            points.setdefault(direction, []).append(pair)
    return points


def summarize(record: DemoRecord, warmup_s: float = 5.0) -> dict[str, Any]:
    """The report's figures: fairness windows, per-subscriber rates, latency, billing accuracy."""
    end = record.samples[-1].t_s if record.samples else 0.0
    changed = min(record.suspend_at_s, record.throttled_at_s or end)
    settled = max(record.suspend_at_s, record.throttled_at_s or record.suspend_at_s) + 3.0
    before = window_rates(record, warmup_s, changed)
    after = window_rates(record, settled, end)
    roles = {s.id: s.role for s in record.subscribers}
    equals_before = [i for i, r in roles.items() if r in ("standard", "quota", "suspended")]
    equals_after = [i for i, r in roles.items() if r == "standard"]
    fairness = {
        "down_before": jain([before[i][0] for i in equals_before]) if before else 0.0,
        "up_before": jain([before[i][1] for i in equals_before]) if before else 0.0,
        "down_after": jain([after[i][0] for i in equals_after]) if after else 0.0,
        "up_after": jain([after[i][1] for i in equals_after]) if after else 0.0,
    }
    billing = {}
    for sub in record.subscribers:
        billed, truth = record.billed.get(sub.id, (0, 0)), record.truth.get(sub.id, (0, 0))
        billing[sub.id] = {
            "billed_up": billed[0],
            "billed_down": billed[1],
            "truth_up": truth[0],
            "truth_down": truth[1],
            "error": abs(sum(billed) - sum(truth)) / sum(truth) if sum(truth) else 0.0,
        }
    billed_all = sum(sum(v) for v in record.billed.values())
    truth_all = sum(sum(v) for v in record.truth.values())
    loaded = [rtt for _, rtt in record.loaded_ping_ms]
    return {
        "windows": {"before": [warmup_s, changed], "after": [settled, end]},
        "fairness": fairness,
        "jain": min(fairness.values()),
        "rates_before": before,
        "rates_after": after,
        "latency_ms": {
            "idle_median": percentile(record.idle_ping_ms, 50),
            "loaded_median": percentile(loaded, 50),
            "loaded_p95": percentile(loaded, 95),
            "loaded_samples": len(loaded),
        },
        "passive_rtt_ms": {
            direction: {
                "points": len(points),
                "p50_median": percentile([p50 for p50, _ in points], 50),
                "p95_max": max((p95 for _, p95 in points), default=0.0),
            }
            for direction, points in _rtt_points(record).items()
        },
        "billing": billing,
        "billing_error": abs(billed_all - truth_all) / truth_all if truth_all else 0.0,
        "billing_max_error": max((b["error"] for b in billing.values()), default=0.0),
        "throttled_at_s": record.throttled_at_s,
        "stream_events": [list(e) for e in record.stream_events],
        "suspend_at_s": record.suspend_at_s,
        "leaf_wanted": record.leaf_wanted,
        "leaf_in_use": record.leaf_in_use,
        "elapsed_s": record.elapsed_s,
        "console": {"url": record.console_url, "answered": record.console_answered},
    }


def render_markdown(record: DemoRecord, summary: dict[str, Any], plot_name: str) -> str:
    """The report a newcomer reads after `make demo`."""
    fair, lat = summary["fairness"], summary["latency_ms"]
    lines = [
        "# desanet village demo",
        "",
        f"8 subscribers share a {format_rate(record.link_down_bps)} down / "
        f"{format_rate(record.link_up_bps)} up link; each runs iperf3 TCP both ways "
        + ("(uploads paced below their fair share) " if record.uploads_paced else "")
        + f"and s1 pings the internet side. Run took {summary['elapsed_s']:.0f} s.",
        "",
    ]
    if record.leaf_in_use != record.leaf_wanted:
        lines += [
            f"**Leaf qdisc: {record.leaf_in_use}, not {record.leaf_wanted}**: this kernel lacks "
            f"{record.leaf_wanted}, so the shaper fell back (latency under load is higher than "
            "with an AQM; the VM tier shows fq_codel on a stock kernel).",
            "",
        ]
    if record.console_url:
        answered = "it answered" if record.console_answered else "it did not answer"
        lines += [
            f"The operator's console was served at {record.console_url} during the run "
            f"({answered}); `desanet console` serves it on a real gateway.",
            "",
        ]
    lines += [f"- warning: {w}" for w in record.warnings]
    lines += [
        "## Fairness (Jain's index over subscribers on the same plan)",
        "",
        "| window | down | up |",
        "|---|---|---|",
        f"| all 8 active ({summary['windows']['before'][0]:.0f}-"
        f"{summary['windows']['before'][1]:.0f} s) | {fair['down_before']:.3f} | "
        f"{fair['up_before']:.3f} |",
        f"| after suspension and throttle ({summary['windows']['after'][0]:.0f}-"
        f"{summary['windows']['after'][1]:.0f} s) | {fair['down_after']:.3f} | "
        f"{fair['up_after']:.3f} |",
        "",
        "## Throughput per subscriber",
        "",
        "| id | name | role | plan | down before | up before | down after | up after |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for sub in record.subscribers:
        b = summary["rates_before"].get(sub.id, (0.0, 0.0))
        a = summary["rates_after"].get(sub.id, (0.0, 0.0))
        lines.append(
            f"| {sub.id} | {sub.name} | {sub.role} | {sub.plan} | {format_rate(b[0])} | "
            f"{format_rate(b[1])} | {format_rate(a[0])} | {format_rate(a[1])} |"
        )
    lines += [
        "",
        "## Latency (ping from a loaded subscriber to the internet side)",
        "",
        f"idle median {lat['idle_median']:.1f} ms; under load median {lat['loaded_median']:.1f} "
        f"ms, p95 {lat['loaded_p95']:.1f} ms ({lat['loaded_samples']} probes)",
        "",
        "Passive RTT from TCP timestamps, as `desanet status` showed it during the load "
        "(wan: gateway -> internet -> gateway; lan: gateway -> device -> gateway):",
        "",
    ]
    for direction, rtt in summary["passive_rtt_ms"].items():
        lines.append(
            f"- {direction}: median p50 {rtt['p50_median']:.1f} ms, largest p95 "
            f"{rtt['p95_max']:.1f} ms ({rtt['points']} status readings)"
        )
    lines += [
        "",
        f"![passive RTT over time]({LATENCY_PLOT})",
        "",
        "## Billed bytes against ground truth (nftables counters)",
        "",
        "Billing counts delivered IP bytes. Ground truth: down = what each subscriber's own",
        "namespace received; up = what arrived from the subscriber at the internet side (the",
        "subscriber's own `sent` counter also holds packets the shaper dropped, shown apart).",
        "",
        "| id | billed up | delivered up | sent up | billed down | delivered down | error |",
        "|---|---|---|---|---|---|---|",
    ]
    for sub_id, b in summary["billing"].items():
        lines.append(
            f"| {sub_id} | {b['billed_up']} | {b['truth_up']} | {record.sent_up.get(sub_id, 0)} "
            f"| {b['billed_down']} | {b['truth_down']} | {b['error']:.4%} |"
        )
    total_truth = sum(sum(v) for v in record.truth.values())
    lines += [
        "",
        f"All subscribers: {format_bytes(total_truth)} of ground truth, billing error "
        f"{summary['billing_error']:.4%} "
        f"(largest per subscriber {summary['billing_max_error']:.4%}).",
        "",
        "## Events",
        "",
    ]
    lines += [f"- {t:.1f} s: {sub} {kind}: {detail}" for t, sub, kind, detail in record.events]
    throttle = summary["throttled_at_s"]
    lines += [
        "",
        "Quota throttle: "
        + (f"observed at {throttle:.1f} s." if throttle is not None else "NOT seen."),
        "",
        "Events billing received in the usage stream:",
        "",
    ]
    lines += [
        f"- seq {seq}: {sub} {kind}: {detail}" for seq, sub, kind, detail in record.stream_events
    ] or ["- none"]
    lines += [
        "",
        f"![throughput over time]({plot_name})",
        "",
    ]
    return "\n".join(lines)


def pyplot() -> ModuleType:
    """matplotlib's pyplot, drawing to files: only the demo needs it (the `demo` extra)."""
    try:
        import matplotlib
    except ModuleNotFoundError as err:
        if err.name != "matplotlib":
            raise
        raise DesanetError(
            "the demo draws its throughput plot with matplotlib, which is not installed: "
            "pip install 'desanet[demo]' (in a checkout, `make setup` installs it)"
        ) from err
    matplotlib.use("Agg")  # no display on a gateway
    import matplotlib.pyplot as plt

    return plt


def plot_latency(record: DemoRecord, path: Path) -> None:
    """PNG of the link's passive RTT p50 and p95 over time, WAN and LAN, as status showed it."""
    plt = pyplot()
    fig, axes = plt.subplots(2, 1, figsize=(10, 6), sharex=True)
    for ax, direction in zip(axes, ("wan", "lan"), strict=True):
        shown = [(s.t_s, s.link[direction]) for s in record.latency if direction in s.link]
        times = [t for t, _ in shown]
        ax.plot(times, [pair[0] for _, pair in shown], label="p50", marker=".")
        ax.plot(times, [pair[1] for _, pair in shown], label="p95", marker=".")
        ax.set_ylabel(f"{direction} RTT ms")
        ax.axvline(record.suspend_at_s, color="grey", linestyle="--")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    axes[0].set_title("desanet demo: passive RTT of the link (status window, TCP timestamps)")
    axes[1].set_xlabel("seconds into the load")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def plot(record: DemoRecord, path: Path) -> None:
    """PNG of every subscriber's download and upload throughput over time."""
    plt = pyplot()
    fig, axes = plt.subplots(2, 1, figsize=(10, 7), sharex=True)
    for ax, direction in zip(axes, ("down", "up"), strict=True):
        for sub in record.subscribers:
            times, rates = series(record, sub.id, direction, span_s=2.0)
            ax.plot(times, [r / 1e6 for r in rates], label=f"{sub.id} ({sub.role})")
        ax.set_ylabel(f"{direction} Mbit/s")
        ax.axvline(record.suspend_at_s, color="grey", linestyle="--")
        if record.throttled_at_s is not None:
            ax.axvline(record.throttled_at_s, color="red", linestyle=":")
        ax.grid(alpha=0.3)
    axes[0].set_title(
        "desanet demo: billed throughput per subscriber (dashed: suspend, dotted: quota)"
    )
    axes[0].legend(ncol=4, fontsize=8)
    axes[1].set_xlabel("seconds into the load")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def write(record: DemoRecord, out_dir: Path) -> dict[str, Any]:
    """Write report.md, throughput.png, latency.png and summary.json (figures and record);
    returns the figures."""
    out_dir.mkdir(parents=True, exist_ok=True)
    summary = summarize(record)
    plot(record, out_dir / "throughput.png")
    plot_latency(record, out_dir / LATENCY_PLOT)
    (out_dir / "report.md").write_text(render_markdown(record, summary, "throughput.png"))
    (out_dir / "summary.json").write_text(
        json.dumps({"summary": summary, "record": asdict(record)}, indent=1)
    )
    return summary
