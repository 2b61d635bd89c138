"""Bytes the proxy writes often, built once: status lines, canned error responses, header sets.

The hot path looks things up here instead of formatting them per request.
"""

from __future__ import annotations

import http
import os
from itertools import count

STATUS_LINES: dict[int, bytes] = {
    int(s): b"HTTP/1.1 %d %s\r\n" % (int(s), s.phrase.encode()) for s in http.HTTPStatus
}


def status_line(status: int) -> bytes:
    line = STATUS_LINES.get(status)
    if line is None:
        line = b"HTTP/1.1 %d Unknown\r\n" % status
    return line


# Hop-by-hop headers (RFC 9110 7.6.1) and the ones the proxy re-frames or rewrites itself.
HOP_BY_HOP = frozenset(
    {
        b"connection",
        b"keep-alive",
        b"proxy-connection",
        b"te",
        b"trailer",
        b"transfer-encoding",
        b"upgrade",
        b"content-length",
    }
)
REQUEST_REWRITTEN = HOP_BY_HOP | {
    b"expect",
    b"x-forwarded-for",
    b"x-forwarded-proto",
    b"x-forwarded-host",
    b"x-request-id",
}
NO_BODY_STATUSES = frozenset({204, 304})

CRLF = b"\r\n"
LAST_CHUNK = b"0\r\n\r\n"
CONTINUE_100 = b"HTTP/1.1 100 Continue\r\n\r\n"

_ERROR_CACHE: dict[tuple[int, str, bool, int | None], bytes] = {}


def error_response(
    status: int, reason: str, *, close: bool = False, retry_after: int | None = None
) -> bytes:
    """A whole short response from the proxy itself, with ``X-Interknit-Reason``."""
    key = (status, reason, close, retry_after)
    cached = _ERROR_CACHE.get(key)
    if cached is not None:
        return cached
    try:
        phrase = http.HTTPStatus(status).phrase
    except ValueError:
        phrase = "Error"
    body = f"{status} {phrase}: {reason}\n".encode()
    head = [
        status_line(status),
        b"content-type: text/plain; charset=utf-8\r\n",
        b"content-length: %d\r\n" % len(body),
        b"x-interknit-reason: %s\r\n" % reason.encode(),
    ]
    if retry_after is not None:
        head.append(b"retry-after: %d\r\n" % retry_after)
    if close:
        head.append(b"connection: close\r\n")
    cached = b"".join(head) + CRLF + body
    _ERROR_CACHE[key] = cached
    return cached


def connection_tokens(value: bytes) -> set[bytes]:
    """The header names a Connection header lists (lower-cased)."""
    return {token.strip().lower() for token in value.split(b",") if token.strip()}


class RequestIds:
    """Request ids: a random per-process prefix and a counter, so no ``uuid4`` per request."""

    __slots__ = ("_counter", "_prefix")

    def __init__(self) -> None:
        self._prefix = os.urandom(8).hex().encode()
        self._counter = count(1)

    def next(self) -> bytes:
        return b"%s-%x" % (self._prefix, next(self._counter))


def chunk(data: bytes) -> bytes:
    return b"%x\r\n%s\r\n" % (len(data), data)
