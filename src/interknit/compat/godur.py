"""Go's duration syntax (``time.ParseDuration`` and ``Duration.String``), which Consul's API
speaks: ``wait=120000ms``, ``"Interval": "1m30s"``, ``"DeregisterCriticalServiceAfter":
"1m0s"``. interknit's own ``durations`` module takes a narrower spelling (no ``us``, no
fraction-less ``.5s``), so Consul's bodies and queries are read here.
"""

from __future__ import annotations

import functools
import re

_UNITS = {
    "ns": 1e-9,
    "us": 1e-6,
    "\u00b5s": 1e-6,  # micro sign, as Go writes it
    "\u03bcs": 1e-6,  # Greek mu, which Go also reads
    "ms": 1e-3,
    "s": 1.0,
    "m": 60.0,
    "h": 3600.0,
}
_PART = re.compile(r"([0-9]+\.?[0-9]*|\.[0-9]+)(ns|us|\u00b5s|\u03bcs|ms|s|m|h)")
MAX_TEXT = 64
# Go's int64 nanoseconds reach about 292 years; nothing Consul takes needs a week.
MAX_SECONDS = 7 * 24 * 3600.0


# Clients send the same few durations over and over (``wait=120000ms``).
@functools.lru_cache(maxsize=256)
def parse_go_duration(text: str) -> float:
    """Seconds for a Go duration such as ``"1m30s"``; ValueError with the reason."""
    if len(text) > MAX_TEXT:
        raise ValueError("is longer than 64 characters")
    value = text[1:] if text[:1] == "+" else text
    if value.startswith("-"):
        raise ValueError(f"{text!r} is negative")
    if value == "0":
        return 0.0
    if not value:
        raise ValueError("is empty; a duration looks like '10s', '1m30s' or '120000ms'")
    total = 0.0
    pos = 0
    while pos < len(value):
        match = _PART.match(value, pos)
        if match is None:
            raise ValueError(f"{text!r} is not a duration such as '10s', '1m30s' or '500ms'")
        total += float(match.group(1)) * _UNITS[match.group(2)]
        pos = match.end()
    if total > MAX_SECONDS:
        raise ValueError(f"{text!r} is longer than 7 days")
    return total


def _fraction(whole: int, part: int, digits: int) -> str:
    """``whole`` and ``part`` (``digits`` decimal places) with trailing zeros dropped."""
    if part == 0:
        return str(whole)
    return f"{whole}.{part:0{digits}d}".rstrip("0")


def format_go_duration(seconds: float) -> str:
    """What Go's ``time.Duration.String`` writes: ``0s``, ``500ms``, ``1.5s``, ``1m0s``,
    ``1h2m3s``; Go clients parse Consul's durations from exactly these."""
    ns = round(seconds * 1e9)
    if ns == 0:
        return "0s"
    if ns < 1_000:
        return f"{ns}ns"
    if ns < 1_000_000:
        return _fraction(ns // 1_000, ns % 1_000, 3) + "\u00b5s"
    if ns < 1_000_000_000:
        return _fraction(ns // 1_000_000, ns % 1_000_000, 6) + "ms"
    secs = _fraction(ns // 1_000_000_000 % 60, ns % 1_000_000_000, 9) + "s"
    minutes = ns // 60_000_000_000
    if minutes == 0:
        return secs
    hours, minutes = divmod(minutes, 60)
    if hours == 0:
        return f"{minutes}m{secs}"
    return f"{hours}h{minutes}m{secs}"
