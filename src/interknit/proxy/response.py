"""A response head as the proxy passes it on: end-to-end fields kept, framing re-done."""

from __future__ import annotations

from interknit.proxy.wire import CRLF, HOP_BY_HOP, connection_tokens

_SELF_TOKENS = frozenset({b"connection", b"keep-alive", b"upgrade", b"close"})

# An upstream answers with the same few header sets over and over (Date changes once a
# second): what response_headers() makes of one is kept, up to this many sets.
_CACHE_MAX = 512
ResponseFields = tuple[bytes, bytes | None, bool, bytes | None]
_CACHE: dict[tuple[tuple[bytes, bytes], ...], ResponseFields] = {}


def response_fields(headers: list[tuple[bytes, bytes]]) -> ResponseFields:
    """``response_headers``, remembered by the header set."""
    key = tuple(headers)
    found = _CACHE.get(key)
    if found is None:
        found = response_headers(headers)
        if len(_CACHE) >= _CACHE_MAX:
            _CACHE.clear()
        _CACHE[key] = found
    return found


def response_headers(headers: list[tuple[bytes, bytes]]) -> ResponseFields:
    """The end-to-end headers of a response as bytes, its Content-Length, whether it is
    chunked, and its Upgrade; hop-by-hop headers and those its Connection lists dropped."""
    out: list[bytes] = []
    content_length: bytes | None = None
    upgrade: bytes | None = None
    chunked = False
    listed: set[bytes] | None = None
    for name, value in headers:
        lname = name.lower()
        if lname in HOP_BY_HOP:
            if lname == b"content-length":
                content_length = value
            elif lname == b"transfer-encoding":
                chunked = True
            elif lname == b"upgrade":
                upgrade = value
            elif lname == b"connection" and value.lower() not in _SELF_TOKENS:
                tokens = connection_tokens(value) - _SELF_TOKENS
                if tokens:
                    listed = tokens if listed is None else listed | tokens
            continue
        out += (name, b": ", value, CRLF)
    if listed:
        out = []
        for name, value in headers:
            lname = name.lower()
            if lname not in HOP_BY_HOP and lname not in listed:
                out += (name, b": ", value, CRLF)
    return b"".join(out), content_length, chunked, upgrade
