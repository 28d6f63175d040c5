"""CURVE keys and ZAP authentication for the usage and replay endpoints.

The gateway holds one CURVE key pair (the server key); billing systems each
hold their own pair and are allowed by listing their public keys. Keys are
ZeroMQ certificate files (`desanet keygen`): `<name>.key` holds the public
key, `<name>.key_secret` both. Plaintext is refused unless configured AND
every endpoint is loopback-only, so usage never crosses a link in clear.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

import zmq
import zmq.auth
from zmq.auth.thread import ThreadAuthenticator

from desanet.durable import create_private, replace_atomically
from desanet.errors import ConfigError
from desanet.validate import is_loopback

log = logging.getLogger(__name__)

ZAP_DOMAIN = "desanet"
# A server socket without its own frame size limit gets this one.
DEFAULT_MAX_FRAME_BYTES = 64 * 1024
PUBLIC = 0o644  # a public key file is meant to be handed out


@dataclass(frozen=True)
class KeyPair:
    """A CURVE key pair in Z85 text (40 bytes each); `secret` is None for a public-only file."""

    public: bytes
    secret: bytes | None = None


@dataclass(frozen=True)
class ServerSecurity:
    """How the gateway's endpoints authenticate: a CURVE server key and allowed client keys."""

    server: KeyPair | None = None
    allowed_clients: frozenset[bytes] = field(default_factory=frozenset)
    plaintext: bool = False

    def __post_init__(self) -> None:
        if not self.plaintext and (self.server is None or self.server.secret is None):
            raise ConfigError(
                "the usage stream needs the gateway's CURVE secret key "
                "(`desanet keygen`), or plaintext = true on loopback endpoints"
            )


@dataclass(frozen=True)
class ClientSecurity:
    """How a billing client connects: the gateway's public key and its own key pair."""

    server_public: bytes | None = None
    client: KeyPair | None = None

    @property
    def plaintext(self) -> bool:
        return self.server_public is None


def generate_keypair(directory: Path, name: str) -> tuple[Path, Path]:
    """Write `<name>.key` (public) and `<name>.key_secret` (secret, mode 0600) in `directory`.

    The secret file is created 0600 (never with wider permissions, not even
    for a moment) and an existing one is never overwritten: a new pair would
    lock out every client that trusts the old one.
    """
    if not name or "/" in name or name.startswith("."):
        raise ConfigError(
            f"key name {name!r}: use a plain file name such as 'gateway' or 'billing'"
        )
    directory.mkdir(parents=True, exist_ok=True)
    public, secret = directory / f"{name}.key", directory / f"{name}.key_secret"
    public_key, secret_key = zmq.curve_keypair()
    try:
        create_private(secret, _certificate(public_key, secret_key))
    except FileExistsError:
        raise ConfigError(
            f"{secret} exists: keep it, or move it aside first (clients that trust its "
            "public key would be locked out by a new one)"
        ) from None
    replace_atomically(public, _certificate(public_key, None), mode=PUBLIC)
    return public, secret


def _certificate(public_key: bytes, secret_key: bytes | None) -> bytes:
    """A ZeroMQ certificate file, as `zmq.auth.load_certificate` reads it."""
    kind = "Public" if secret_key is None else "**Secret**"
    lines = [f"#   ZeroMQ CURVE {kind} Certificate", "", "metadata", "curve"]
    lines.append(f'    public-key = "{public_key.decode()}"')
    if secret_key is not None:
        lines.append(f'    secret-key = "{secret_key.decode()}"')
    return ("\n".join(lines) + "\n").encode()


def load_keypair(path: Path) -> KeyPair:
    """Read a certificate file written by `desanet keygen` (public or secret)."""
    try:
        public, secret = zmq.auth.load_certificate(str(path))
    except (OSError, ValueError) as err:
        raise ConfigError(f"cannot read CURVE key file {path}: {err}") from err
    if public is None or len(public) != 40:
        raise ConfigError(f"{path} holds no CURVE public key")
    return KeyPair(public, secret)


