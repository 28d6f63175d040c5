"""`make test-wheel`: the wheel a user installs, in a fresh venv, used outside the checkout.

1. The tracked tree (`git ls-files`) is copied to a temporary folder and built there
   with `pip wheel --no-deps --no-build-isolation` (the checkout's venv brings Cython
   and numpy), so nothing untracked or left in build/ by an earlier build gets in.
2. The wheel holds desanet/ and its metadata only (no top-level `gateway`, `meter`, ...
   to collide with another distribution), with py.typed, the aggregator's stub and its
   compiled extension.
3. A fresh venv (`/usr/bin/python3 -m venv --system-site-packages`, for Debian's bcc)
   installs the wheel and its dependencies from the configured index, as a user's pip.
4. From an empty folder, where neither `tests` nor the source folders can be imported:
   --version, --help, `usage --help`, `collect --help`; `desanet demo` without the demo
   extra stops at once naming it; `desanet bench --quick` runs every benchmark that
   needs no VM and skips bufferbloat and autorate, saying they need a checkout's tests/vm.
   These are `make test`'s quick runs of those benchmarks: its bench-quick-checkout runs
   only the ones skipped here for a harness or an extra (CHECKOUT_BENCHMARKS).

Exit code 0 when every check held; else 1, with the failed check and its output.
"""

from __future__ import annotations

import json
import subprocess
import sys
import tempfile
import time
import zipfile
from collections.abc import Sequence
from pathlib import Path

import desanet

REPO = Path(__file__).resolve().parents[2]
SYSTEM_PYTHON = "/usr/bin/python3"
Completed = subprocess.CompletedProcess[str]
VM_BENCHMARKS = {"bufferbloat", "autorate"}  # they boot the checkout's VM harness
# They start the checkout's nats-server and PostgreSQL harnesses.
HARNESS_BENCHMARKS = {"fleet": "tests/fleet_harness.py"}
# Benchmarks of an optional part: without its extra they say which extra to install.
EXTRA_BENCHMARKS = {"console": "desanet[console]"}


class CheckFailed(Exception):
    """One check of the installed wheel did not hold."""


def sh(cmd: Sequence[str | Path], cwd: Path, timeout_s: float = 300) -> str:
    """Run `cmd`; its stdout and stderr together, or CheckFailed when it exits non-zero."""
    proc = _run(cmd, cwd, timeout_s)
    if proc.returncode != 0:
        raise CheckFailed(f"`{_show(cmd)}` exited {proc.returncode}:\n{proc.stdout}")
    return proc.stdout


def _run(cmd: Sequence[str | Path], cwd: Path, timeout_s: float) -> Completed:
    return subprocess.run(
        [str(c) for c in cmd],
        cwd=cwd,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        timeout=timeout_s,
    )


def _show(cmd: Sequence[str | Path]) -> str:
    return " ".join(str(c) for c in cmd)


def build_wheel(tmp: Path) -> Path:
    """The wheel of the tracked tree, built in a copy of it."""
    src = tmp / "src"
    src.mkdir()
    tracked = subprocess.run(
        ["git", "ls-files", "-z"], cwd=REPO, check=True, stdout=subprocess.PIPE
    ).stdout
    # tar keeps the desanet/<package> symlinks as links, as a clone has them.
    pack = subprocess.run(
        ["tar", "--null", "-T", "-", "-cf", "-"],
        cwd=REPO,
        input=tracked,
        stdout=subprocess.PIPE,
        check=True,
    ).stdout
    subprocess.run(["tar", "-xf", "-", "-C", str(src)], input=pack, check=True)
    dist = tmp / "dist"
    pip = [sys.executable, "-m", "pip", "wheel", "--quiet", "--no-deps", "--no-build-isolation"]
    sh([*pip, "--wheel-dir", dist, "."], cwd=src)
    wheels = list(dist.glob("desanet-*.whl"))
    if len(wheels) != 1:
        raise CheckFailed(f"expected one desanet wheel in {dist}, found {wheels}")
    return wheels[0]


def check_contents(wheel: Path) -> None:
    """Only desanet/ and its metadata; the typing marker, the stub and the extension inside."""
    names = zipfile.ZipFile(wheel).namelist()
    info = f"desanet-{desanet.__version__}.dist-info/"
    strays = [n for n in names if not n.startswith(("desanet/", info))]
    if strays:
        raise CheckFailed(f"{wheel.name} installs names outside desanet/: {strays}")
    needed = {
        "desanet/py.typed",
        "desanet/cython_ext/_aggregate.pyi",
        "desanet/ebpf/datapath.bpf.c",
        "desanet/gateway/console/translations/id/LC_MESSAGES/messages.mo",
    }
    missing = needed - set(names)
    if not any(n.startswith("desanet/cython_ext/_aggregate.") and n.endswith(".so") for n in names):
        missing.add("desanet/cython_ext/_aggregate.*.so")
    if missing:
        raise CheckFailed(f"{wheel.name} lacks {sorted(missing)}")
    metadata = zipfile.ZipFile(wheel).read(f"{info}METADATA").decode()
    plotting = [n for n in metadata.splitlines() if n.startswith("Requires-Dist: matplotlib")]
    if not plotting or any("extra ==" not in line for line in plotting):
        raise CheckFailed(f"matplotlib must be required by extras only (demo, console): {plotting}")


