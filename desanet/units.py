"""Parsing of the units operators write: tc-style rates, byte sizes, durations."""

import re

from desanet.errors import ValidationError

_RATE_UNITS = {
    "bit": 1,
    "kbit": 1_000,
    "mbit": 1_000_000,
    "gbit": 1_000_000_000,
    "bps": 8,
    "kbps": 8_000,
    "mbps": 8_000_000,
    "gbps": 8_000_000_000,
}
_SIZE_UNITS = {
    "b": 1,
    "kb": 1_000,
    "mb": 1_000_000,
    "gb": 1_000_000_000,
    "tb": 1_000_000_000_000,
    "kib": 1 << 10,
    "mib": 1 << 20,
    "gib": 1 << 30,
    "tib": 1 << 40,
}
_TIME_UNITS = {
    "us": 0.001,
    "ms": 1.0,
    "s": 1000.0,
    "m": 60_000.0,
    "h": 3_600_000.0,
    "d": 86_400_000.0,
}
_NUMBER = re.compile(r"^\s*([0-9]+(?:\.[0-9]+)?)\s*([a-zA-Z]*)\s*$")
# Bounds on what an operator or a billing system can mean, so that a value that
# parses is one every part can store, pack and compute with (no float overflow,
# nothing past SQLite's and msgpack's 64-bit integers).
MAX_DIGITS = 20
MAX_RATE_BPS = 10**12  # 1 Tbit/s
MAX_BYTES = 10**18  # 1 EB
MAX_DURATION_MS = 365 * 86_400_000.0


def _split(text: str, what: str) -> tuple[float, str]:
    match = _NUMBER.match(text) if isinstance(text, str) else None
    if not match:
        raise ValidationError(f"{what} {text!r} is not a number with a unit")
    number = match.group(1)
    if len(number) > MAX_DIGITS:
        raise ValidationError(f"{what} {text[:30]!r}...: more than {MAX_DIGITS} digits")
    return float(number), match.group(2).lower()


def parse_rate_bps(text: str) -> int:
    """Parse a tc-style rate ("512kbit", "2mbit", "1.5mbit") into bits per second.

    tc's units: `bit`/`kbit`/`mbit`/`gbit` are bits, `bps`/`kbps`/... are bytes.
    """
    value, unit = _split(text, "rate")
    if unit not in _RATE_UNITS:
        raise ValidationError(f"rate {text!r}: unknown unit {unit!r} (use kbit, mbit, gbit)")
    rate = round(value * _RATE_UNITS[unit])
    if rate <= 0:
        raise ValidationError(f"rate {text!r} must be above zero")
    if rate > MAX_RATE_BPS:
        raise ValidationError(f"rate {text!r} is above {format_rate(MAX_RATE_BPS)}")
    return rate


def parse_bytes(text: str) -> int:
    """Parse a byte size ("50GB", "512MiB", "1000") into bytes (GB = 10^9, GiB = 2^30)."""
    value, unit = _split(text, "size")
    unit = unit or "b"
    if unit not in _SIZE_UNITS:
        raise ValidationError(f"size {text!r}: unknown unit {unit!r} (use MB, GB, TB, GiB)")
    size = round(value * _SIZE_UNITS[unit])
    if size > MAX_BYTES:
        raise ValidationError(f"size {text!r} is above {format_bytes(MAX_BYTES)}")
    return size


def parse_duration_ms(text: str) -> float:
    """Parse a duration ("600ms", "1s", "250us", "7d") into milliseconds."""
    value, unit = _split(text, "duration")
    if unit not in _TIME_UNITS:
        raise ValidationError(f"duration {text!r}: unknown unit {unit!r} (use us, ms, s, m, h, d)")
    duration = value * _TIME_UNITS[unit]
    if duration <= 0:
        raise ValidationError(f"duration {text!r} must be above zero")
    if duration > MAX_DURATION_MS:
        raise ValidationError(f"duration {text!r} is above a year")
    return duration


def format_rate(rate_bps: float) -> str:
    """Render bits per second for people: "19.2 Mbit/s"."""
    for unit, scale in (("Gbit/s", 1e9), ("Mbit/s", 1e6), ("kbit/s", 1e3)):
        if rate_bps >= scale:
            return f"{rate_bps / scale:.1f} {unit}"
    return f"{rate_bps:.0f} bit/s"


def format_bytes(count: float) -> str:
    """Render a byte count for people: "1.25 GB"."""
    for unit, scale in (("TB", 1e12), ("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if count >= scale:
            return f"{count / scale:.2f} {unit}"
    return f"{count:.0f} B"
