"""What the package promises on any machine: its version, its extras, its kernel packages.

The installed wheel itself is checked by `make test-wheel` (tests/wheel/run.py);
these are the parts that need neither root nor a fresh venv.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

import desanet
from desanet.errors import DesanetError
from desanet.gateway import cli, report

pytestmark = pytest.mark.unit

REPO = Path(__file__).resolve().parents[2]


def test_version_is_the_package_version(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_:
        cli.main(["--version"])
    assert exit_.value.code == 0
    assert capsys.readouterr().out == f"desanet {desanet.__version__}\n"
    assert desanet.__version__ == "0.1.0"


def test_demo_without_matplotlib_names_the_extra(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # as if not installed
    with pytest.raises(DesanetError, match=r"pip install 'desanet\[demo\]'"):
        report.pyplot()


def test_vm_benchmark_outside_a_checkout_says_why_and_skips(tmp_path: Path) -> None:
    out = tmp_path / "bufferbloat.json"
    proc = subprocess.run(
        [sys.executable, "-m", "desanet.benchmarks.bufferbloat", "--quick", "--json", str(out)],
        cwd=tmp_path,  # no `tests` package importable from here
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == 0, proc.stderr
    assert "skipped: it needs the VM harness of a source checkout (tests/vm)" in proc.stdout
    doc = json.loads(out.read_text())
    assert doc["benchmark"] == "bufferbloat" and "tests/vm" in doc["skipped"]
    assert doc["rows"] == [] and doc["headline"] == {}


def test_bench_runs_only_the_benchmarks_named(tmp_path: Path) -> None:
    # bufferbloat and autorate skip outside the VM harness at once: a quick, real run.
    assert cli.main(["bench", "--quick", "--out", str(tmp_path), "autorate", "bufferbloat"]) == 0
    assert sorted(p.name for p in tmp_path.iterdir()) == ["autorate.json", "bufferbloat.json"]


def test_bench_refuses_an_unknown_name_and_lists_the_known(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert cli.main(["bench", "--out", str(tmp_path), "shaper", "nosuch"]) == 2
    err = capsys.readouterr().err
    assert "no benchmark named nosuch" in err and "aggregate" in err and "stream" in err
    assert not tmp_path.exists() or not any(tmp_path.iterdir())  # nothing ran


def _make_dry_run(target: str, arch: str) -> str:
    proc = subprocess.run(
        ["make", "-s", "-n", "--no-print-directory", "-C", str(REPO), target, f"DEB_ARCH={arch}"],
        capture_output=True,
        text=True,
        check=True,
        timeout=30,
    )
    return proc.stdout


@pytest.mark.parametrize(
    ("arch", "flavour"),
    [("amd64", "amd64"), ("arm64", "arm64"), ("armhf", "armmp"), ("riscv64", "riscv64")],
)
def test_kernel_packages_follow_the_architecture(arch: str, flavour: str) -> None:
    packages = _make_dry_run("deb-packages", arch).split()
    assert f"linux-headers-{flavour}" in packages
    assert packages[packages.index("--kernel-flavour") + 1] == f'"{flavour}"'
    vm = {"linux-image-amd64", "qemu-system-x86", "busybox-static"}
    if arch == "amd64":
        assert vm <= set(packages)
    else:
        assert not vm & set(packages)
        assert not any(p.startswith(("linux-headers-amd64", "linux-image-")) for p in packages)


def test_unknown_architecture_is_refused_by_name() -> None:
    packages = _make_dry_run("deb-packages", "mips64el").split()
    assert packages[packages.index("--kernel-flavour") + 1] == '""'
    script = str(REPO / "gateway" / "setup-host.sh")
    setup = subprocess.run(
        ["bash", script, "--arch", "mips64el", "--kernel-flavour", "", "iproute2"],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert setup.returncode == 1
    assert "no Debian kernel flavour known for architecture 'mips64el'" in setup.stderr


def test_vm_tier_says_it_is_x86_only_elsewhere() -> None:
    dry = _make_dry_run("test-vm", "arm64")
    assert "runs on x86-64 (amd64) hosts only; this one is arm64" in dry
    assert "tests.vm.run" not in dry
    assert "tests.vm.run" in _make_dry_run("test-vm", "amd64")


def test_make_test_runs_every_quick_benchmark_once() -> None:
    # The wheel tier runs the quick benchmarks from the installed wheel; the checkout runs
    # exactly those the wheel skips for a harness or an extra, so none is left out.
    from tests.wheel.run import EXTRA_BENCHMARKS, HARNESS_BENCHMARKS

    dry = _make_dry_run("test", "amd64")
    assert "tests.wheel.run" in dry
    runs = [line.split() for line in dry.splitlines() if "desanet bench --quick" in line]
    assert len(runs) == 1, runs
    named = set(runs[0][runs[0].index("/tmp/desanet-bench") + 1 :])
    assert named == HARNESS_BENCHMARKS.keys() | EXTRA_BENCHMARKS.keys()
