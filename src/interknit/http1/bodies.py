"""A request body read on its own, after httptools has ended its request at the head.

httptools ends a request that asks for another protocol (``Upgrade``) at its head: it tells
llhttp to skip the body and takes what follows for the other protocol's. But an upgrade takes
effect only after the request's body (RFC 9110, 7.8), and aiohttp's llhttp reads it. The body
is then read by a parser of its own, given a head that declares only that body's framing: the
same rules for chunk sizes, extensions and trailers as any body's, with no second decoder.
"""

from __future__ import annotations

import httptools


def body_parser(
    callbacks: object, *, chunked: bool, length: int, close: bool = False
) -> httptools.HttpRequestParser:
    """A parser whose next bytes are a body of that framing (chunked, or ``length`` bytes);
    it calls ``callbacks``' ``on_body`` and ``on_message_complete`` as for any body (and the
    head's callbacks, if it has them, for the head it was given here)."""
    framing = b"transfer-encoding: chunked" if chunked else b"content-length: %d" % length
    parser = httptools.HttpRequestParser(callbacks)
    parser.feed_data(
        b"PUT / HTTP/1.1\r\n" + framing + (b"\r\nconnection: close" if close else b"") + b"\r\n\r\n"
    )
    return parser
