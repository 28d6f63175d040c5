"""The adaptive link rate against a fixed rate, on a satellite link whose capacity drops.

A lab village behind an emulated modem (tests.vm.autorate: netem delay, then
a tbf at the modem's capacity with a 400 ms dumb buffer), the real datapath
with passive RTT, the real shaper, and the service's latency step. The
idle subscriber pings while the others download; the capacity steps from
12 to 4.8 Mbit/s and back to 12 under a configured 10 Mbit/s (the issue's
20 -> 8 -> 20, scaled to what the VM carries under TCG). Per link (LEO 40 ms
with 5 ms of jitter, GEO 600 ms) the same run with a fixed rate (the peer:
what sqm and LibreQoS do) and with `[link] adapt`, one after the other:

- `rtt_p95_inflation_ms_<fixed|adaptive>_<leo|geo>`: the idle subscriber's
  p95 ping RTT in the low-capacity phase (after its settle time) over its
  idle median;
- `utilisation_adaptive_<leo|geo>`: the lowest of the adaptive run's phases
  (`_steady`, `_low`, `_back` beside it): delivered download over what the
  link could carry under `max` (min(capacity, configured));
- `changes_steady_adaptive_<leo|geo>`: rate changes on the steady link;
- `rtt_p95_inflation_ms_adaptive_leo_sawtooth`, `utilisation_adaptive_leo_sawtooth`:
  LEO with 5 ms of netem jitter (on the paced return half, so not reordered)
  and a slow sawtooth of capacity, 12 -> 4.8 -> 12 Mbit/s over 120 s (set anew
  each second), adaptive only (utilisation over what the link could carry
  under `max`);
- `rtt_error_ms`: the largest gap between the datapath's passive WAN RTT
  (p50 of the downloads' TCP timestamps) and the median of the gateway's own
  pings to the internet host (the same path) during the steady phase, and
  in the adaptive runs' low phase;
- `rtt_error_ms_queued_<leo|geo>`: in the fixed run's low phase, where the
  modem's queue (its tbf's backlog, read once a second, `modem_q_ms`) is
  hundreds of ms, the gap between the passive WAN RTT and the configured
  delay plus that queue; `rtt_samples_below_pings_ms_queued_<leo|geo>`: how
  far the passive median sits below the gateway's pings there.

Like benchmarks/bufferbloat.py it needs netem and a stock kernel: on the host
it boots Debian's kernel (tests.vm.machine) and runs itself inside. `--quick`
skips: the VM tier's tests/vm/test_autorate.py runs shorter LEO and GEO runs of
the same experiment in every `make test`.
"""

from __future__ import annotations

import os
import sys

from desanet.benchmarks.common import Report, parse_args, run_in_guest, vm_unavailable_reason

REPORT_NAME = "autorate"
COLUMNS = [
    "link",
    "case",
    "base_ms",
    "low_p95_ms",
    "inflation_ms",
    "util_steady",
    "util_low",
    "util_back",
    "rate_mbit",
    "wan_ms",
    "changes_steady",
    "modem_q_ms",
]


