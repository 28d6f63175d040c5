"""The console's HTTPS certificate: the operator's own, or a self-signed one made on first start.

The generated key is written 0600 next to the certificate in the console's
state directory and kept across restarts, so a browser that was told to
trust it once keeps trusting it.
"""

from __future__ import annotations

import datetime as dt
import ipaddress
import socket
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from desanet.durable import create_private, replace_atomically

CERT_FILE = "console-cert.pem"
KEY_FILE = "console-key.pem"
VALID_DAYS = 3650


def ensure_self_signed(state_dir: Path, host: str) -> tuple[Path, Path]:
    """The certificate and key files in `state_dir`, made (self-signed) when missing."""
    cert_path, key_path = state_dir / CERT_FILE, state_dir / KEY_FILE
    if cert_path.exists() and key_path.exists():
        return cert_path, key_path
    key = ec.generate_private_key(ec.SECP256R1())
    names: list[x509.GeneralName] = [x509.DNSName("localhost"), x509.DNSName(socket.gethostname())]
    for address in {host, "127.0.0.1", "::1"}:
        try:
            names.append(x509.IPAddress(ipaddress.ip_address(address)))
        except ValueError:
            if address:
                names.append(x509.DNSName(address))
    subject = x509.Name(
        [x509.NameAttribute(NameOID.COMMON_NAME, f"desanet console {socket.gethostname()}")]
    )
    now = dt.datetime.now(dt.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(days=1))
        .not_valid_after(now + dt.timedelta(days=VALID_DAYS))
        .add_extension(x509.SubjectAlternativeName(names), critical=False)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .sign(key, hashes.SHA256())
    )
    state_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
    key_path.unlink(missing_ok=True)
    create_private(
        key_path,
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        ),
    )
    replace_atomically(cert_path, cert.public_bytes(serialization.Encoding.PEM), mode=0o644)
    return cert_path, key_path
