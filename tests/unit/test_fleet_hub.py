"""`desanet hub init` on a real nats-server: each gateway may speak only as itself, over TLS."""

from __future__ import annotations

import asyncio
import contextlib
import ssl
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from pathlib import Path

import nats
import nkeys
import pytest
from nats.aio.client import Client
from nats.js.errors import NoStreamResponseError

from desanet.errors import ConfigError, ValidationError
from desanet.gateway.cli import main
from desanet.meter import fleet
from desanet.meter.fleet_hub import HubFiles, HubTLS, init_hub
from tests.fleet_harness import NatsHub, TLSFiles, make_tls, nats_hub

pytestmark = pytest.mark.unit


@dataclass
class Hub:
    """A running one-node hub configured by `desanet hub init`, with its files."""

    nats: NatsHub
    files: HubFiles
    tls: TLSFiles


@pytest.fixture(scope="module")
def hub(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Hub]:
    tmp = tmp_path_factory.mktemp("hub")
    tls = make_tls(tmp / "tls")
    out = tmp / "conf"
    cli = ["hub", "init", "gw-a", "gw-b", "--out", str(out), "--billing", "billing"]
    assert main([*cli, "--tls-cert", str(tls.cert), "--tls-key", str(tls.key)]) == 0
    files = init_hub(out, ["gw-a", "gw-b"], HubTLS(tls.cert, tls.key), billing=["billing"])
    assert files.created == [], "a second run must keep every key"
    with nats_hub(tmp / "nodes", include=files.config, tls=tls) as nats_:
        asyncio.run(_create_stream(nats_.urls, files, tls))
        yield Hub(nats_, files, tls)


def _conn(hub_: Hub, user: str, inbox: str, credentials: Path) -> fleet.FleetConnection:
    return fleet.FleetConnection(hub_.nats.urls, credentials, user, inbox, hub_.tls.ca)


async def _create_stream(urls: list[str], files: HubFiles, tls: TLSFiles) -> None:
    """The collector's credentials are enough to create the stream from stream.json."""
    conn = fleet.FleetConnection(
        urls, files.collectors["collector"], "collector", fleet.collector_inbox("collector"), tls.ca
    )
    nc = await nats.connect(**conn.connect_options())
    try:
        await fleet.ensure_stream(nc.jetstream(), fleet.load_stream_config(files.stream))
    finally:
        await nc.close()


@contextlib.asynccontextmanager
async def _gateway(hub_: Hub, gw: str, errors: list[str]) -> AsyncIterator[Client]:
    async def on_error(err: Exception) -> None:
        errors.append(str(err))

    conn = _conn(hub_, gw, fleet.gateway_inbox(gw), hub_.files.gateways[gw])
    nc = await nats.connect(**conn.connect_options(), error_cb=on_error)
    try:
        yield nc
    finally:
        await nc.close()


async def _stream_subjects(hub_: Hub) -> dict[str, int]:
    """Messages per subject in the stream, read with the collector's credentials."""
    conn = _conn(
        hub_, "collector", fleet.collector_inbox("collector"), hub_.files.collectors["collector"]
    )
    nc = await nats.connect(**conn.connect_options())
    try:
        info = await nc.jetstream().stream_info(fleet.STREAM, subjects_filter=">")
        return dict(info.state.subjects or {})
    finally:
        await nc.close()


def test_a_gateway_publishes_as_itself_and_not_as_another(hub: Hub) -> None:
    async def run() -> tuple[list[str], bool]:
        errors: list[str] = []
        async with _gateway(hub, "gw-a", errors) as nc:
            js = nc.jetstream()
            headers = {fleet.MSG_ID_HEADER: fleet.message_id("gw-a", "e1", 1)}
            ack = await js.publish(fleet.usage_subject("gw-a"), b"mine", headers=headers)
            assert ack.stream == fleet.STREAM
            refused = False
            try:
                await js.publish(fleet.usage_subject("gw-b"), b"forged", timeout=1)
            except (nats.errors.TimeoutError, NoStreamResponseError):
                refused = True
            await nc.flush()
            await asyncio.sleep(0.2)  # the server's -ERR reaches the error callback
        return errors, refused

    errors, refused = asyncio.run(run())
    assert refused, "the hub stored a message gw-a published as gw-b"
    assert any(
        "permissions violation for publish" in e.lower() and '"desanet.usage.gw-b"' in e
        for e in errors
    ), errors
    subjects = asyncio.run(_stream_subjects(hub))
    assert "desanet.usage.gw-b" not in subjects
    assert subjects == {"desanet.usage.gw-a": 1}


def test_a_gateway_reads_only_its_own_control_subject(hub: Hub) -> None:
    async def run() -> tuple[list[str], bytes]:
        errors: list[str] = []
        async with _gateway(hub, "gw-a", errors) as nc:
            own = await nc.subscribe(fleet.control_subject("gw-a"))
            await nc.subscribe(fleet.control_subject("gw-b"))
            await nc.subscribe("desanet.usage.>")
            await nc.flush()
            await asyncio.sleep(0.2)
            async with _gateway(hub, "gw-b", []) as other:
                # gw-b may not publish control requests either: only billing sends them.
                await other.publish(fleet.control_subject("gw-a"), b"from gw-b")
                await other.flush()
            data = b""
            with contextlib.suppress(nats.errors.TimeoutError):
                data = (await own.next_msg(timeout=0.5)).data
        return errors, data

    errors, data = asyncio.run(run())
    lowered = [e.lower() for e in errors]
    assert any('subscription to "desanet.control.gw-b"' in e for e in lowered), errors
    assert any('subscription to "desanet.usage.>"' in e for e in lowered), errors
    assert data == b"", "gw-b reached gw-a's control subject"