def measure(report: Report) -> None:
    """Inside the VM: build the village and gateway, run both links both ways, fill `report`."""
    from desanet.gateway.lab import village
    from tests.vm import autorate, satlink

    # GEO looks past the rate that queued only 100 round trips (a minute) after the cut:
    # its way back gets the time to find the capacity again. The fixed runs' way back
    # shows nothing new.
    phases = {
        ("LEO", False): autorate.Phases(steady_s=8.0, low_s=24.0, settle_s=8.0),
        ("LEO", True): autorate.Phases(8.0, 24.0, 8.0, back_s=30.0, back_settle_s=15.0),
        ("GEO", False): autorate.Phases(12.0, 45.0, 20.0, warmup_s=10.0),
        ("GEO", True): autorate.Phases(12.0, 45.0, 20.0, 100.0, 65.0, warmup_s=10.0),
    }
    errors = []
    with village(4) as v:
        satlink.start_servers(v)
        gw = satlink.Gateway(v)
        gw.start()
        try:
            for link in (autorate.LEO_JITTER, autorate.GEO):
                for adapt in (False, True):
                    r = autorate.capacity_drop(v, gw, link, adapt, phases[link.name, adapt])
                    case = "adaptive" if adapt else "fixed"
                    print(f"note: {link.name} {case}: {r}", flush=True)
                    report.add(
                        link=link.name,
                        case=case,
                        base_ms=r.base_ms,
                        low_p95_ms=r.low_p95_ms,
                        inflation_ms=r.inflation_ms,
                        util_steady=r.steady_utilisation,
                        util_low=r.low_utilisation,
                        util_back=r.back_utilisation,
                        rate_mbit=r.low_rate_bps / 1e6,
                        wan_ms=r.steady_wan_p50_ms,
                        changes_steady=r.steady_changes,
                        modem_q_ms=r.low_modem_queue_ms,
                    )
                    name = link.name.lower()
                    report.headline[f"rtt_p95_inflation_ms_{case}_{name}"] = round(
                        r.inflation_ms, 1
                    )
                    errors.append(abs(r.steady_wan_p50_ms - r.steady_gateway_ping_ms))
                    if not adapt:
                        queued = abs(r.low_wan_p50_ms - (link.rtt_ms + r.low_modem_queue_ms))
                        report.headline[f"rtt_error_ms_queued_{name}"] = round(queued, 1)
                        report.headline[f"rtt_samples_below_pings_ms_queued_{name}"] = round(
                            r.low_gateway_ping_ms - r.low_wan_p50_ms, 1
                        )
                        continue
                    errors.append(abs(r.low_wan_p50_ms - r.low_gateway_ping_ms))
                    shares = {
                        "steady": r.steady_utilisation,
                        "low": r.low_utilisation,
                        "back": r.back_utilisation,
                    }
                    report.headline[f"utilisation_adaptive_{name}"] = round(min(shares.values()), 3)
                    for phase, share in shares.items():
                        report.headline[f"utilisation_adaptive_{name}_{phase}"] = round(share, 3)
                    report.headline[f"changes_steady_adaptive_{name}"] = r.steady_changes
            # LEO with 5 ms of jitter, the capacity a slow sawtooth 12 -> 4.8 -> 12 Mbit/s.
            # Rain fades over minutes: two minutes down and up again.
            saw = autorate.sawtooth(v, gw, autorate.LEO_JITTER, adapt=True)
            print(f"note: LEO sawtooth with jitter, adaptive: {saw}", flush=True)
            report.add(
                link="LEO jitter",
                case="adaptive sawtooth",
                base_ms=saw.base_ms,
                low_p95_ms=saw.p95_ms,
                inflation_ms=saw.inflation_ms,
                util_low=saw.utilisation,
            )
            report.headline["rtt_p95_inflation_ms_adaptive_leo_sawtooth"] = round(
                saw.inflation_ms, 1
            )
            report.headline["utilisation_adaptive_leo_sawtooth"] = round(saw.utilisation, 3)
        finally:
            gw.stop()
    report.headline["rtt_error_ms"] = round(max(errors), 1)
    report.notes.append(
        "capacity 12 -> 4.8 -> 12 Mbit/s under a configured 10 Mbit/s; modem buffer 400 ms; "
        "inflation: p95 ping RTT of the idle subscriber in the low phase minus its idle median; "
        "phases (s): LEO steady 8, low 24 (measured after 8), back 30 (after 15); GEO steady "
        "12, low 45 (after 20), back 100 (after 65)"
    )
    report.notes.append(
        "sawtooth: LEO with netem jitter 5 ms on the return half (paced, so not reordered), "
        "capacity 12 -> 4.8 -> 12 Mbit/s over 120 s, set anew each second; utilisation over "
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
            "runs shorter LEO and GEO runs of the same experiment in the VM tier"
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
