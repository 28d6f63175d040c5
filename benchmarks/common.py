"""What every benchmark shares: arguments, machine description, the table and the JSON file.

A benchmark module builds a `Report`, adds rows (one per measured case, its
peer measured in the same run) and headline figures (the keys its issue names),
then calls `report.finish(args)`, which prints the table and writes the JSON;
a benchmark this machine cannot run calls `report.skip(args, reason)` instead.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import platform
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any


def parse_args(description: str) -> argparse.Namespace:
    """The arguments every benchmark takes: --quick and --json FILE."""
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--quick", action="store_true", help="seconds-long smoke run (make test)")
    parser.add_argument("--json", type=Path, help="also write the figures to this JSON file")
    return parser.parse_args()


def machine() -> dict[str, Any]:
    """Kernel, CPU model and core count, stated in every report."""
    cpu = platform.processor() or "unknown"
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    return {"kernel": platform.release(), "cpu": cpu, "cores": os.cpu_count() or 1}


def timed(fn: Callable[[], object], repeat: int) -> list[float]:
    """Wall-clock seconds of `repeat` calls of `fn`."""
    times = []
    for _ in range(repeat):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return times


def median(values: list[float]) -> float:
    """Median of a non-empty list."""
    ordered = sorted(values)
    mid = len(ordered) // 2
    return ordered[mid] if len(ordered) % 2 else (ordered[mid - 1] + ordered[mid]) / 2


@dataclass
class Report:
    """Rows of a benchmark table plus its headline figures."""

    name: str
    columns: list[str]
    quick: bool = False
    rows: list[dict[str, Any]] = field(default_factory=list)
    headline: dict[str, float] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)

    def add(self, **row: Any) -> None:
        self.rows.append(row)

    def render(self) -> str:
        info = machine()
        lines = [
            f"benchmark {self.name}{' (quick)' if self.quick else ''}: "
            f"kernel {info['kernel']}, {info['cpu']}, {info['cores']} cores",
        ]
        cells = [[_fmt(row.get(col, "")) for col in self.columns] for row in self.rows]
        widths = [
            max(len(c), *(len(r[i]) for r in cells)) if cells else len(c)
            for i, c in enumerate(self.columns)
        ]
        lines.append("  ".join(c.rjust(w) for c, w in zip(self.columns, widths, strict=True)))
        lines.append("  ".join("-" * w for w in widths))
        lines.extend("  ".join(v.rjust(w) for v, w in zip(r, widths, strict=True)) for r in cells)
        if self.headline:
            lines.append(
                "headline: " + ", ".join(f"{k}={_fmt(v)}" for k, v in self.headline.items())
            )
        lines.extend(f"note: {n}" for n in self.notes)
        return "\n".join(lines)

    def finish(self, args: argparse.Namespace) -> None:
        """Print the table; write the JSON file when asked."""
        print(self.render(), flush=True)
        self._write(args, {})

    def skip(self, args: argparse.Namespace, reason: str) -> None:
        """Say why nothing was measured on this machine; the JSON file keeps the reason."""
        print(f"benchmark {self.name}: skipped: {reason}", flush=True)
        self._write(args, {"skipped": reason})

    def _write(self, args: argparse.Namespace, extra: dict[str, Any]) -> None:
        if not args.json:
            return
        doc = {
            "benchmark": self.name,
            "quick": self.quick,
            "machine": machine(),
            "rows": self.rows,
            "headline": self.headline,
            "notes": self.notes,
            **extra,
        }
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(doc, indent=2) + "\n")


def cpu_seconds(pids: set[int]) -> dict[int, float]:
    """User + system CPU seconds each of `pids` has used so far (those still running)."""
    tick = os.sysconf("SC_CLK_TCK")
    out = {}
    for pid in pids:
        try:
            stat = Path(f"/proc/{pid}/stat").read_text()
        except OSError:
            continue  # gone meanwhile
        fields = stat[stat.rindex(")") + 2 :].split()
        out[pid] = (int(fields[11]) + int(fields[12])) / tick
    return out


def pids_named(name: str) -> set[int]:
    """Every running process whose command name is `name` (e.g. postgres backends)."""
    found = set()
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                if (entry / "comm").read_text().strip() == name:
                    found.add(int(entry.name))
            except OSError:
                continue
    return found


def _fmt(value: Any) -> str:
    if isinstance(value, float):
        if value == 0 or abs(value) >= 100:
            return f"{value:.0f}"
        if abs(value) >= 1:
            return f"{value:.2f}"
        return f"{value:.3g}"
    return str(value)


def vm_unavailable_reason() -> str | None:
    """Why this machine cannot run a benchmark inside the VM tier, or None when it can."""
    try:
        harness = importlib.util.find_spec("tests.vm.machine") is not None
    except ModuleNotFoundError:  # no `tests` or `tests.vm`: not a source checkout
        harness = False
    if not harness:
        return (
            "it needs the VM harness of a source checkout (tests/vm), which the installed "
            "package does not ship; run `make bench` in a clone of the repository"
        )
    if platform.machine() != "x86_64":
        return (
            "it boots Debian's amd64 kernel under qemu-system-x86, so it runs only on "
            f"x86-64 hosts (this one is {platform.machine()})"
        )
    return None


def run_in_guest(name: str, args: argparse.Namespace, timeout_s: int) -> int:
    """Boot the VM tier, run `desanet.benchmarks.<name>` inside it and keep its report.

    The guest writes its JSON into the shared folder; a note names the guest's
    kernel and accelerator, and the host's load (a VM under TCG slows with it)."""
    from tests.vm.machine import GUEST_SHARE, run_in_vm

    report = f"{name}.json"
    argv = [sys.executable, "-m", f"desanet.benchmarks.{name}", "--json"]
    argv += [f"{GUEST_SHARE}/{report}", *(["--quick"] if args.quick else [])]
    load_start = os.getloadavg()[0]
    with tempfile.TemporaryDirectory(prefix=f"desanet-{name}-") as tmp:
        share = Path(tmp)
        run = run_in_vm(argv, timeout_s=timeout_s, share=share)
        produced = share / report
        if not run.finished or run.exit_code != 0 or not produced.exists():
            print(run.console_after_boot() if run.booted else run.console, file=sys.stderr)
            print(
                f"{name}: the VM run failed (booted={run.booted}, exit={run.exit_code})",
                file=sys.stderr,
            )
            return 1
        doc = json.loads(produced.read_text())
    where = (
        f"measured inside a VM on Linux {run.guest_kernel} ({run.accel}); host load average "
        f"(1 min) {load_start:.1f} at the start, {os.getloadavg()[0]:.1f} at the end"
    )
    doc["notes"].append(where)
    print(f"note: {where}")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(doc, indent=2) + "\n")
    return 0
