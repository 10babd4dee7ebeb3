"""Byte counts people write: '20GB', '500MB', '1.5GiB', '2_000_000_000', '1.5e9' -> an int of bytes.

One parser for every flag and variable that takes bytes (the trainer's --max_cache_bytes, the drop-in's
SHARDSTREAM_*_BYTES). Decimal units (KB, MB, GB, TB = 10**3..10**12) and binary ones (KiB..TiB); '_', ','
and spaces are ignored. Anything that is not a finite whole number of bytes from 1 to MAX_BYTES (`inf`,
`nan`, `1e400`, `-5GB`, `0.5`) is a ConfigError saying why.
"""
from decimal import Decimal, DecimalException

from .errors import ConfigError

SIZE_UNITS = {"": 1, "b": 1, "k": 10**3, "kb": 10**3, "m": 10**6, "mb": 10**6, "g": 10**9, "gb": 10**9,
              "t": 10**12, "tb": 10**12, "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40}
MAX_BYTES = 2**63 - 1           # the largest file size an OS can state (a signed 64-bit off_t)
FORMS = "20GB, 500MB, 1.5GiB or 2000000000"


def parse_bytes(text):
    """'20GB', '500MB', '1.5GiB', '2_000_000', '1.5e9' -> bytes (an int >= 1). Otherwise a ConfigError
    saying what is wrong with the value; callers add the flag or variable it came from."""
    shown = repr(text) if len(str(text)) <= 40 else repr(f"{str(text)[:40]}...")
    s = str(text).strip().lower().replace("_", "").replace(",", "").replace(" ", "")
    num = s.rstrip("abcdefghijklmnopqrstuvwxyz")
    unit = s[len(num):]
    if unit not in SIZE_UNITS or not num:
        raise ConfigError(f"{shown} is not a byte count (like {FORMS})")
    try:
        # Decimal, not float: exact for big integers, and '1e400' stays finite so it is refused as too large
        value = Decimal(num) * SIZE_UNITS[unit]
    except DecimalException:           # not a number, or an exponent past Decimal's own range
        raise ConfigError(f"{shown} is not a byte count (like {FORMS})") from None
    if not value.is_finite():
        raise ConfigError(f"{shown} is not a finite number of bytes")
    if value > MAX_BYTES:
        raise ConfigError(f"{shown} is more bytes than any disk holds (at most {MAX_BYTES:,})")
    if value < 1:
        raise ConfigError(f"{shown} is not a positive number of bytes")
    return int(value)


def positive_number(text, example):
    """float(text) when it is a finite number > 0 (command-line seconds, rates); else an
    argparse.ArgumentTypeError saying so, with an example of what to give."""
    import argparse
    import math
    try:
        value = float(text)
    except ValueError:
        value = math.nan
    if not (math.isfinite(value) and value > 0):
        raise argparse.ArgumentTypeError(f"{text!r} is not a number > 0: give {example}")
    return value