def test_billing_reaches_one_gateway_s_control_and_only_that_gateway_hears_it(hub: Hub) -> None:
    async def run() -> tuple[bytes, bytes, list[str], list[str]]:
        b_errors: list[str] = []
        async with _gateway(hub, "gw-a", []) as gw_a, _gateway(hub, "gw-b", b_errors) as gw_b:
            own = await gw_a.subscribe(fleet.control_subject("gw-a"))
            # gw-b tries to listen in on gw-a's control, as a whole wildcard too.
            stolen = await gw_b.subscribe(fleet.CONTROL_PREFIX + ">")
            await gw_a.flush()
            await gw_b.flush()
            await asyncio.sleep(0.2)
            billing_errors: list[str] = []

            async def on_error(err: Exception) -> None:
                billing_errors.append(str(err))

            conn = _conn(
                hub, "billing", fleet.billing_inbox("billing"), hub.files.billing["billing"]
            )
            billing = await nats.connect(**conn.connect_options(), error_cb=on_error)
            try:
                await billing.publish(fleet.control_subject("gw-a"), b"suspend s1")
                # The control role does not read usage.
                await billing.subscribe(fleet.USAGE_SUBJECTS)
                await billing.flush()
                await asyncio.sleep(0.2)
            finally:
                await billing.close()
            got = (await own.next_msg(timeout=2)).data
            overheard = b""
            with contextlib.suppress(nats.errors.TimeoutError):
                overheard = (await stolen.next_msg(timeout=0.5)).data
        return got, overheard, b_errors, billing_errors

    got, overheard, b_errors, billing_errors = asyncio.run(run())
    assert got == b"suspend s1"
    assert overheard == b"", "gw-b received gw-a's control request"
    assert any('subscription to "desanet.control.>"' in e.lower() for e in b_errors), b_errors
    assert any('subscription to "desanet.usage.>"' in e.lower() for e in billing_errors)


def test_unknown_keys_and_plaintext_are_refused(hub: Hub, tmp_path: Path) -> None:
    stranger = tmp_path / "stranger.nk"
    stranger.write_bytes(nkeys.encode_seed(b"\x01" * 32, nkeys.PREFIX_BYTE_USER))
    conn = _conn(hub, "gw-a", fleet.gateway_inbox("gw-a"), stranger)

    async def connect(options: dict[str, object]) -> None:
        options |= {"max_reconnect_attempts": 0, "allow_reconnect": False}
        nc = await nats.connect(**options)  # type: ignore[arg-type]
        await nc.close()

    with pytest.raises(nats.errors.Error, match=r"(?i)authorization"):
        asyncio.run(connect(conn.connect_options()))
    plain = _conn(hub, "gw-a", fleet.gateway_inbox("gw-a"), hub.files.gateways["gw-a"])
    options = plain.connect_options()
    options["servers"] = [u.replace("tls://", "nats://") for u in options["servers"]]
    del options["tls"]
    # The server demands TLS even on a nats:// URL; without the hub's CA the client
    # cannot verify it and gives up, rather than falling back to clear text.
    with pytest.raises(ssl.SSLCertVerificationError):
        asyncio.run(connect(options))


def test_hub_init_keeps_keys_and_checks_ids(tmp_path: Path) -> None:
    first = init_hub(tmp_path, ["gw1"], None)
    seed = first.gateways["gw1"].read_bytes()
    assert first.gateways["gw1"].stat().st_mode & 0o077 == 0
    second = init_hub(tmp_path, ["gw1", "gw2"], None, replicas=3)
    assert second.created == [tmp_path / "gateways" / "gw2.nk"]
    assert second.gateways["gw1"].read_bytes() == seed
    text = second.config.read_text()
    public = nkeys.from_seed(bytearray(seed.strip())).public_key.decode()
    assert f"gateway gw1: {public}" in text and '"desanet.usage.gw2"' in text
    assert fleet.load_stream_config(second.stream)["num_replicas"] == 3
    with pytest.raises(ValidationError, match="gateway id"):
        init_hub(tmp_path, ["Bad.Id"], None)
    with pytest.raises(ConfigError, match="twice: gw1"):
        init_hub(tmp_path, ["gw1", "gw1"], None)
    ids = tmp_path / "ids.txt"
    ids.write_text("# district A\ngw3\n\ngw4  # new\n")
    assert main(["hub", "init", "--gateways-file", str(ids), "--out", str(tmp_path)]) == 0
    assert '"desanet.usage.gw4"' in second.config.read_text()
    assert '"desanet.usage.gw1"' not in second.config.read_text(), "gw1 left the list"
