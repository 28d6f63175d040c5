"""The adaptive link rate against a fixed rate, on a satellite link whose capacity drops.

A lab village behind an emulated modem (tests.vm.autorate: netem delay, then
a tbf at the modem's capacity with a 400 ms dumb buffer), the real datapath
with passive RTT, the real shaper, and the service's latency step. The
idle subscriber pings while the others download; the capacity steps from
12 to 5 Mbit/s under a configured 10 Mbit/s. Per link (LEO 40 ms, GEO
600 ms) the same run with a fixed rate (the peer: what sqm and LibreQoS do)
and with `[link] adapt`, alternating:

- `rtt_p95_inflation_ms_<fixed|adaptive>_<leo|geo>`: the idle subscriber's
  p95 ping RTT in the low-capacity phase over its idle median;
- `utilisation_adaptive_<leo|geo>`: delivered download over the low capacity;
- `rtt_p95_inflation_ms_adaptive_leo_sawtooth`, `utilisation_adaptive_leo_sawtooth`:
  LEO with 5 ms of netem jitter (on the paced return half, so not reordered)
  and a slow sawtooth of capacity, 12 -> 5 -> 12 Mbit/s over 24 s, adaptive
  only (utilisation over what the link could carry under `max`);
- `rtt_error_ms`: the largest gap between the datapath's passive WAN RTT
  (p50 of the downloads' TCP timestamps) and the median of the gateway's own
  pings to the internet host (the same path) during the steady phase.

Like benchmarks/bufferbloat.py it needs netem and a stock kernel: on the host
it boots Debian's kernel (tests.vm.machine) and runs itself inside. `--quick`
skips: the VM tier's tests/vm/test_autorate.py runs the LEO half of the same
experiment in every `make test`.
"""

from __future__ import annotations

import os
import sys

from desanet.benchmarks.common import Report, parse_args, run_in_guest, vm_unavailable_reason

REPORT_NAME = "autorate"
COLUMNS = ["link", "case", "base_ms", "low_p95_ms", "inflation_ms", "util", "rate_mbit", "wan_ms"]


def measure(report: Report) -> None:
    """Inside the VM: build the village and gateway, run both links both ways, fill `report`."""
    from desanet.gateway.lab import village
    from tests.vm import autorate, satlink

    durations = {
        "LEO": {"steady_s": 8.0, "low_s": 24.0, "settle_s": 8.0},
        "GEO": {"steady_s": 12.0, "low_s": 45.0, "settle_s": 20.0},
    }
    errors = []
    with village(4) as v:
        satlink.start_servers(v)
        gw = satlink.Gateway(v)
        gw.start()
        try:
            for link in (autorate.LEO, autorate.GEO):
                for adapt in (False, True):
                    d = durations[link.name]
                    r = autorate.capacity_drop(
                        v,
                        gw,
                        link,
                        adapt,
                        steady_s=d["steady_s"],
                        low_s=d["low_s"],
                        settle_s=d["settle_s"],
                    )
                    case = "adaptive" if adapt else "fixed"
                    print(f"note: {link.name} {case}: {r}", flush=True)
                    report.add(
                        link=link.name,
                        case=case,
                        base_ms=r.base_ms,
                        low_p95_ms=r.low_p95_ms,
                        inflation_ms=r.inflation_ms,
                        util=r.low_utilisation,
                        rate_mbit=r.low_rate_bps / 1e6,
                        wan_ms=r.steady_wan_p50_ms,
                    )
                    name = link.name.lower()
                    report.headline[f"rtt_p95_inflation_ms_{case}_{name}"] = round(
                        r.inflation_ms, 1
                    )
                    if adapt:
                        report.headline[f"utilisation_adaptive_{name}"] = round(
                            r.low_utilisation, 3
                        )
                    errors.append(abs(r.steady_wan_p50_ms - r.steady_gateway_ping_ms))
            # LEO with 5 ms of jitter, the capacity a slow sawtooth 12 -> 5 -> 12 Mbit/s.
            saw = autorate.sawtooth(v, gw, autorate.LEO_JITTER, adapt=True)
            print(f"note: LEO sawtooth with jitter, adaptive: {saw}", flush=True)
            report.add(
                link="LEO jitter",
                case="adaptive sawtooth",
                base_ms=saw.base_ms,
                low_p95_ms=saw.p95_ms,
                inflation_ms=saw.inflation_ms,
                util=saw.utilisation,
                rate_mbit=float("nan"),
                wan_ms=float("nan"),
            )
            report.headline["rtt_p95_inflation_ms_adaptive_leo_sawtooth"] = round(
                saw.inflation_ms, 1
            )
            report.headline["utilisation_adaptive_leo_sawtooth"] = round(saw.utilisation, 3)
        finally:
            gw.stop()
    report.headline["rtt_error_ms"] = round(max(errors), 1)
    report.notes.append(
        "capacity 12 -> 5 Mbit/s under a configured 10 Mbit/s; modem buffer 400 ms; "
        "inflation: p95 ping RTT of the idle subscriber in the low phase minus its idle median"
    )
    report.notes.append(
        "sawtooth: LEO with netem jitter 5 ms on the return half (paced, so not reordered), "
        "capacity 12 -> 5 -> 12 Mbit/s over 24 s, a step a second; utilisation over "
        "min(capacity, max)"
    )


def main() -> int:
    """Entry point: measure inside the VM, or boot one and measure there."""
    args = parse_args(__doc__ or REPORT_NAME)
    report = Report(REPORT_NAME, COLUMNS, quick=args.quick)
    reason = vm_unavailable_reason()
    if reason is None and args.quick:
        reason = (
            "the quick run skips it: its VM runs take minutes; tests/vm/test_autorate.py "
            "runs the LEO half of the same experiment in the VM tier"
        )
    if reason is not None:
        report.skip(args, reason)
        return 0
    from tests.vm.guest import IN_VM_ENV

    if os.environ.get(IN_VM_ENV) != "1":
        return run_in_guest("autorate", args, timeout_s=1200)
    measure(report)
    report.finish(args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
