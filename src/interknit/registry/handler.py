"""The aiohttp side of the API socket: the protocol the fast path hands a connection to.

It is aiohttp's own ``RequestHandler`` (aiohttp's parser, the node's application), with the
API's rules put in front of its parser and behind its error page:

* The bytes pass through ``Framing`` first: heads are bounded as they arrive (431 at once),
  header fields are counted, and each request reaches aiohttp in a read of its own, so that a
  malformed request after a good one in the same packet is answered after it, in order.
* aiohttp's parser is set to the same limits (``MAX_HEAD`` per line, ``MAX_HEADERS`` fields),
  so that it never refuses what the fast path takes, nor takes what it refuses.
* Its error page is the API's JSON error, and what it logs for a bad request is the one
  rate-limited line of ``refusals.py``: aiohttp logs a malformed request at ERROR with a
  traceback whose message quotes the offending line (an ``Authorization`` token included).

A refusal found by ``Framing`` has to be answered after the requests before it, which aiohttp
may still be serving, and aiohttp has no public way to queue an answer. So it is given a byte
that no request can start with: its parser then queues a bad-request answer in turn, and this
handler's ``handle_error`` answers it with the refusal.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Any

from aiohttp import web, web_protocol
from aiohttp.http_exceptions import (
    BadStatusLine,
    ContentLengthError,
    InvalidHeader,
    LineTooLong,
    TransferEncodingError,
)
from aiohttp.web_request import BaseRequest

from interknit.registry.api import error_body
from interknit.registry.framing import Framing
from interknit.registry.refusals import MAX_HEAD, MAX_HEADERS, Refusal, Refusals, malformed

# Nothing a request may start with (not a method's first byte, nor the CR or LF skipped
# between requests); the CRLFs end whatever aiohttp was reading.
_NOT_A_REQUEST = b"\x00\r\n\r\n"


def _reason(exc: BaseException | None) -> str:
    """What was wrong, in words that quote none of the request's bytes (aiohttp's messages
    quote the offending line)."""
    if isinstance(exc, LineTooLong):
        return "a line too long"
    if isinstance(exc, InvalidHeader):
        return "an invalid header field"
    if isinstance(exc, BadStatusLine):
        return "an invalid request line"
    if isinstance(exc, (TransferEncodingError, ContentLengthError)):
        return "an invalid body framing"
    return "invalid HTTP"


class ApiHandler(web_protocol.RequestHandler):
    def __init__(
        self,
        manager: web.Server,
        *,
        refusals: Refusals,
        on_lost: Callable[[ApiHandler], None] | None = None,
        max_head: int = MAX_HEAD,
        max_headers: int = MAX_HEADERS,
        **kwargs: Any,
    ) -> None:
        super().__init__(
            manager,
            loop=asyncio.get_running_loop(),
            max_line_size=max_head,
            max_field_size=max_head,
            max_headers=max_headers,
            **kwargs,
        )
        self.framing = Framing(max_head, max_headers)
        self.refusals = refusals
        self.on_lost = on_lost
        self.refusal: Refusal | None = None
        self.head_started: float | None = None  # when the head being read began (loop time)
        self.answered = 0  # answers aiohttp has finished
        self.eof = False  # the client has closed its side

    def eof_received(self) -> bool | None:  # type: ignore[override]  # (aiohttp says None)
        """A client that closes its side after sending its requests is answered, as the fast
        path answers it, then the connection closes (aiohttp closed it at once, unanswered)."""
        self.eof = True
        if self.answered >= self.owed:
            return None  # nothing is owed: close now
        return True

    @property
    def owed(self) -> int:
        """The answers aiohttp owes: one per whole request given to it, one for a request whose
        body broke (aiohttp answers that too), one for a refusal. A request cut short by the
        client's close is owed nothing, as when aiohttp closed at once."""
        framing = self.framing
        return framing.completed + framing.broken + (self.refusal is not None)

    def log_access(
        self, request: BaseRequest, response: web.StreamResponse, time: float | None
    ) -> None:
        # aiohttp calls this once each answer is written, whatever the access log does.
        super().log_access(request, response, time)
        self.answered += 1
        transport = self.transport
        if self.eof and self.answered >= self.owed and transport is not None:
            transport.close()  # after what it has written

    def connection_lost(self, exc: BaseException | None) -> None:
        super().connection_lost(exc)
        self.framing.close()
        if self.on_lost is not None:
            self.on_lost(self)

    def data_received(self, data: bytes) -> None:
        if self.refusal is not None:
            return
        pieces, refusal = self.framing.feed(data)
        for piece in pieces:
            super().data_received(piece)
        if refusal is not None:
            self.refusal = refusal
            transport = self.transport
            if transport is not None:
                transport.pause_reading()
            super().data_received(_NOT_A_REQUEST)
            return
        if self.framing.head_open:
            if self.head_started is None:
                self.head_started = asyncio.get_running_loop().time()
        else:
            self.head_started = None

    def handle_error(
        self,
        request: BaseRequest,
        status: int = 500,
        exc: BaseException | None = None,
        message: str | None = None,
    ) -> web.StreamResponse:
        """The API's JSON error instead of aiohttp's page, one rate-limited log line instead
        of a traceback (for a 500: the traceback, rate limited too)."""
        if request.writer.output_size > 0:
            raise ConnectionError("an answer was already under way; the connection is closed")
        client = request.remote or "-"
        refusal = self.refusal if isinstance(exc, BadStatusLine) else None
        if refusal is None:
            if status >= 500:
                refusal = Refusal(status, "internal", "internal error")
                self.refusals.failed(client, exc or RuntimeError("unknown error"))
            else:
                refusal = malformed(_reason(exc))
                self.refusals.refused(refusal, client)
        else:
            self.refusals.refused(refusal, client)
        response = web.Response(
            status=refusal.status,
            body=error_body(refusal.message),
            content_type="application/json",
        )
        response.force_close()
        return response

    def sweep(self, now: float, head_timeout: float) -> None:
        """Close the connection if a head has been arriving for longer than ``head_timeout``."""
        started = self.head_started
        if started is not None and now - started > head_timeout:
            transport = self.transport
            if transport is not None:
                transport.close()
