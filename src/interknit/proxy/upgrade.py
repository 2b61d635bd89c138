"""The body of a request that asks for an upgrade, read to the byte.

httptools ends a request that asks for another protocol (``Upgrade``) at its head, but the
upgrade takes effect only after the request's body (RFC 9110, 7.8), and what follows the body
is the tunnel's. So the body is read by a parser of its own (``http1.bodies``) and fed only
bytes that can be the body's: at most what is left of a ``Content-Length`` body, and a chunked
body up to each LF (it ends with one).
"""

from __future__ import annotations

from collections.abc import Callable

import httptools

from interknit.http1.bodies import body_parser

_SPENT = httptools.HttpRequestParser(object())


class UpgradeBody:
    """Reads one body, chunked or of ``length`` bytes, handing its content to ``on_content``."""

    __slots__ = ("done", "on_content", "parser", "remaining")

    def __init__(self, on_content: Callable[[bytes], None], chunked: bool, length: int) -> None:
        self.on_content = on_content
        self.done = False
        self.remaining = None if chunked else length
        self.parser = body_parser(self, chunked=chunked, length=length)
        if self.done:  # an empty body
            self.close()

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
            remaining = self.remaining
            if remaining is None:
                newline = data.find(b"\n", start)
                end = size if newline < 0 else newline + 1
            else:
                end = min(size, start + remaining)
                self.remaining = remaining - (end - start)
            self.parser.feed_data(data[start:end] if start or end < size else data)
            start = end
        if self.done:
            self.close()
        return start
