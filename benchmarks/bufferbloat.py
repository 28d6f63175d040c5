"""Bufferbloat at satellite delay: RTT under load per leaf kind, utilisation with derived AQM times.

The development kernel has neither fq_codel, cake nor netem, so on the host
this module boots Debian's stock kernel (tests.vm.machine) and runs itself
inside it, where tests.vm.guest sets DESANET_IN_VM=1. Inside, a lab village
with the real datapath and shaper sits behind an emulated link:

- LEO (40 ms, 50/10 Mbit/s): an idle subscriber's median ping RTT, idle and
  while the other subscribers download greedily, with fq_codel, cake and pfifo
  leaves measured in the same run (pfifo is the peer: no AQM, no flow queues);
  also the RTT a downloading subscriber's own pings see.
- GEO (600 ms, 20/5 Mbit/s): every subscriber downloads; utilisation of the
  link and Jain's fairness index, fq_codel with AQM times derived from the
  600 ms RTT against the 5 ms / 100 ms defaults (the peer).

The VM harness (tests/vm) lives in the source checkout, not in the installed
package, and boots an amd64 kernel: elsewhere the benchmark says why and skips.
"""

from __future__ import annotations

import os
import sys

from desanet.benchmarks.common import Report, parse_args, run_in_guest, vm_unavailable_reason

QUICK_IN_VM = "DESANET_BENCH_VM_QUICK"
REPORT_NAME = "bufferbloat"
COLUMNS = ["link", "case", "idle_ms", "loaded_ms", "inflation_ms", "own_ms", "util", "jain"]


def _durations(quick: bool) -> dict[str, float]:
    if quick:
        return {"idle_s": 1.5, "warmup_s": 2.0, "load_s": 3.0, "geo_warmup_s": 5.0, "window_s": 4.0}
    return {"idle_s": 5.0, "warmup_s": 4.0, "load_s": 12.0, "geo_warmup_s": 10.0, "window_s": 40.0}


def measure(report: Report) -> None:
    """Inside the VM: build the village and gateway, run both experiments, fill `report`."""
    from desanet.gateway.lab import village
    from tests.vm import bloat, satlink

    d = _durations(report.quick)
    with village(4) as v:
        satlink.start_servers(v)
        gw = satlink.Gateway(v)
        gw.start()
        try:
            latency = bloat.latency_under_load(
                v, gw, satlink.LEO, idle_s=d["idle_s"], warmup_s=d["warmup_s"], load_s=d["load_s"]
            )
            geo = bloat.utilisation_at(
                v, gw, satlink.GEO, warmup_s=d["geo_warmup_s"], window_s=d["window_s"]
            )
        finally:
            gw.stop()
    for r in latency:
        report.add(
            link="LEO",
            case=f"{r.leaf} leaves",
            idle_ms=r.idle_ms,
            loaded_ms=r.loaded_ms,
            inflation_ms=r.inflation_ms,
            own_ms=r.busy_ms,
            util=r.utilisation,
        )
        report.headline[f"rtt_inflation_ms_{r.leaf}"] = round(r.inflation_ms, 2)
        report.headline[f"rtt_inflation_ms_{r.leaf}_downloader"] = round(r.busy_inflation_ms, 2)
    for g in geo:
        report.add(
            link="GEO",
            case=f"fq_codel {g.setting} ({g.target_us / 1000:g}/{g.interval_us / 1000:g} ms)",
            util=g.utilisation,
            jain=g.jain,
        )
    by_setting = {g.setting: g for g in geo}
    report.headline["jain_geo"] = round(by_setting["derived"].jain, 4)
    report.headline["utilisation_geo_derived"] = round(by_setting["derived"].utilisation, 4)
    report.headline["utilisation_geo_default"] = round(by_setting["default"].utilisation, 4)
    by_leaf = {r.leaf: r for r in latency}
    report.notes.append(
        "inflation_ms: the idle subscriber's median RTT under load minus idle; own_ms: the "
        "median RTT of a downloading subscriber's own pings, sharing its class and leaf"
    )
    report.notes.append(
        f"downloader's RTT inflation pfifo / fq_codel: "
        f"{by_leaf['pfifo'].busy_inflation_ms:.1f} / {by_leaf['fq_codel'].busy_inflation_ms:.1f} "
        f"ms; GEO utilisation derived / default: "
        f"{by_setting['derived'].utilisation / max(by_setting['default'].utilisation, 1e-9):.2f}x"
    )


def main() -> int:
    """Entry point: measure inside the VM, or boot one and measure there."""
    args = parse_args(__doc__ or REPORT_NAME)
    report = Report(REPORT_NAME, COLUMNS, quick=args.quick)
    reason = vm_unavailable_reason()
    if reason is not None:
        report.skip(args, reason)
        return 0
    from tests.vm.guest import IN_VM_ENV

    if os.environ.get(IN_VM_ENV) != "1":
        if args.quick and os.environ.get(QUICK_IN_VM) != "1":
            # Booting the VM and compiling the datapath under TCG take over two minutes,
            # most of what a quick run would cost; the VM tier runs the same experiment.
            report.skip(
                args,
                "the quick run skips it: its VM boot and datapath compile take minutes; "
                "tests/vm/test_bufferbloat.py runs the same experiment in the VM tier "
                f"({QUICK_IN_VM}=1 runs it anyway)",
            )
            return 0
        return run_in_guest("bufferbloat", args, timeout_s=600 if args.quick else 1200)
    measure(report)
    report.finish(args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
