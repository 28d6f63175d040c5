"""Server time of the operator's console: the subscribers page and the live update, at 1,000 and
10,000 subscribers.

desanet: `GET /subscribers` (search, sort and paging on the server, 50 rows
rendered) and `GET /api/live` for the 50 ids of that page, through the whole
Flask application (session, CSRF machinery, Babel formatting, templates) with
the WSGI test client, so no network time is counted. "cold" rewrites the
service's status file before every request, so each one parses it again, as
when the service wrote a new snapshot since the previous poll; "warm" reuses
the parsed snapshot (several browsers polling one snapshot).

Peers, same run, alternating: the same page rendered with every subscriber in
one table (no paging: the naive way, same template and formatting, so only
the row count differs), and the raw status as JSON (`read_snapshot` +
`json.dumps`, what `desanet status --json` does: the floor for handing the
data to a page that would render it in the browser). Headline:
subscribers_page_ms_1000, subscribers_page_ms_10000 (cold), live_update_ms_1000,
live_update_ms_10000 (cold).
"""

from __future__ import annotations

import importlib.util
import json
import re
import tempfile
import time
from collections.abc import Callable
from dataclasses import asdict, replace
from pathlib import Path
from typing import TYPE_CHECKING

from desanet.benchmarks.common import Report, median, parse_args
from desanet.gateway.status import StatusSnapshot, SubscriberStatus, read_snapshot, write_snapshot

if TYPE_CHECKING:
    from flask.testing import FlaskClient

SIZES = (1_000, 10_000)
HTTPS = "https://localhost"
PASSWORD = "benchmark password"
CONFIG = """[gateway]
id = "bench"
lan = "br-lan"
state_dir = "state"
capacity = 65536
[link]
down = "10gbit"
up = "10gbit"
[publish]
usage = "tcp://127.0.0.1:17570"
replay = "tcp://127.0.0.1:17571"
plaintext = true
[subscribers]
file = "subscribers.csv"
"""


def _address(i: int) -> str:
    return f"10.{i // 65536 % 256}.{i // 256 % 256}.{i % 256}"


def _snapshot(n: int, t_ms: int) -> StatusSnapshot:
    rows = [
        SubscriberStatus(
            id=f"s{i:05d}",
            name=f"Pelanggan {i}",
            slot=i,
            state="active" if i % 17 else "suspended (wall)",
            down_max_bps=10_000_000,
            up_max_bps=2_000_000,
            down_bps=float(i * 7919 % 10_000_000),
            up_bps=float(i * 104_729 % 2_000_000),
            down_total=i * 1_000_003,
            up_total=i * 100_003,
            period_bytes=i * 1_100_006,
            quota_bytes=50_000_000_000 if i % 3 else None,
        )
        for i in range(1, n + 1)
    ]
    return StatusSnapshot(
        "bench", t_ms, t_ms - 60_000, 10**10, 10**10, "fq_codel", "fq_codel", 1, rows
    )


