"""Subscriber prefixes: parsing, operator-facing errors, and their trie keys."""

from __future__ import annotations

import ipaddress

import pytest

from desanet.ebpf.prefixes import check_unique, key_of, parse_prefix, parse_prefixes, prefix_of
from desanet.errors import ValidationError

pytestmark = pytest.mark.unit


def test_bare_addresses_are_host_prefixes() -> None:
    assert parse_prefix("10.0.0.5") == ipaddress.ip_network("10.0.0.5/32")
    assert parse_prefix(" 2001:db8::7 ") == ipaddress.ip_network("2001:db8::7/128")


def test_host_bits_are_refused_with_a_suggestion() -> None:
    with pytest.raises(ValidationError, match=r"host bits set: did you mean 10\.0\.1\.0/24"):
        parse_prefix("10.0.1.7/24")


@pytest.mark.parametrize(
    "text", ["10.0.0.300", "10.0.0.0/33", "fe80::/129", "sukamaju", "10.0.0.0/-1"]
)
def test_garbage_is_refused(text: str) -> None:
    with pytest.raises(ValidationError, match="not an IPv4/IPv6 address or prefix"):
        parse_prefix(text)


def test_list_parsing_refuses_empty_and_duplicates() -> None:
    assert len(parse_prefixes("10.0.0.1 2001:db8::/64")) == 2
    with pytest.raises(ValidationError, match="no prefix"):
        parse_prefixes("   ")
    with pytest.raises(ValidationError, match="listed twice"):
        parse_prefixes("10.0.0.1 10.0.0.1/32")


def test_ipv4_keys_are_ipv4_mapped() -> None:
    length, addr = key_of(parse_prefix("192.0.2.0/24"))
    assert length == 96 + 24
    assert addr == bytes(10) + b"\xff\xff" + bytes([192, 0, 2, 0])
    assert prefix_of((length, addr)) == ipaddress.ip_network("192.0.2.0/24")


def test_ipv6_keys_round_trip() -> None:
    prefix = parse_prefix("2001:db8:77::/48")
    assert key_of(prefix) == (48, prefix.network_address.packed)
    assert prefix_of(key_of(prefix)) == prefix


def test_same_prefix_on_two_subscribers_names_both() -> None:
    nested = [("s001", [parse_prefix("10.1.0.0/16")]), ("s002", [parse_prefix("10.1.2.0/24")])]
    check_unique(nested)  # nested prefixes are fine: the longest wins
    clash = [("s003", [parse_prefix("10.9.0.0/24")]), ("s017", [parse_prefix("10.9.0.0/24")])]
    with pytest.raises(
        ValidationError, match=r"subscriber s017: prefix 10\.9\.0\.0/24 is already s003's"
    ):
        check_unique(clash)
