"""`desanet console user ...` and the console's refusals before it serves anything."""

from __future__ import annotations

import sqlite3
import stat
import subprocess
import sys
from pathlib import Path

import pytest
from cryptography import x509

from desanet.gateway.console.store import DB_FILE, Database
from desanet.gateway.console.tls import ensure_self_signed
from desanet.gateway.console.users import UserStore

pytestmark = pytest.mark.unit

CLI = [sys.executable, "-m", "desanet.gateway.cli"]


def desanet(*args: str, stdin: str = "") -> subprocess.CompletedProcess[str]:
    return subprocess.run([*CLI, *args], input=stdin, capture_output=True, text=True, timeout=60)


def test_user_add_reads_the_password_from_stdin_and_stores_an_argon2_hash(tmp_path: Path) -> None:
    state = tmp_path / "console"
    done = desanet(
        "console",
        "user",
        "add",
        "siti",
        "--role",
        "operator",
        "--state",
        str(state),
        stdin="kata sandi rahasia\n",
    )
    assert done.returncode == 0, done.stderr
    assert "siti added (operator)" in done.stdout
    assert stat.S_IMODE((state / DB_FILE).stat().st_mode) == 0o600
    with sqlite3.connect(state / DB_FILE) as db:
        (digest,) = db.execute("SELECT hash FROM users WHERE name = 'siti'").fetchone()
    assert digest.startswith("$argon2id$") and "rahasia" not in digest
    users = UserStore(Database(state))
    assert users.verify("siti", "kata sandi rahasia") is not None
    assert users.verify("siti", "kata sandi salah") is None
    again = desanet("console", "user", "add", "siti", "--state", str(state), stdin="another one!\n")
    assert again.returncode == 2 and "already exists" in again.stderr
    short = desanet("console", "user", "add", "budi", "--state", str(state), stdin="short\n")
    assert short.returncode == 2 and "at least 8 characters" in short.stderr
    listed = desanet("console", "user", "list", "--state", str(state))
    assert listed.stdout.split() == ["siti", "operator"]


def test_plain_http_is_refused_off_loopback(tmp_path: Path) -> None:
    done = desanet(
        "console",
        "--listen",
        "0.0.0.0:8080",
        "--plain-http",
        "--state",
        str(tmp_path),
        "--config",
        str(tmp_path / "none.toml"),
    )
    assert done.returncode == 2
    assert "plain HTTP is only allowed on loopback" in done.stderr


def test_the_self_signed_certificate_is_made_once_with_a_private_key(tmp_path: Path) -> None:
    cert_path, key_path = ensure_self_signed(tmp_path, "10.77.0.1")
    assert stat.S_IMODE(key_path.stat().st_mode) == 0o600
    cert = x509.load_pem_x509_certificate(cert_path.read_bytes())
    names = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert "10.77.0.1" in [str(ip) for ip in names.get_values_for_type(x509.IPAddress)]
    first = cert_path.read_bytes()
    ensure_self_signed(tmp_path, "10.77.0.1")
    assert cert_path.read_bytes() == first
