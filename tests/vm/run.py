"""`make test-vm`: boot the stock kernel once and run every test marked `vm` inside it.

Exit code: pytest's, with two stricter rules: a VM that did not boot (or hung)
is a failure with its console log printed, never a skip; and a run that
collected no tests (pytest's 5) is a failure too.
"""

from __future__ import annotations

import argparse
import sys
import time

from tests.vm.machine import VmError, run_in_vm

# One boot for the whole tier; its tests budget about three minutes under TCG.
DEFAULT_TIMEOUT_S = 900.0


def main(argv: list[str] | None = None) -> int:
    """Run the VM tier; extra arguments go to pytest (e.g. `-k shaper`)."""
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--timeout", type=float, default=DEFAULT_TIMEOUT_S, help="seconds")
    args, pytest_args = parser.parse_known_args(argv)
    command = [
        sys.executable,
        "-m",
        "pytest",
        "-m",
        "vm",
        "-p",
        "no:cacheprovider",
        "tests/vm",
        *pytest_args,
    ]
    start = time.monotonic()
    try:
        run = run_in_vm(command, timeout_s=args.timeout)
    except VmError as exc:
        print(f"test-vm: {exc}", file=sys.stderr)
        return 1
    elapsed = time.monotonic() - start
    if not run.booted:
        print(run.console, file=sys.stderr)
        why = "timed out" if run.timed_out else "stopped"
        print(
            f"test-vm: FAILED: the stock kernel did not boot ({why} after {elapsed:.0f} s, "
            f"{run.accel}); its console log is above",
            file=sys.stderr,
        )
        return 1
    if not run.finished or run.exit_code is None:
        print(run.console_after_boot(), file=sys.stderr)
        why = f"timed out after {args.timeout:.0f} s" if run.timed_out else "the guest died"
        print(f"test-vm: FAILED: {why} while testing; guest console above", file=sys.stderr)
        return 1
    code = run.exit_code
    summary = f"Linux {run.guest_kernel} under {run.accel}, {elapsed:.0f} s including boot"
    if code == 5:
        print(f"test-vm: FAILED: no tests collected ({summary})", file=sys.stderr)
        return 1
    if code != 0:
        print(run.console_after_boot(), file=sys.stderr)
        print(f"test-vm: FAILED with pytest exit code {code} ({summary})", file=sys.stderr)
        return code
    print(f"test-vm: passed ({summary})", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
