"""Subscriber prefixes and MACs: parsing, validation and their datapath keys.

IPv4 and IPv6 share one trie: an IPv4 prefix a.b.c.d/n is stored as the
IPv4-mapped IPv6 prefix ::ffff:a.b.c.d/(96 + n), so one lookup serves both.
"""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Iterable

from desanet.errors import ValidationError

Network = ipaddress.IPv4Network | ipaddress.IPv6Network
# The key as the trie sees it: (prefix length in the 128-bit space, 16 address bytes).
KeyTuple = tuple[int, bytes]

_V4_MAPPED = bytes(10) + b"\xff\xff"
_MAC = re.compile(r"[0-9a-f]{2}([:-])[0-9a-f]{2}(\1[0-9a-f]{2}){4}", re.IGNORECASE)


def parse_prefix(text: str) -> Network:
    """Parse "10.0.0.5", "10.0.1.0/24" or "2001:db8::/56" into a network.

    A bare address is a host prefix (/32 or /128). Host bits set below the
    prefix length are an error, since they usually mean a typo.
    """
    raw = text.strip()
    if not raw:
        raise ValidationError("empty prefix")
    try:
        return ipaddress.ip_network(raw, strict=True)
    except ValueError as err:
        try:
            loose = ipaddress.ip_network(raw, strict=False)
        except ValueError:
            raise ValidationError(f"{raw!r} is not an IPv4/IPv6 address or prefix") from err
        raise ValidationError(f"prefix {raw} has host bits set: did you mean {loose}?") from err


def parse_prefixes(text: str) -> list[Network]:
    """Parse a space-separated list of prefixes (the subscribers.csv `prefixes` field)."""
    prefixes = [parse_prefix(item) for item in text.split()]
    if not prefixes:
        raise ValidationError("no prefix given")
    seen: set[Network] = set()
    for prefix in prefixes:
        if prefix in seen:
            raise ValidationError(f"prefix {prefix} is listed twice")
        seen.add(prefix)
    return prefixes


def key_of(prefix: Network) -> KeyTuple:
    """The trie key of a prefix: length in the 128-bit space and the 16 address bytes."""
    if prefix.version == 4:
        return 96 + prefix.prefixlen, _V4_MAPPED + prefix.network_address.packed
    return prefix.prefixlen, prefix.network_address.packed


def prefix_of(key: KeyTuple) -> Network:
    """Inverse of `key_of`."""
    length, addr = key
    if addr[:12] == _V4_MAPPED and length >= 96:
        return ipaddress.IPv4Network((addr[12:], length - 96))
    return ipaddress.IPv6Network((addr, length))


def check_unique(owners: Iterable[tuple[str, Iterable[Network]]]) -> None:
    """Refuse the same prefix on two subscribers (nested prefixes are fine: the longest wins)."""
    owner_of: dict[Network, str] = {}
    for subscriber, prefixes in owners:
        for prefix in prefixes:
            other = owner_of.setdefault(prefix, subscriber)
            if other != subscriber:
                raise ValidationError(
                    f"subscriber {subscriber}: prefix {prefix} is already {other}'s"
                )


def parse_mac(text: str) -> bytes:
    """Parse "02:00:5e:10:00:01" (or with dashes) into 6 bytes; group and zero MACs are refused.

    A device's own MAC is unicast; a multicast or broadcast one can be no
    subscriber's source, and binding one would mean a typo.
    """
    raw = text.strip()
    if not _MAC.fullmatch(raw):
        raise ValidationError(f"{raw!r} is not a MAC address (like 02:00:5e:10:00:01)")
    mac = bytes.fromhex(raw.replace(":", "").replace("-", ""))
    if mac[0] & 1:
        raise ValidationError(f"MAC {raw} is a multicast/broadcast address, no device's own")
    if mac == bytes(6):
        raise ValidationError(f"MAC {raw} is all zeros, no device's own")
    return mac


def format_mac(mac: bytes) -> str:
    """The canonical form of a MAC: lower case, colons."""
    return ":".join(f"{b:02x}" for b in mac)