def install(wheel: Path, tmp: Path) -> Path:
    """A fresh venv with the wheel installed; its bin/ folder."""
    venv = tmp / "venv"
    sh([SYSTEM_PYTHON, "-m", "venv", "--system-site-packages", venv], cwd=tmp)
    sh([venv / "bin" / "python", "-m", "pip", "install", "--quiet", wheel], cwd=tmp)
    return venv / "bin"


def check_imported_from_the_venv(bin_dir: Path, away: Path) -> None:
    """desanet comes from the venv's site-packages, and the checkout's `tests` is out of reach."""
    code = (
        "import importlib.util, desanet; print(desanet.__file__); "
        "print(importlib.util.find_spec('tests') is not None)"
    )
    where, tests_found = sh([bin_dir / "python", "-c", code], cwd=away).split()
    if Path(where).resolve().is_relative_to(REPO) or bin_dir.parent not in Path(where).parents:
        raise CheckFailed(f"desanet was imported from {where}, not from the fresh venv")
    if tests_found != "False":
        raise CheckFailed(f"a `tests` package is importable from {away}: the check proves nothing")


def check_commands(bin_dir: Path, away: Path) -> None:
    """The verbs a user tries first work, and the demo names its missing extra."""
    cli = bin_dir / "desanet"
    version = sh([cli, "--version"], cwd=away).strip()
    if version != f"desanet {desanet.__version__}":
        raise CheckFailed(f"`desanet --version` printed {version!r}")
    for verb in ([], ["usage"], ["collect"]):
        text = sh([cli, *verb, "--help"], cwd=away)
        if not text.startswith(f"usage: desanet {' '.join(verb)}".rstrip()):
            raise CheckFailed(f"`desanet {' '.join(verb)} --help` printed:\n{text}")
    has_plotting = "import importlib.util as u; print(u.find_spec('matplotlib') is not None)"
    if sh([bin_dir / "python", "-c", has_plotting], cwd=away).strip() == "True":
        # Debian's python3-matplotlib, seen through --system-site-packages: the demo would run.
        print("test-wheel: note: matplotlib is installed system-wide; demo extra check skipped")
        return
    demo = _run([cli, "demo", "--seconds", "1", "--out", away / "demo"], away, 60)
    if demo.returncode != 2 or "pip install 'desanet[demo]'" not in demo.stdout:
        raise CheckFailed(
            f"`desanet demo` without matplotlib exited {demo.returncode}, expected 2 naming "
            f"the demo extra:\n{demo.stdout}"
        )


def check_bench(bin_dir: Path, away: Path) -> list[str]:
    """`desanet bench --quick`: every benchmark measured, but those needing the VM say why."""
    out = away / "bench"
    sh([bin_dir / "desanet", "bench", "--quick", "--out", out], cwd=away, timeout_s=600)
    names = sorted(
        p.stem for p in (REPO / "benchmarks").glob("*.py") if p.stem not in ("__init__", "common")
    )
    for name in names:
        path = out / f"{name}.json"
        if not path.exists():
            raise CheckFailed(f"benchmark {name} wrote no {path}")
        doc = json.loads(path.read_text())
        if name in VM_BENCHMARKS:
            if "tests/vm" not in doc.get("skipped", ""):
                raise CheckFailed(f"{name} should skip naming tests/vm outside a checkout: {doc}")
        elif name in HARNESS_BENCHMARKS:
            if HARNESS_BENCHMARKS[name] not in doc.get("skipped", ""):
                raise CheckFailed(
                    f"{name} should skip naming its harness outside a checkout: {doc}"
                )
        elif name in EXTRA_BENCHMARKS:
            if EXTRA_BENCHMARKS[name] not in doc.get("skipped", ""):
                raise CheckFailed(
                    f"{name} should name {EXTRA_BENCHMARKS[name]} when skipping: {doc}"
                )
        elif "skipped" in doc or not doc["rows"] or not doc["headline"]:
            raise CheckFailed(f"benchmark {name} measured nothing: {doc}")
    return names


def main() -> int:
    """Run every check in order; stop at the first that fails."""
    start = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="desanet-wheel-") as name:
        tmp = Path(name)
        away = tmp / "elsewhere"
        away.mkdir()
        try:
            wheel = build_wheel(tmp)
            check_contents(wheel)
            bin_dir = install(wheel, tmp)
            check_imported_from_the_venv(bin_dir, away)
            check_commands(bin_dir, away)
            skipped = VM_BENCHMARKS | EXTRA_BENCHMARKS.keys() | HARNESS_BENCHMARKS.keys()
            measured = [n for n in check_bench(bin_dir, away) if n not in skipped]
        except CheckFailed as err:
            print(f"test-wheel: FAILED: {err}", file=sys.stderr)
            return 1
    print(
        f"test-wheel: passed: {wheel.name} installed in a fresh venv and used from outside "
        f"the checkout: version, help, demo extra, bench --quick ({', '.join(measured)} "
        f"measured; {', '.join(sorted(skipped))} skipped, as they say) in "
        f"{time.monotonic() - start:.0f} s",
        flush=True,
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
