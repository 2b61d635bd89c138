"""Deadlines: how long the caller will still wait, and how long our work usually takes.

A request's deadline comes from ``X-Request-Timeout`` (``250ms``, ``2s``, or plain seconds such
as ``0.5``), else from gRPC's ``grpc-timeout`` (``100m``, ``2S``), else from the route's
``timeout``. A header that cannot be read is ignored rather than failing the request: the
deadline is advice from the caller, and a garbled hint must not turn into an error. Deadlines
are absolute times on the caller's clock (the same monotonic clock that is passed as ``now``).
"""

from __future__ import annotations

import math
import re

from interknit.durations import MAX_SECONDS, parse_duration

X_REQUEST_TIMEOUT = "x-request-timeout"
GRPC_TIMEOUT = "grpc-timeout"

_PLAIN = re.compile(r"\d{1,12}(?:\.\d{1,9})?")
_GRPC = re.compile(r"(\d{1,8})([HMSmun])")
_GRPC_UNITS = {"H": 3600.0, "M": 60.0, "S": 1.0, "m": 1e-3, "u": 1e-6, "n": 1e-9}


def _text(value: str | bytes) -> str:
    if isinstance(value, bytes):
        try:
            return value.decode("ascii")
        except UnicodeDecodeError:
            raise ValueError("timeout header is not ASCII") from None
    return value


def parse_request_timeout(value: str | bytes) -> float:
    """Seconds in an ``X-Request-Timeout`` value; ValueError for anything else."""
    text = _text(value).strip()
    if _PLAIN.fullmatch(text):
        seconds = float(text)
        if seconds > MAX_SECONDS:
            raise ValueError("timeout is longer than 7 days")
        return seconds
    return parse_duration(text)


def parse_grpc_timeout(value: str | bytes) -> float:
    """Seconds in a ``grpc-timeout`` value (1-8 digits and a unit); ValueError otherwise."""
    match = _GRPC.fullmatch(_text(value).strip())
    if match is None:
        raise ValueError("not a grpc-timeout such as '100m' or '2S'")
    return min(MAX_SECONDS, int(match.group(1)) * _GRPC_UNITS[match.group(2)])


def request_deadline(
    now: float,
    request_timeout: str | bytes | None,
    grpc_timeout: str | bytes | None = None,
    default_timeout: float | None = None,
) -> float | None:
    """The absolute deadline for a request from its headers, or the route's ``timeout``.

    The caller's timeout wins over the route's only when it is shorter: a client cannot ask a
    route to hold work longer than the operator allows.
    """
    timeout: float | None = None
    if request_timeout is not None:
        try:
            timeout = parse_request_timeout(request_timeout)
        except ValueError:
            timeout = None
    if timeout is None and grpc_timeout is not None:
        try:
            timeout = parse_grpc_timeout(grpc_timeout)
        except ValueError:
            timeout = None
    if default_timeout is not None and (timeout is None or timeout > default_timeout):
        timeout = default_timeout
    return None if timeout is None else now + timeout


def format_remaining(deadline: float, now: float) -> str:
    """The value to forward upstream in ``X-Request-Timeout``: whole milliseconds left."""
    return f"{max(0, math.floor((deadline - now) * 1000.0))}ms"


class ServiceTimes:
    """A cheap running median of recent service times.

    Keeps the last ``size`` samples in a ring and re-sorts them at most once every ``every``
    samples, so the per-request cost is one store; the median is as fresh as ``every`` samples.
    """

    __slots__ = ("_dirty", "_every", "_median", "_next", "_ring", "_size")

    def __init__(self, size: int = 64, every: int = 8) -> None:
        if size < 1 or every < 1:
            raise ValueError("size and every must be at least 1")
        self._ring: list[float] = []
        self._size = size
        self._next = 0
        self._every = every
        self._dirty = 0
        self._median = 0.0

    def add(self, seconds: float) -> None:
        if not seconds >= 0.0:  # also drops NaN
            return
        if len(self._ring) < self._size:
            self._ring.append(seconds)
        else:
            self._ring[self._next] = seconds
            self._next = (self._next + 1) % self._size
        self._dirty += 1
        if self._dirty >= self._every or len(self._ring) <= self._every:
            self._recompute()

    def _recompute(self) -> None:
        ordered = sorted(self._ring)
        self._median = ordered[len(ordered) // 2]
        self._dirty = 0

    @property
    def median(self) -> float:
        """The median of the recent samples; 0 before the first one."""
        return self._median

    def __len__(self) -> int:
        return len(self._ring)
