"""Where the requests on a handed-over API connection begin and end, read beside aiohttp's parser.

The fast path hands a connection to aiohttp at the first byte of a request it does not answer
itself (``fastpath.py``); from then on aiohttp's parser reads it. Two things aiohttp does not
do are done here, on the bytes before aiohttp sees them:

* Bounds on a head as it arrives: aiohttp bounds each line, not the head, and its parser (as
  httptools) keeps a partial line until it is whole. ``HeadGuard`` counts a head's bytes
  before any parser buffers them, and the field count is checked as each field ends.
* Requests in order. aiohttp's parser reads everything it is given at once; when a read holds
  a whole request and then a malformed one, it raises for the read and the whole request is
  lost (its client gets one 400 for two requests, and the first is never run). So aiohttp is
  given each request's bytes in a read of their own, ending where the request ends.

``Framing.feed`` reads the bytes with a parser of its own (httptools: the fast path's, so both
paths refuse alike) in pieces that end where a request can end: at the end of each line of a
head or a chunked body, and at the end of a ``Content-Length`` body. It returns the pieces to
give aiohttp, each ending at a request's end (or at the end of the read), and a ``Refusal``
when the bytes break a rule. A head is held back until it is whole, so that aiohttp never sees
part of a head that is then refused (it is between requests when the refusal comes).

A head that cannot be parsed is refused here (400), as the fast path would; bytes that break
inside a body are left to aiohttp, which already has the request.

The API speaks no other protocol, so a request that asks for one (``Upgrade``) is read as any
other, body and all, and the requests after it too; so does aiohttp, whose llhttp reads the
body before it would switch (RFC 9110, 7.8). httptools' llhttp ends such a request at its head
and would take the body for the next request, so its body is read by a parser given a head
that declares only the body (``http1.bodies``, ``_frame_body``).
"""

from __future__ import annotations

import httptools

from interknit.http1.bodies import body_parser
from interknit.http1.limits import HeadGuard
from interknit.registry.refusals import (
    MAX_HEAD,
    MAX_HEADERS,
    SINGLE_FIELDS,
    TOO_MANY_HEADERS,
    Refusal,
    head_refusal,
    malformed,
)

_SPENT = httptools.HttpRequestParser(object())


class _TooManyHeaders(Exception):
    pass


class _Repeated(Exception):
    """A field that may appear once appeared twice."""


