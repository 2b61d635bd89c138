"""Durations as operators write them: ``250ms``, ``5s``, ``1m``, ``1h30m``.

Everything inside interknit is float seconds; this module is the one place text turns into
seconds and back, so that config, API bodies and CLI flags all accept the same spelling.
"""

from __future__ import annotations

import functools
import re

_UNITS = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0}
# [0-9], not \d: \d takes every script's digits (ARABIC-INDIC FIVE and "s"), which no operator
# means by a duration.
_PART = re.compile(r"([0-9]+(?:\.[0-9]+)?)(ms|s|m|h)")
_WHOLE = re.compile(r"(?:[0-9]+(?:\.[0-9]+)?(?:ms|s|m|h))+")
# Longer than any sane timeout; keeps arithmetic on deadlines finite.
MAX_SECONDS = 7 * 24 * 3600.0


def parse_duration(text: str) -> float:
    """Return seconds for a duration such as ``"250ms"``; raise ValueError with the reason."""
    if not isinstance(text, str):
        raise ValueError("must be a duration string such as '250ms', '5s' or '1m'")
    return _parse(text)


# Every registration spells out its check's durations, nearly always the same few strings.
@functools.lru_cache(maxsize=512)
def _parse(text: str) -> float:
    value = text.strip()
    if len(value) > 32 or not _WHOLE.fullmatch(value):
        raise ValueError(f"{text[:40]!r} is not a duration such as '250ms', '5s' or '1m'")
    seconds = sum(float(n) * _UNITS[u] for n, u in _PART.findall(value))
    if seconds > MAX_SECONDS:
        raise ValueError(f"{text!r} is longer than 7 days")
    return seconds


def format_duration(seconds: float) -> str:
    """The shortest exact spelling of ``seconds`` that ``parse_duration`` reads back."""
    ms = round(seconds * 1000)
    if ms % 3_600_000 == 0 and ms:
        return f"{ms // 3_600_000}h"
    if ms % 60_000 == 0 and ms:
        return f"{ms // 60_000}m"
    if ms % 1000 == 0:
        return f"{ms // 1000}s"
    return f"{ms}ms"
