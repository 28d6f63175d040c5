"""The operator's console during `desanet demo`: started on the demo village, checked, stopped.

The service runs in the gateway's network namespace, the console in the
host's, so a browser on this machine reaches it at https://127.0.0.1:PORT/.
They meet through what the console always uses: the status file in the state
directory and the service's endpoints, which the demo binds as `ipc://`
sockets in its work directory (reachable from both namespaces, and from
nowhere else). The demo adds one operator with a password made for the run.
"""

from __future__ import annotations

import contextlib
import os
import secrets
import signal
import socket
import ssl
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

from desanet.errors import DesanetError

USER = "demo"
START_TIMEOUT_S = 60.0


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


class DemoConsole:
    """`desanet console` on the demo's configuration, in this (the host's) namespace."""

    def __init__(self, config: Path, workdir: Path) -> None:
        self.state = workdir / "console"
        self.log = workdir / "console.log"
        self.port = _free_port()
        self.url = f"https://127.0.0.1:{self.port}/"
        self.password = secrets.token_urlsafe(9)
        cli = [sys.executable, "-m", "desanet.gateway.cli", "console"]
        added = subprocess.run(
            [*cli, "user", "add", USER, "--role", "operator", "--state", str(self.state)],
            input=self.password + "\n",
            capture_output=True,
            text=True,
            timeout=60,
        )
        if added.returncode != 0:
            raise DesanetError(f"the demo could not add its console user: {added.stderr.strip()}")
        with open(self.log, "wb") as log:
            self.process = subprocess.Popen(
                [
                    *cli,
                    "--config",
                    str(config),
                    "--state",
                    str(self.state),
                    "--listen",
                    f"127.0.0.1:{self.port}",
                ],
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )

    def answers(self, timeout_s: float = START_TIMEOUT_S) -> bool:
        """True once the login page is served over HTTPS (self-signed: not verified here)."""
        context = ssl.create_default_context()
        context.check_hostname = False
        context.verify_mode = ssl.CERT_NONE
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline and self.process.poll() is None:
            try:
                with urllib.request.urlopen(self.url + "login", context=context, timeout=5) as r:
                    return bool(r.status == 200)
            except (urllib.error.URLError, ConnectionError, TimeoutError):
                time.sleep(0.5)
        return False

    def close(self) -> None:
        """Stop the console (it is the demo's own process group)."""
        if self.process.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.process.pid, signal.SIGTERM)
            try:
                self.process.wait(timeout=20)
            except subprocess.TimeoutExpired:
                os.killpg(self.process.pid, signal.SIGKILL)
                self.process.wait()
