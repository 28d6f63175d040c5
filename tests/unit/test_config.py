"""Configuration checks: every error class names the file, the line and the field."""

from __future__ import annotations

from pathlib import Path

import pytest

from desanet.errors import ConfigError
from desanet.gateway.config import load_config, parse_config

pytestmark = pytest.mark.unit

GOOD = """\
[gateway]
id = "desa-sukamaju"
lan = "br-lan"
state_dir = "state"

[link]
down = "20mbit"
up = "5mbit"

[shaping]
leaf = "fq_codel"
rtt = "600ms"

[meter]
interval = "1s"

[publish]
usage = "tcp://127.0.0.1:7570"
replay = "tcp://127.0.0.1:7571"
plaintext = true

[subscribers]
file = "subscribers.csv"
"""


def parse(text: str) -> object:
    return parse_config(text, Path("/etc/desanet/gateway.toml"))


def test_good_config_parses_with_units_and_paths() -> None:
    cfg = parse_config(GOOD, Path("/etc/desanet/gateway.toml"))
    assert cfg.gateway_id == "desa-sukamaju"
    assert cfg.link.down_bps == 20_000_000 and cfg.link.up_bps == 5_000_000
    assert cfg.shaping.rtt_ms == 600 and cfg.shaping.leaf == "fq_codel"
    assert cfg.interval_ms == 1000
    assert cfg.state_dir == Path("/etc/desanet/state")
    assert cfg.subscribers_file == Path("/etc/desanet/subscribers.csv")
    assert cfg.control.suspend == "wall"
    assert cfg.metrics_listen is None


@pytest.mark.parametrize(
    ("old", "new", "message"),
    [
        ('up = "5mbit"', 'up = "5 megabit"', r"gateway.toml:8: \[link\] up: rate '5 megabit'"),
        ('down = "20mbit"', "down = 20", r"gateway.toml:7: \[link\] down: expected a str"),
        ('leaf = "fq_codel"', 'leaf = "sfq"', r":11: \[shaping\] leaf: 'sfq' is not one of"),
        ('rtt = "600ms"', 'rtt = "0ms"', r":12: \[shaping\] rtt: duration '0ms' must be above"),
        ('interval = "1s"', 'interval = "10ms"', r":15: \[meter\] interval: 10 ms must be"),
        ('id = "desa-sukamaju"', 'id = "Desa Sukamaju"', r":2: \[gateway\] id: 'Desa Sukamaju'"),
        ('lan = "br-lan"', 'lan = "a very long interface"', r":3: \[gateway\] lan: .* not an"),
        ('lan = "br-lan"', 'lna = "br-lan"', r":3: \[gateway\] lna: unknown field"),
        ('lan = "br-lan"\n', "", r":1: \[gateway\]: missing field 'lan'"),
        ("[meter]", "[metre]", r":14: \[metre\]: unknown section"),
        ('interval = "1s"', 'interval = "1s', r"gateway.toml:15: not valid TOML"),
        ("plaintext = true", "", r"\[publish\]: set secret_key and allowed_keys"),
        ('usage = "tcp://127.0.0.1:7570"', 'usage = "udp://x"', r":18: \[publish\] usage: 'udp"),
        (
            'usage = "tcp://127.0.0.1:7570"',
            'usage = "tcp://0.0.0.0:7570"',
            r":18: \[publish\] usage: .* plaintext is only allowed on loopback",
        ),
    ],
)
def test_each_error_names_file_line_and_field(old: str, new: str, message: str) -> None:
    assert old in GOOD
    with pytest.raises(ConfigError, match=message):
        parse(GOOD.replace(old, new, 1))


def test_missing_section_is_named() -> None:
    text = GOOD.replace('[subscribers]\nfile = "subscribers.csv"\n', "")
    with pytest.raises(ConfigError, match=r"missing section \[subscribers\]"):
        parse(text)


def test_optional_sections_are_checked() -> None:
    text = GOOD + '\n[control]\nsuspend = "drop"\n\n[metrics]\nlisten = "nowhere"\n'
    with pytest.raises(ConfigError, match=r":26: \[control\] suspend: 'drop' is not one of"):
        parse(text)
    text = GOOD + '\n[metrics]\nlisten = "nowhere"\n'
    with pytest.raises(ConfigError, match=r":26: \[metrics\] listen: 'nowhere': use host:port"):
        parse(text)
    cfg = parse_config(GOOD + '\n[metrics]\nlisten = "127.0.0.1:9570"\n', Path("g.toml"))
    assert cfg.metrics_listen == ("127.0.0.1", 9570)


