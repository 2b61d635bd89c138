"""Bytes the proxy writes often, built once: canned error responses, header sets, simple
response heads. The hot path looks things up here instead of formatting them per request.
"""

from __future__ import annotations

import os
import re
from itertools import count

from interknit.http1.status import reason_phrase, status_line

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
    body = f"{status} {reason_phrase(status)}: {reason}\n".encode()
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


def body_size(response: bytes) -> int:
    """The body's length in a whole response the proxy made (``error_response``)."""
    return len(response) - response.index(b"\r\n\r\n") - 4


def redirect_response(location: bytes, close: bool) -> bytes:
    """A bodiless ``308 Permanent Redirect`` to ``location`` (method and body kept)."""
    return b"".join(
        (
            status_line(308),
            b"location: ",
            location,
            b"\r\ncontent-length: 0\r\n",
            b"connection: close\r\n" if close else b"",
            CRLF,
        )
    )


def connection_tokens(value: bytes) -> set[bytes]:
    """The header names a Connection header lists (lower-cased)."""
    return {token.strip().lower() for token in value.split(b",") if token.strip()}


class RequestIds(list[bytes]):
    """Request ids: a random per-process prefix and a counter, so no ``uuid4`` per request.

    They are formatted a batch at a time (in one comprehension, cheaper per id than a call
    each) into this list, last first: take one with ``ids.pop() if ids else ids.next()``, which
    costs no Python call but once a batch."""

    __slots__ = ("_counter", "_prefix")

    BATCH = 256

    def __init__(self) -> None:
        super().__init__()
        self._prefix = os.urandom(8).hex().encode()
        self._counter = count(1)

    def next(self) -> bytes:
        if not self:
            prefix = self._prefix
            start = next(self._counter)
            # One counter step per batch: batch k (from 1) holds (k-1)*BATCH+1 .. k*BATCH.
            first = (start - 1) * self.BATCH + 1
            self += [b"%s-%x" % (prefix, n) for n in range(first + self.BATCH - 1, first - 1, -1)]
        return self.pop()


def chunk(data: bytes) -> bytes:
    return b"%x\r\n%s\r\n" % (len(data), data)


# Responses that skip the parser (see UpstreamConnection.data_received): the common answer of
# a kept-alive upstream, a whole "HTTP/1.1 200 OK" head with one Content-Length and the whole
# body in one read. Its head is read here with rules stricter than llhttp's, so that whatever
# passes would have passed the parser with the same meaning; anything else (other versions,
# 1xx/204/304, 502-504 which may be retried, Transfer-Encoding, a Connection other than
# keep-alive, Upgrade, TE, Trailer, a second or non-numeric Content-Length, obsolete line
# folding, bytes outside printable ASCII) goes to the parser as before.
_SIMPLE_STATUS = re.compile(rb"HTTP/1\.1 ([2-5][0-9][0-9]) [\t\x20-\x7e]*")
# A token, a colon, optional blanks (httptools strips those, and keeps the rest as it came).
_SIMPLE_FIELD = re.compile(rb"([!#$%&'*+\-.^_`|~0-9A-Za-z]+):[ \t]*([\t\x20-\x7e]*)")
_SIMPLE_DIGITS = re.compile(rb"[0-9]{1,15}")
_SIMPLE_DROP = frozenset({b"connection", b"keep-alive", b"content-length"})
_SIMPLE_NOT = frozenset({204, 304, 502, 503, 504})
# Longer heads are rare and not worth caching.
SIMPLE_HEAD_MAX = 2048
_SIMPLE_CACHE_MAX = 256


class SimpleHead:
    """A response head the fast path may forward: what the exchange needs of it, built once.

    ``prefix``: the status line (as ``STATUS_LINES`` has it) and the end-to-end headers;
    ``whole``: ``prefix`` with the Content-Length and the blank line, the usual full head.
    """

    __slots__ = ("length", "length_bytes", "prefix", "status", "whole")

    def __init__(self, status: int, prefix: bytes, length: int, length_bytes: bytes) -> None:
        self.status = status
        self.prefix = prefix
        self.length = length
        self.length_bytes = length_bytes
        self.whole = prefix + b"content-length: " + length_bytes + CRLF + CRLF


def parse_simple_head(head: bytes) -> SimpleHead | None:
    """``head`` (up to, without, its blank line) as a ``SimpleHead``, or None: not simple."""
    lines = head.split(b"\r\n")
    status_match = _SIMPLE_STATUS.fullmatch(lines[0])
    if status_match is None:
        return None
    status = int(status_match.group(1))
    if status in _SIMPLE_NOT:
        return None
    out = [status_line(status)]
    length_bytes: bytes | None = None
    for line in lines[1:]:
        field = _SIMPLE_FIELD.fullmatch(line)
        if field is None:
            return None  # a bare CR or LF, folding, a bad name, a byte out of range
        name, value = field.group(1), field.group(2)
        lname = name.lower()
        if lname in HOP_BY_HOP:
            if lname not in _SIMPLE_DROP:
                return None  # Transfer-Encoding, Upgrade, TE, Trailer, Proxy-Connection
            if lname == b"content-length":
                if length_bytes is not None or _SIMPLE_DIGITS.fullmatch(value) is None:
                    return None
                length_bytes = value
            elif lname == b"connection" and value.lower() != b"keep-alive":
                return None  # close, upgrade, or headers to drop: the parser's business
            continue
        out += (name, b": ", value, CRLF)
    if length_bytes is None:
        return None
    return SimpleHead(status, b"".join(out), int(length_bytes), length_bytes)


class SimpleHeads(dict[bytes, SimpleHead | None]):
    """What ``parse_simple_head`` made of each head, by its bytes (None: not simple). An
    upstream repeats its heads (Date changes once a second), so most responses cost one
    dictionary lookup (``SIMPLE_HEADS[head]``), and a head not seen yet is parsed then."""

    __slots__ = ()

    def __missing__(self, head: bytes) -> SimpleHead | None:
        found = parse_simple_head(head)
        if len(self) >= _SIMPLE_CACHE_MAX:
            self.clear()
        self[head] = found
        return found


SIMPLE_HEADS = SimpleHeads()