def load_allowed_keys(path: Path) -> frozenset[bytes]:
    """Allowed client public keys: a directory of `*.key` files, or Z85 keys one a line."""
    if path.is_dir():
        return frozenset(load_keypair(p).public for p in sorted(path.glob("*.key")))
    try:
        lines = path.read_text().splitlines()
    except OSError as err:
        raise ConfigError(f"cannot read the allowed keys file {path}: {err}") from err
    keys = set()
    for number, line in enumerate(lines, 1):
        text = line.split("#", 1)[0].strip()
        if not text:
            continue
        if len(text) != 40:
            raise ConfigError(f"{path}:{number}: a CURVE public key is 40 Z85 characters")
        keys.add(text.encode())
    return frozenset(keys)


class _AllowedKeys:
    """ZAP credentials provider: a client is let in only if its public key is listed."""

    def __init__(self, keys: Iterable[bytes]) -> None:
        self.keys = frozenset(keys)
        self._logged: dict[bytes, float] = {}

    def callback(self, domain: str, key: bytes) -> bool:
        if key in self.keys:
            return True
        # A refused client reconnects every few hundred ms: one line per key a minute.
        now = time.monotonic()
        if now - self._logged.get(key, -60.0) >= 60.0:
            if len(self._logged) > 1000:
                self._logged.clear()
            self._logged[key] = now
            log.warning("refused a client with unknown CURVE key %s", key.decode(errors="replace"))
        return False


def start_authenticator(
    ctx: zmq.Context[zmq.Socket[bytes]], security: ServerSecurity
) -> ThreadAuthenticator | None:
    """Start the ZAP handler of `ctx` (CURVE mode only); the caller stops it on close."""
    if security.plaintext:
        return None
    auth = ThreadAuthenticator(ctx, log=logging.getLogger("meter.zap"))
    auth.start()
    auth.configure_curve_callback(
        domain=ZAP_DOMAIN, credentials_provider=_AllowedKeys(security.allowed_clients)
    )
    return auth


def secure_server(sock: zmq.Socket[bytes], security: ServerSecurity, endpoint: str) -> None:
    """Make `sock` a CURVE server (or check plaintext is allowed) before binding `endpoint`.

    Bytes arrive before the handshake decides who sent them (a 600 MiB frame
    header is read before any key is checked), so no server socket leaves here
    without a frame size limit: the caller's (meter.limits), else
    `DEFAULT_MAX_FRAME_BYTES`. libzmq closes the connection of a bigger frame.
    """
    if sock.getsockopt(zmq.MAXMSGSIZE) == -1:
        sock.maxmsgsize = DEFAULT_MAX_FRAME_BYTES
    if security.plaintext:
        if not is_loopback(endpoint):
            raise ConfigError(
                f"plaintext usage stream on {endpoint}: plaintext is allowed only on loopback "
                "(127.0.0.1, ::1, ipc://); configure CURVE keys for other addresses"
            )
        return
    if security.server is None or security.server.secret is None:
        raise ConfigError("CURVE server socket without the gateway's secret key")
    sock.curve_server = True
    sock.curve_secretkey = security.server.secret
    sock.curve_publickey = security.server.public
    sock.zap_domain = ZAP_DOMAIN.encode()


def secure_client(sock: zmq.Socket[bytes], security: ClientSecurity) -> None:
    """Make `sock` a CURVE client of the gateway (a fresh key pair if it brings none)."""
    if security.server_public is None:
        return
    client = security.client
    if client is None or client.secret is None:
        public, secret = zmq.curve_keypair()
        client = KeyPair(public, secret)
    sock.curve_serverkey = security.server_public
    sock.curve_publickey = client.public
    sock.curve_secretkey = client.secret


def load_server_security(
    secret_key: Path | None, allowed_keys: Path | None, plaintext: bool
) -> ServerSecurity:
    """The security of a gateway endpoint from its key files (or plaintext, loopback only)."""
    if plaintext:
        return ServerSecurity(plaintext=True)
    if secret_key is None or allowed_keys is None:
        raise ConfigError("CURVE needs the gateway's secret key and a list of allowed client keys")
    return ServerSecurity(
        server=load_keypair(secret_key), allowed_clients=load_allowed_keys(allowed_keys)
    )