class Framing:
    """One handed-over connection's requests, as their bytes arrive."""

    __slots__ = (
        "at_rest",
        "broken",
        "chunked",
        "completed",
        "ended",
        "fields",
        "guard",
        "heads",
        "held",
        "in_head",
        "length",
        "max_headers",
        "parser",
        "remaining",
        "seen",
    )

    def __init__(self, max_head: int = MAX_HEAD, max_headers: int = MAX_HEADERS) -> None:
        self.parser = httptools.HttpRequestParser(self)
        self.guard = HeadGuard(max_head)
        self.max_headers = max_headers
        self.at_rest = True  # between requests: the next byte (but CR or LF) starts one
        self.in_head = False
        self.fields = 0
        self.seen: set[bytes] = set()  # the single fields of the head being read
        self.length: int | None = None  # the Content-Length of the request being read
        self.chunked = False  # the request being read has a chunked body
        self.remaining: int | None = None  # what is left of a Content-Length body
        self.completed = 0
        self.heads = 0  # heads read whole: requests aiohttp will answer, whatever their bodies
        self.held = b""  # the start of a head not yet whole, already parsed, not yet given out
        self.broken = False  # a body broke: everything goes to aiohttp as it comes
        self.ended = False  # a request that closes the connection was read: nothing follows

    def close(self) -> None:
        """Let the parser go (it holds this object's callbacks: a cycle the collector would
        otherwise have to find)."""
        self.parser = _SPENT
        self.held = b""

    @property
    def head_open(self) -> bool:
        """A head has begun and not ended (the slow-client timeout runs while it is so)."""
        return self.in_head or bool(self.held.strip(b"\r\n"))

    # Parser callbacks

    def on_message_begin(self) -> None:
        self.at_rest = False
        self.in_head = True
        self.fields = 0
        self.seen = set()
        self.length = None
        self.chunked = False

    def on_header(self, name: bytes, value: bytes) -> None:
        self.fields += 1
        if self.fields > self.max_headers:
            raise _TooManyHeaders
        lname = name.lower()
        if lname in SINGLE_FIELDS:
            if lname in self.seen:
                raise _Repeated
            self.seen.add(lname)
        if lname == b"content-length":
            # llhttp has checked it is digits.
            self.length = int(value)
        elif lname == b"transfer-encoding":
            # The last coding says (llhttp refuses a request whose last coding is not chunked).
            self.chunked = value.rpartition(b",")[2].strip().lower() == b"chunked"

    def on_headers_complete(self) -> None:
        self.heads += 1
        self.in_head = False
        self.guard.reset()  # a body is not a head's
        self.remaining = self.length

    def on_message_complete(self) -> None:
        if not self.parser.should_keep_alive():
            self.ended = True
        self.at_rest = True
        self.remaining = None
        self.completed += 1
        self.guard.reset()  # what follows (empty lines, then a head) is the next head's

    def _frame_body(self) -> None:
        """Read the body of an upgrade request that llhttp ended at its head, with a parser
        given a head that declares only that body (and the request's keep-alive), so that the
        request ends where its body ends, as aiohttp reads it. A CONNECT request has no body
        (aiohttp reads what follows its head as the tunnel's)."""
        close = self.ended
        self.completed -= 1  # the request ends with its body
        self.ended = False
        self.parser = body_parser(self, chunked=self.chunked, length=self.length or 0, close=close)
        self.heads -= 1  # the request's head was counted when it was read

    # Reading

    def feed(self, data: bytes) -> tuple[list[bytes], Refusal | None]:
        """The pieces of ``data`` (with any head held back before it) to give aiohttp, in order,
        and the refusal that ends the connection, if the bytes broke a rule."""
        if self.broken:
            return [data], None
        if self.ended:
            return [], None  # aiohttp closes the connection after its answer
        held = self.held
        buf = held + data if held else data
        out: list[bytes] = []
        start = 0  # the first byte of ``buf`` not given out
        pos = len(held)  # the first byte of ``buf`` the parser has not read
        size = len(buf)
        while pos < size:
            heading = self.at_rest or self.in_head
            remaining = self.remaining
            if heading or not remaining:
                newline = buf.find(b"\n", pos)
                end = size if newline < 0 else newline + 1
            else:
                end = min(size, pos + remaining)
            piece = buf[pos:end] if pos or end < size else buf
            if heading:
                status = self.guard.check(piece)
                if status:
                    return out, head_refusal(status)
            done = self.completed
            try:
                self.parser.feed_data(piece)
            except httptools.HttpParserUpgrade as exc:
                # llhttp stops after the head of a request that asks for another protocol
                # (the request is complete); the API speaks none, and aiohttp answers it as
                # any other request. Reading goes on after it, at its body if it has one.
                end = pos + int(exc.args[0])
                if (self.chunked or self.length) and self.parser.get_method() != b"CONNECT":
                    self._frame_body()
            except httptools.HttpParserError as exc:
                if isinstance(exc.__context__, _TooManyHeaders):
                    return out, TOO_MANY_HEADERS
                if isinstance(exc.__context__, _Repeated):
                    return out, malformed("a field that may appear once appears twice")
                if heading:
                    return out, malformed(str(exc) or type(exc).__name__)
                # Inside a body: aiohttp has the request and answers for it.
                self.broken = True
                out.append(buf[start:])
                self.held = b""
                return out, None
            if remaining is not None and not heading:
                self.remaining = remaining - (end - pos)
            pos = end
            if self.completed != done:
                out.append(buf[start:pos])
                start = pos
                if self.ended:
                    self.held = b""
                    return out, None
        if start < size:
            if self.at_rest or self.in_head:
                # A head not yet whole (or the empty lines before one): held back.
                self.held = buf[start:]
            else:
                out.append(buf[start:])
                self.held = b""
        else:
            self.held = b""
        return out, None
