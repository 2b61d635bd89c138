"""Structured logs: every record is one line of ``key=value`` pairs (or JSON), with the
``extra`` fields a component passed, so that events can be grepped and parsed alike."""

from __future__ import annotations

import errno
import json
import logging
import os
import sys
import time

_STANDARD = set(logging.LogRecord("", 0, "", 0, "", None, None).__dict__) | {"message", "asctime"}


def _fields(record: logging.LogRecord) -> dict[str, object]:
    out: dict[str, object] = {
        "ts": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
        + f".{int(record.msecs):03d}Z",
        "level": record.levelname.lower(),
        "logger": record.name,
        "msg": record.getMessage(),
    }
    for key, value in record.__dict__.items():
        if key not in _STANDARD and not key.startswith("_"):
            out[key] = value
    if record.exc_info:
        out["error"] = logging.Formatter().formatException(record.exc_info)
    return out


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        return json.dumps(_fields(record), default=str)


class LogfmtFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        parts = []
        for key, value in _fields(record).items():
            text = str(value)
            if not text or any(c in text for c in ' ="\n'):
                text = json.dumps(text)
            parts.append(f"{key}={text}")
        return " ".join(parts)


class HumanFormatter(logging.Formatter):
    """For a terminal a person watches (``interknit demo``): local time and the message,
    which says what happened in words (``search/search-2 is now passing: ...``)."""

    def format(self, record: logging.LogRecord) -> str:
        stamp = time.strftime("%H:%M:%S", time.localtime(record.created))
        level = "" if record.levelno < logging.WARNING else f"{record.levelname.lower()}: "
        return f"{stamp} {level}{record.getMessage()}"


def setup_logging(level: str = "info", json_format: bool = False, human: bool = False) -> None:
    handler = logging.StreamHandler(sys.stderr)
    if human:
        handler.setFormatter(HumanFormatter())
    else:
        handler.setFormatter(JsonFormatter() if json_format else LogfmtFormatter())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    # aiohttp's own access log duplicates ours.
    logging.getLogger("aiohttp.access").setLevel(logging.WARNING)


def iso_time(epoch: float) -> str:
    """A wall-clock time as people read it in logs and on the status page:
    ``2025-01-02T03:04:05.678Z`` (UTC, milliseconds)."""
    whole = int(epoch // 1)
    millis = round((epoch - whole) * 1000)
    if millis == 1000:
        whole, millis = whole + 1, 0
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(whole)) + f".{millis:03d}Z"


def os_error(exc: OSError) -> str:
    """An OS error in words, without ``[Errno N]``: ``address already in use``, ``permission
    denied``. Some raise paths (uvloop's) leave ``strerror`` unset; the errno still says it."""
    cause = exc.__cause__
    if exc.errno is None and isinstance(cause, OSError) and cause.errno is not None:
        exc = cause  # uvloop wraps the bind's error in one without an errno
    if exc.errno == errno.EADDRINUSE:
        return "address already in use"
    text = exc.strerror or (os.strerror(exc.errno) if exc.errno else "") or str(exc)
    text = text or type(exc).__name__
    return text[:1].lower() + text[1:]


class LogThrottle:
    """How often a line about hostile or broken input may be written: ``burst`` at once, then
    one every ``every`` seconds. A line that is let through after others were held back says
    how many were (``allow`` returns that count). One client sending garbage must not be able
    to fill the disk with a line per request, nor hide everyone else's lines in its own.

    No clock of its own: ``now`` is passed in (monotonic seconds)."""

    __slots__ = ("burst", "every", "held", "tokens", "updated")

    def __init__(self, every: float = 1.0, burst: int = 10) -> None:
        self.every = every
        self.burst = burst
        self.tokens = float(burst)
        self.updated: float | None = None
        self.held = 0

    def allow(self, now: float) -> int | None:
        """None: leave this line out. Else the number of lines left out before it."""
        if self.updated is not None:
            self.tokens = min(self.burst, self.tokens + (now - self.updated) / self.every)
        self.updated = now
        if self.tokens < 1.0:
            self.held += 1
            return None
        self.tokens -= 1.0
        held, self.held = self.held, 0
        return held
