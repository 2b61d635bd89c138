"""The chunked body of a request that asks for an upgrade.

httptools ends a request that asks for another protocol (``Upgrade``) at its head, and what
follows is the other protocol's. But an upgrade takes effect only after the request's body
(RFC 9110, 7.8), so the proxy reads that body itself: by its length when it has one
(``HttpProxyProtocol.upgrade_data``), and when it is chunked with a parser of its own, given a
head that declares only the chunked body. The body's end must be found to the byte (what
follows is the tunnel's): the parser is fed up to each LF, and a chunked body ends with one.
"""

from __future__ import annotations

from collections.abc import Callable

import httptools

_SPENT = httptools.HttpRequestParser(object())


class ChunkedBody:
    """Decodes one chunked body, handing each piece of its content to ``on_content``."""

    __slots__ = ("done", "on_content", "parser")

    def __init__(self, on_content: Callable[[bytes], None]) -> None:
        self.on_content = on_content
        self.done = False
        self.parser = httptools.HttpRequestParser(self)
        self.parser.feed_data(b"PUT / HTTP/1.1\r\ntransfer-encoding: chunked\r\n\r\n")

    def on_body(self, body: bytes) -> None:
        self.on_content(body)

    def on_message_complete(self) -> None:
        self.done = True

    def close(self) -> None:
        """Let the parser go (it and this object point at each other)."""
        self.parser = _SPENT

    def feed(self, data: bytes) -> int:
        """Read ``data``; how many of its bytes were the body's (all of them until it ends).
        Raises ``httptools.HttpParserError`` for a body that breaks the chunked framing."""
        start = 0
        size = len(data)
        while start < size and not self.done:
            newline = data.find(b"\n", start)
            end = size if newline < 0 else newline + 1
            self.parser.feed_data(data[start:end] if start or end < size else data)
            start = end
        if self.done:
            self.close()
        return start
