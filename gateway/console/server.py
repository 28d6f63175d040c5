"""Serves the console with gunicorn: HTTPS (self-signed unless given a certificate), or HTTP
on loopback.

One worker process with threads: the login limits and the status cache live
in that process, and a handful of operators never need more. The worker
builds the application itself (after the fork), so the usage-history thread
runs where the requests are served.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from gunicorn.app.base import BaseApplication

from desanet.gateway.console.wiring import Options, build_app


class ConsoleServer(BaseApplication):
    """gunicorn, configured in code (no command line or config file of its own)."""

    def __init__(
        self,
        options: Options,
        bind: str,
        certfile: Path | None,
        keyfile: Path | None,
        threads: int = 8,
    ) -> None:
        self.options = options
        self.settings: dict[str, Any] = {
            "bind": [bind],
            "workers": 1,
            "worker_class": "gthread",
            "threads": threads,
            "timeout": 60,
            "graceful_timeout": 5,
            "accesslog": "-",
            "errorlog": "-",
            "proc_name": "desanet-console",
            "certfile": str(certfile) if certfile else None,
            "keyfile": str(keyfile) if keyfile else None,
        }
        super().__init__()

    def load_config(self) -> None:
        for key, value in self.settings.items():
            if value is not None:
                self.cfg.set(key, value)

    def load(self) -> Any:
        return build_app(self.options)
