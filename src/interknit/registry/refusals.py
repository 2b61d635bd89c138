"""What the registry API answers, counts and logs when it refuses a request before any handler
saw it: one place for the fast path (``fastpath.py``) and the aiohttp side (``handler.py``),
so that both answer alike.

* The answer is the API's JSON error (``{"error": ..., "detail": null}``) and the connection
  closes after it: what follows a refused request on the connection cannot be framed.
* The metric is ``interknit_http_refused_total{reason}``.
* The log is one WARNING line per refusal, rate limited (``LogThrottle``: a burst of 10, then
  one a second, the next line saying how many were left out), naming the reason and the
  client, never a byte of the request: an ``Authorization`` line's token would be among them.

The limits are the API's own and hold on both paths: a request head (request line and header
fields) of at most ``MAX_HEAD`` bytes, counted as the bytes arrive (``http1.limits``), and at
most ``MAX_HEADERS`` header fields.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass

from interknit.logs import LogThrottle

log = logging.getLogger("interknit.registry")

MAX_HEAD = 16 * 1024
MAX_HEADERS = 100  # HAProxy's default, and the proxy's
# Fields a request may carry once (RFC 9110's singletons; what aiohttp's parser refuses twice,
# so that both paths refuse them alike whatever aiohttp's version does).
SINGLE_FIELDS = frozenset(
    {
        b"content-length",
        b"content-location",
        b"content-range",
        b"content-type",
        b"etag",
        b"host",
        b"max-forwards",
        b"server",
        b"transfer-encoding",
        b"user-agent",
    }
)


@dataclass(frozen=True, slots=True)
class Refusal:
    status: int
    reason: str  # the metric's label and the log line's
    message: str  # the error sentence of the answer


HEAD_TOO_LARGE = Refusal(
    431, "headers-too-large", "head: larger than 16 KiB (request line and header fields)"
)
URI_TOO_LONG = Refusal(414, "uri-too-long", "request line: longer than 16 KiB")
TOO_MANY_HEADERS = Refusal(431, "too-many-headers", f"head: more than {MAX_HEADERS} header fields")


TOO_MANY_CONNECTIONS = Refusal(
    503, "max-connections", "connections: the API holds registry.max_connections already"
)


def head_refusal(status: int) -> Refusal:
    """The refusal for what ``HeadGuard.check`` answered."""
    return URI_TOO_LONG if status == 414 else HEAD_TOO_LARGE


def malformed(what: str) -> Refusal:
    """A request the HTTP parser could not read; ``what`` is the parser's reason, which names
    no byte of the request."""
    return Refusal(400, "malformed", f"request: malformed HTTP ({what[:80]})")


class Refusals:
    """Counts and logs the refusals of one API socket."""

    def __init__(
        self,
        count: Callable[[str], None] | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._count = count
        self._clock = clock
        self.throttle = LogThrottle()

    def refused(self, refusal: Refusal, client: str) -> None:
        if self._count is not None:
            self._count(refusal.reason)
        held = self.throttle.allow(self._clock())
        if held is None:
            return
        log.warning(
            "refused a request from %s: %s",
            client,
            refusal.reason,
            extra={
                "event": "registry.refused",
                "reason": refusal.reason,
                "status": refusal.status,
                "client": client,
                "suppressed": held,
            },
        )

    def failed(self, client: str, exc: BaseException) -> None:
        """A request that reached no answer but a 500: a bug, logged with its traceback (rate
        limited as refusals are, since a client can repeat what triggers it)."""
        if self._count is not None:
            self._count("internal")
        held = self.throttle.allow(self._clock())
        if held is None:
            return
        log.error(
            "registry API request from %s failed",
            client,
            exc_info=(type(exc), exc, exc.__traceback__),
            extra={"event": "registry.internal_error", "client": client, "suppressed": held},
        )