class Village:
    """A console over a status and a subscribers file of `n` subscribers in a temporary folder."""

    def __init__(self, folder: Path, n: int) -> None:
        self.state = folder / "state"
        self.state.mkdir()
        (folder / "gateway.toml").write_text(CONFIG)
        header = "id,name,prefixes,down_min,down_max,up_min,up_max,quota\n"
        lines = [
            f"s{i:05d},Pelanggan {i},{_address(i)},8kbit,10mbit,8kbit,2mbit,50GB"
            for i in range(1, n + 1)
        ]
        (folder / "subscribers.csv").write_text(header + "\n".join(lines) + "\n")
        self.snapshot = _snapshot(n, time.time_ns() // 1_000_000)
        write_snapshot(self.state, self.snapshot)
        from desanet.gateway.console.app import Settings, create_app
        from desanet.gateway.console.wiring import Options, build_console

        options = Options(folder / "gateway.toml", folder / "console", "Asia/Jakarta", True)
        console, _config = build_console(options)
        console.users.add("bench", "viewer", PASSWORD)
        self.app = create_app(console, Settings(b"b" * 32, True, "Asia/Jakarta"))
        self.client = self.app.test_client()
        self.client.environ_base["HTTP_ACCEPT_LANGUAGE"] = "id"
        _login(self.client)
        first = self.get("/subscribers")
        self.page_ids = re.findall(r'data-live-row="([^"]+)" data-live-key="down"', first)

    def touch_status(self) -> None:
        """A new snapshot, as the service writes every interval."""
        self.snapshot = replace(self.snapshot, t_ms=self.snapshot.t_ms + 1000)
        write_snapshot(self.state, self.snapshot)

    def get(self, path: str) -> str:
        reply = self.client.get(path, base_url=HTTPS)
        if reply.status_code != 200:
            raise RuntimeError(f"GET {path}: {reply.status_code}")
        return reply.get_data(as_text=True)


def _login(client: FlaskClient) -> None:
    page = client.get("/login", base_url=HTTPS).get_data(as_text=True)
    match = re.search(r'name="csrf_token" type="hidden" value="([^"]+)"', page)
    if match is None:
        raise RuntimeError("no CSRF token on the login page")
    reply = client.post(
        "/login",
        data={"name": "bench", "password": PASSWORD, "csrf_token": match.group(1)},
        base_url=HTTPS,
        headers={"Referer": HTTPS + "/"},
    )
    if reply.status_code != 302:
        raise RuntimeError(f"benchmark login refused ({reply.status_code})")


def _ms(fn: Callable[[], object], before: Callable[[], None] | None, repeat: int) -> float:
    times = []
    for _ in range(repeat):
        if before is not None:
            before()
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return median(times) * 1000


def _cases(v: Village) -> dict[str, tuple[Callable[[], object], Callable[[], None] | None]]:
    live = "/api/live?ids=" + ",".join(v.page_ids)
    from desanet.gateway.console import views

    page_size = views.PAGE_SIZE

    def full_table() -> str:
        # The naive console: every subscriber in one table (same template and formatting).
        views.PAGE_SIZE = 10**9
        try:
            return v.get("/subscribers")
        finally:
            views.PAGE_SIZE = page_size

    def raw_json() -> str:
        return json.dumps(asdict(read_snapshot(v.state)))

    return {
        "desanet page, cold": (lambda: v.get("/subscribers"), v.touch_status),
        "desanet page, warm": (lambda: v.get("/subscribers"), None),
        "desanet page sorted by rate, cold": (
            lambda: v.get("/subscribers?sort=down&dir=desc"),
            v.touch_status,
        ),
        "desanet live update, cold": (lambda: v.get(live), v.touch_status),
        "desanet live update, warm": (lambda: v.get(live), None),
        "peer: every row in one page, cold": (full_table, v.touch_status),
        "peer: raw status JSON": (raw_json, v.touch_status),
    }


def main() -> None:
    args = parse_args(__doc__ or "console benchmark")
    repeat, rounds = (3, 1) if args.quick else (10, 3)
    report = Report(
        name="console", columns=["case", "subscribers", "ms", "vs_page"], quick=args.quick
    )
    if importlib.util.find_spec("flask") is None:
        report.skip(args, "it needs the console extra: pip install 'desanet[console]'")
        return
    results: dict[tuple[str, int], list[float]] = {}
    sizes_bytes: dict[tuple[str, int], int] = {}
    with tempfile.TemporaryDirectory(prefix="desanet-bench-console-") as tmp:
        villages = {}
        for n in SIZES:
            folder = Path(tmp) / str(n)
            folder.mkdir()
            villages[n] = Village(folder, n)
        for _ in range(rounds):
            for n, village in villages.items():
                for case, (fn, before) in _cases(village).items():
                    results.setdefault((case, n), []).append(_ms(fn, before, repeat))
                    if (case, n) not in sizes_bytes:
                        sizes_bytes[(case, n)] = len(str(fn()))
    figures: dict[tuple[str, int], float] = {key: median(v) for key, v in results.items()}
    for (case, n), ms in figures.items():
        page = figures[("desanet page, cold", n)]
        report.add(case=case, subscribers=n, ms=ms, vs_page=ms / page)
    report.headline = {
        "subscribers_page_ms_1000": figures[("desanet page, cold", 1000)],
        "subscribers_page_ms_10000": figures[("desanet page, cold", 10000)],
        "live_update_ms_1000": figures[("desanet live update, cold", 1000)],
        "live_update_ms_10000": figures[("desanet live update, cold", 10000)],
        "full_table_ms_10000": figures[("peer: every row in one page, cold", 10000)],
        "raw_status_json_ms_10000": figures[("peer: raw status JSON", 10000)],
    }
    for n in SIZES:
        report.notes.append(
            f"{n} subscribers: page {sizes_bytes[('desanet page, cold', n)] // 1024} KiB, live "
            f"update {sizes_bytes[('desanet live update, cold', n)] // 1024} KiB, full table "
            f"{sizes_bytes[('peer: every row in one page, cold', n)] // 1024} KiB, raw JSON "
            f"{sizes_bytes[('peer: raw status JSON', n)] // 1024} KiB"
        )
    report.notes.append(
        f"median of {rounds} alternating rounds of {repeat} requests each; in-process WSGI "
        "(Flask test client), one thread; 'cold' parses a new status file in the request"
    )
    report.finish(args)


if __name__ == "__main__":
    main()