def test_unreadable_file_is_named(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"nothere.toml: cannot read the configuration"):
        load_config(tmp_path / "nothere.toml")


def test_shipped_examples_are_valid() -> None:
    from desanet.gateway.registry import load_subscribers

    example = Path(__file__).parents[2] / "gateway" / "example.toml"
    cfg = load_config(example)
    assert cfg.metrics_listen == ("127.0.0.1", 9570) and not cfg.publish.plaintext
    subs = load_subscribers(example.with_name("example-subscribers.csv"), cfg.link, cfg.capacity)
    assert [s.id for s in subs] == ["s001", "s002", "s003", "s004"]


def test_control_keys_are_their_own_list_and_need_curve() -> None:
    where = Path("/etc/desanet/gateway.toml")
    curve = GOOD.replace(
        "plaintext = true", 'secret_key = "keys/gw.key_secret"\nallowed_keys = "keys/readers"'
    )
    cfg = parse_config(curve + '[control]\nallowed_keys = "keys/controllers"\n', where)
    assert cfg.publish.allowed_keys == Path("/etc/desanet/keys/readers")
    assert cfg.control.allowed_keys == Path("/etc/desanet/keys/controllers")
    assert parse_config(curve, where).control.allowed_keys is None
    with pytest.raises(
        ConfigError, match=r"gateway.toml:\d+: \[control\] allowed_keys: needs CURVE"
    ):
        parse(GOOD + '[control]\nallowed_keys = "keys/controllers"\n')


def test_metrics_listen_on_loopback_unless_remote_is_allowed() -> None:
    with pytest.raises(
        ConfigError,
        match=r":26: \[metrics\] listen: 0.0.0.0:9570 is reachable from other machines and "
        r"metrics are not authenticated: listen on 127.0.0.1 .* or set allow_remote = true",
    ):
        parse(GOOD + '\n[metrics]\nlisten = "0.0.0.0:9570"\n')
    for host in ("192.168.1.1:9570", "[::]:9570"):
        with pytest.raises(ConfigError, match="metrics are not authenticated"):
            parse(GOOD + f'\n[metrics]\nlisten = "{host}"\n')
    for local in ("127.0.0.1:9570", "[::1]:9570", "localhost:9570"):
        assert parse_config(GOOD + f'\n[metrics]\nlisten = "{local}"\n', Path("g.toml"))
    cfg = parse_config(
        GOOD + '\n[metrics]\nlisten = "0.0.0.0:9570"\nallow_remote = true\n', Path("g.toml")
    )
    assert cfg.metrics_listen == ("0.0.0.0", 9570)
    with pytest.raises(ConfigError, match=r"\[metrics\] allow_remote: expected a bool"):
        parse(GOOD + '\n[metrics]\nlisten = "0.0.0.0:9570"\nallow_remote = "yes"\n')


def test_reload_settle_and_grace_periods() -> None:
    cfg = parse_config(GOOD, Path("g.toml"))
    assert cfg.settle_ms == 2_000 and cfg.grace_ms == 7 * 86_400_000
    text = GOOD.replace('file = "subscribers.csv"', 'file = "s.csv"\nsettle = "5s"\ngrace = "30d"')
    cfg = parse_config(text, Path("g.toml"))
    assert cfg.settle_ms == 5_000 and cfg.grace_ms == 30 * 86_400_000
    for field, value, message in (
        ("settle", "50ms", r"\[subscribers\] settle: 50 ms must be between 100ms and 10m"),
        ("grace", "30s", r"\[subscribers\] grace: 30000 ms is under a minute"),
        ("grace", "7 days", r"\[subscribers\] grace: .*'days' \(use us, ms, s, m, h, d"),
    ):
        text = GOOD.replace('file = "subscribers.csv"', f'file = "s.csv"\n{field} = "{value}"')
        with pytest.raises(ConfigError, match=rf":24: {message}"):
            parse(text)


def test_a_configuration_with_a_byte_order_mark_is_read(tmp_path: Path) -> None:
    path = tmp_path / "gateway.toml"
    path.write_bytes(b"\xef\xbb\xbf" + GOOD.encode())
    assert load_config(path).gateway_id == "desa-sukamaju"
