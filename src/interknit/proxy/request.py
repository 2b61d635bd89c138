"""A request head: the rules every head must pass, and the head sent upstream for it.

The rules come in two parts, by what they read: ``read_fields`` reads the header fields (Host,
framing, Connection, Expect, Upgrade; what it makes, ``Fields``, depends only on the fields'
bytes and the HTTP version), and ``make_head`` reads the request line's target (absolute-form,
the path) and makes the ``RequestHead`` from it and a ``Fields``. ``read_head`` is both, after
the version and method rules, and is what the parser path calls for every head. Every other
way a head is made goes through the same functions: the listener's head cache
(``http1.headcache``) holds only what ``read_head`` returned for the same bytes, and a head
whose fields are byte for byte those of the connection's last head (``with_request_line``)
reuses that head's ``Fields`` and goes through ``make_head`` with its own target. A rule added
to either part holds for both.

A refused head raises ``Rejected`` (status and reason; the connection closes).

Framing is re-done on both sides: the proxy never forwards Content-Length, Transfer-Encoding
or any other hop-by-hop header as it came, so that the upstream sees one unambiguous framing
(no request smuggling). httptools (llhttp) rejects conflicting or invalid framing, obsolete
line folding and bad header characters; the rules here add the Host rule, the version rule,
the method rule and the transfer-coding rule.
"""

from __future__ import annotations

import re
from collections.abc import Sequence

from interknit.balance.base import Endpoint
from interknit.proxy.routing import host_without_port, split_target
from interknit.proxy.wire import CRLF, REQUEST_REWRITTEN, connection_tokens

# Connection options that name no header field to drop.
_SELF_TOKENS = frozenset({b"connection", b"keep-alive", b"upgrade", b"close"})
# Fields a Connection header can never have dropped: the framing, Host, and what the proxy
# writes itself (HAProxy and nginx hold the same line).
_PROTECTED = REQUEST_REWRITTEN | {b"host"}
_DEFAULT_PORTS = {b"http": b":80", b"https": b":443"}


class Rejected(Exception):
    """A request refused with ``status`` (and a close)."""

    def __init__(self, status: int, reason: str) -> None:
        super().__init__(reason)
        self.status = status
        self.reason = reason


class Fields:
    """What a head's header fields say (``read_fields``). Never changed once made (but for
    ``block``, filled in on first use): the heads read with the same field bytes share it."""

    __slots__ = (
        "block",
        "chunked",
        "content_length",
        "expect_continue",
        "hdict",
        "headers",
        "host",
        "http10",
        "keep_alive",
        "request_id",
        "route_host",
        "upgrade",
    )

    def __init__(
        self,
        headers: Sequence[tuple[bytes, bytes]],
        hdict: dict[bytes, bytes],
        http10: bool,
        keep_alive: bool,
    ) -> None:
        self.headers = headers  # forwarded as they came: end-to-end fields only
        self.hdict = hdict  # every field by its lower-cased name (repeated ones joined)
        self.http10 = http10
        self.keep_alive = keep_alive
        self.host = hdict.get(b"host", b"")
        self.route_host = host_without_port(self.host)
        self.chunked = False
        self.content_length: bytes | None = None
        self.expect_continue = False
        self.upgrade: bytes | None = None
        self.request_id = hdict.get(b"x-request-id") or None
        # The upstream head after its request line, up to the client's address (see
        # upstream_head); None until used, b"" when the head has no Host (each endpoint then
        # needs its own).
        self.block: bytes | None = None


class RequestHead:
    """One request head that passed every rule: its request line, and its ``Fields`` (whose
    values it carries too, for the hot path). Never changed once made (but for
    ``upstream``): the exchanges made from the same bytes share it."""

    __slots__ = (
        "chunked",
        "content_length",
        "expect_continue",
        "fields",
        "hdict",
        "headers",
        "host",
        "http10",
        "keep_alive",
        "method",
        "path",
        "plain_target",
        "request_id",
        "route_host",
        "target",
        "upgrade",
        "upstream",
    )

    def __init__(
        self, method: bytes, target: bytes, fields: Fields, plain_target: bool = False
    ) -> None:
        self.method = method
        self.target = target  # origin-form (or "*")
        # Known to hold only printable ASCII but ' ', '"' and '\' (the access log writes it as
        # it is without looking); False where nobody looked.
        self.plain_target = plain_target
        self.path = split_target(target)[0]
        self.fields = fields
        self.headers = fields.headers
        self.hdict = fields.hdict
        self.http10 = fields.http10
        self.keep_alive = fields.keep_alive
        self.host = fields.host
        self.route_host = fields.route_host
        self.chunked = fields.chunked
        self.content_length = fields.content_length
        self.expect_continue = fields.expect_continue
        self.upgrade = fields.upgrade
        self.request_id = fields.request_id
        # The upstream head up to the client's address; None until used, b"" when the head
        # has no Host (each endpoint then needs its own).
        self.upstream: bytes | None = None

    @property
    def bodiless(self) -> bool:
        return not self.chunked and self.content_length is None

    @property
    def cacheable(self) -> bool:
        """Whether the same bytes may be answered with this head again (``HeadCache``)."""
        return (
            self.keep_alive and self.bodiless and not self.expect_continue and self.upgrade is None
        )


def read_head(
    method: bytes,
    target: bytes,
    version: str,
    fields: Sequence[tuple[bytes, bytes]],
    keep_alive: bool,
) -> RequestHead:
    """The head the parser gave, checked; raises ``Rejected``. ``keep_alive``: what the
    parser says of the connection after this request (the head may only shorten it)."""
    if version != "1.1" and version != "1.0":
        raise Rejected(505, "unsupported-version")
    if method == b"CONNECT":
        raise Rejected(405, "connect-not-supported")
    return make_head(method, target, read_fields(fields, version == "1.0", keep_alive))


def read_fields(fields: Sequence[tuple[bytes, bytes]], http10: bool, keep_alive: bool) -> Fields:
    """The header fields' rules (Host, Connection, framing); raises ``Rejected``."""
    headers: list[tuple[bytes, bytes]] = []
    hdict: dict[bytes, bytes] = {}
    hosts = 0
    listed: set[bytes] | None = None
    for name, value in fields:
        lname = name.lower()
        if lname in REQUEST_REWRITTEN:
            if lname == b"connection":
                # The usual "keep-alive" or "close" lists no header to drop: no set to build.
                if value.lower() not in _SELF_TOKENS:
                    tokens = connection_tokens(value) - _PROTECTED
                    if tokens:
                        listed = tokens if listed is None else listed | tokens
                if lname in hdict:
                    value = hdict[lname] + b", " + value
            elif lname in _JOINED and lname in hdict:
                value = hdict[lname] + b", " + value
        else:
            headers.append((name, value))
            if lname == b"host":
                hosts += 1
        hdict[lname] = value
    if hosts > 1 or (hosts == 0 and not http10) or (hosts == 1 and not hdict[b"host"].strip()):
        # An empty Host names no authority to route by; forwarded, it would also sit beside
        # the Host the proxy writes for a request without one.
        raise Rejected(400, "bad-host")
    if listed:
        headers = [(n, v) for n, v in headers if n.lower() not in listed]
    connection = hdict.get(b"connection")
    if connection is not None and keep_alive:
        # "close" anywhere in Connection ends the connection after this request (RFC 9112
        # 9.6), also beside "keep-alive" on HTTP/1.0, which llhttp then takes as kept alive.
        options = connection_tokens(connection)
        keep_alive = b"close" not in options and (not http10 or b"keep-alive" in options)
    result = Fields(headers, hdict, http10, keep_alive)
    coding = hdict.get(b"transfer-encoding")
    if coding is not None:
        _check_codings(coding, http10)
        result.chunked = True
    elif b"content-length" in hdict:
        result.content_length = hdict[b"content-length"].strip()
    expect = hdict.get(b"expect")
    if expect is not None and not http10 and expect.lower() == b"100-continue":
        result.expect_continue = True
    if b"upgrade" in hdict and b"upgrade" in connection_tokens(hdict.get(b"connection", b"")):
        result.upgrade = hdict[b"upgrade"]
    return result


def make_head(
    method: bytes, target: bytes, fields: Fields, plain_target: bool = False
) -> RequestHead:
    """The request line's rules (an absolute-form target), and the head; raises
    ``Rejected``."""
    if target[:1] != b"/" and b"://" in target:
        target, fields = _origin_form(target, fields)
    return RequestHead(method, target, fields, plain_target)


# A target whose bytes llhttp passes on as they are, and which routing reads as a path and a
# query: origin-form, unreserved and sub-delimiter characters, ':', '@', '/', '?' and
# well-formed percent-escapes. Anything else (a fragment, quotes, spaces, bytes outside
# ASCII) goes through the parser.
_PLAIN_TARGET = re.compile(rb"/[A-Za-z0-9\-._~!$&'()*+,;=:@/?%]*")
_BAD_ESCAPE = re.compile(rb"%(?![0-9A-Fa-f]{2})")


def request_line(head: RequestHead) -> bytes:
    """The request line ``head`` would have come in on, in its one canonical spelling."""
    version = b" HTTP/1.0" if head.http10 else b" HTTP/1.1"
    return b"".join((head.method, b" ", head.target, version))


def with_request_line(prev: RequestHead, line: bytes) -> RequestHead | None:
    """What ``read_head`` gives for ``line`` followed by the very header fields ``prev`` was
    read from, when that is sure without the parser; else None.

    ``prev`` must be a cacheable head whose request line was ``request_line(prev)``; ``line``
    must be its method, one space, a plain origin-form target (``_PLAIN_TARGET``), one space
    and its version. llhttp then calls back with the same method, version and fields and this
    target, and ends in the same state; the version and method rules hold as they held for
    ``prev``, ``read_fields`` would make the same ``Fields`` of the same fields and version, and
    ``make_head`` reads the target."""
    method = prev.method
    n = len(method)
    version = b" HTTP/1.0" if prev.http10 else b" HTTP/1.1"
    if line[n : n + 1] != b" " or not line.startswith(method) or not line.endswith(version):
        return None
    target = line[n + 1 : -9]
    if target == prev.target:
        return prev
    if _PLAIN_TARGET.fullmatch(target) is None or (
        b"%" in target and _BAD_ESCAPE.search(target) is not None
    ):
        return None
    return make_head(method, target, prev.fields, plain_target=True)


# Fields whose repeated lines are one list (RFC 9110 5.3), joined for the rules that read them.
_JOINED = frozenset({b"x-forwarded-for", b"transfer-encoding"})


def _origin_form(target: bytes, fields: Fields) -> tuple[bytes, Fields]:
    """An absolute-form target (RFC 9112 3.2.2): its authority is the request's host, and
    the request goes upstream in origin-form with that authority as Host. A Host field that
    names another host is refused, as HAProxy does: routing by one and forwarding the other
    would let a client pick a route its Host could not."""
    scheme, _, rest = target.partition(b"://")
    scheme = scheme.lower()
    if scheme not in _DEFAULT_PORTS:
        raise Rejected(400, "bad-target")
    slash = rest.find(b"/")
    query = rest.find(b"?")
    end = min(i for i in (slash, query, len(rest)) if i >= 0)
    authority = rest[:end]
    path = rest[end:]
    if not authority or b"@" in authority:
        raise Rejected(400, "bad-target")
    if not path.startswith(b"/"):
        path = b"/" + path
    default = _DEFAULT_PORTS[scheme]
    own = authority.lower().removesuffix(default)
    host = fields.hdict.get(b"host")
    if host is not None and host.lower().removesuffix(default) != own:
        raise Rejected(400, "host-mismatch")
    hdict = {**fields.hdict, b"host": authority}
    forwarded = [(n, v) for n, v in fields.headers if n.lower() != b"host"]
    forwarded.append((b"Host", authority))
    moved = Fields(forwarded, hdict, fields.http10, fields.keep_alive)
    moved.chunked = fields.chunked
    moved.content_length = fields.content_length
    moved.expect_continue = fields.expect_continue
    moved.upgrade = fields.upgrade
    return path, moved


def _check_codings(value: bytes, http10: bool) -> None:
    """The request's transfer codings must be ``chunked`` alone (RFC 9112 6.1): the proxy
    decodes no other, and forwarding a body it cannot frame would be a smuggling risk."""
    codings = [c.strip().lower() for c in value.split(b",")]
    if http10:
        # HTTP/1.0 has no transfer codings: its framing is faulty (RFC 9112 6.1).
        raise Rejected(400, "bad-transfer-encoding")
    if codings == [b"chunked"]:
        return
    if codings[-1] != b"chunked" or b"chunked" in codings[:-1]:
        raise Rejected(400, "bad-transfer-encoding")
    raise Rejected(501, "unsupported-transfer-coding")


def upstream_head(
    head: RequestHead,
    client_ip: bytes,
    request_id: bytes,
    *,
    https: bool = False,
    timeout: bytes | None = None,
    endpoint: bytes = b"",
) -> bytes:
    """The head sent upstream for ``head``, from ``client_ip`` with ``request_id``.

    ``https``: the client came over TLS (``X-Forwarded-Proto: https``; fields and heads are
    kept per listener, so their cached parts are always for the same scheme). ``timeout``:
    the ``X-Request-Timeout`` to send instead of the client's (demand control's time left).
    ``endpoint``: ``host:port`` of the endpoint, the Host of a head that has none.
    """
    if timeout is None:
        start = head.upstream
        if start is None:
            fields = head.fields
            block = fields.block
            if block is None:
                block = fields.block = _upstream_fields(fields, None, b"", https)
            start = head.upstream = (
                b"".join((head.method, b" ", head.target, b" HTTP/1.1\r\n", block))
                if block
                else b""
            )
        if start:
            if head.request_id is not None:
                return start + client_ip + b"\r\n\r\n"
            return b"".join((start, client_ip, b"\r\nx-request-id: ", request_id, b"\r\n\r\n"))
    start = b"".join(
        (
            head.method,
            b" ",
            head.target,
            b" HTTP/1.1\r\n",
            _upstream_fields(head.fields, timeout, endpoint, https),
        )
    )
    if head.request_id is not None:
        return start + client_ip + b"\r\n\r\n"
    return b"".join((start, client_ip, b"\r\nx-request-id: ", request_id, b"\r\n\r\n"))


def upstream_head_https(
    head: RequestHead,
    client_ip: bytes,
    request_id: bytes,
    *,
    timeout: bytes | None = None,
    endpoint: bytes = b"",
) -> bytes:
    """``upstream_head`` for a client that came over TLS."""
    return upstream_head(
        head, client_ip, request_id, https=True, timeout=timeout, endpoint=endpoint
    )


def _upstream_fields(
    fields: Fields, timeout: bytes | None, endpoint: bytes, https: bool = False
) -> bytes:
    """The upstream head after the request line, up to the client's address; b"" when it
    needs ``endpoint`` and has none (a head without Host)."""
    if not fields.host and not endpoint:
        return b""
    out: list[bytes] = []
    for name, value in fields.headers:
        if timeout is not None and name.lower() == b"x-request-timeout":
            continue
        out += (name, b": ", value, CRLF)
    if timeout is not None:
        out += (b"x-request-timeout: ", timeout, CRLF)
    if fields.chunked:
        out.append(b"transfer-encoding: chunked\r\n")
    elif fields.content_length is not None:
        out += (b"content-length: ", fields.content_length, CRLF)
    if fields.upgrade is not None:
        out += (b"connection: upgrade\r\nupgrade: ", fields.upgrade, CRLF)
    out.append(b"x-forwarded-proto: https\r\n" if https else b"x-forwarded-proto: http\r\n")
    if fields.host:
        out += (b"x-forwarded-host: ", fields.host, CRLF)
    else:
        # HTTP/1.0 clients may omit Host; the upstream speaks 1.1 and needs one.
        out += (b"host: ", endpoint, CRLF)
    if fields.request_id is not None:
        out += (b"x-request-id: ", fields.request_id, CRLF)
    forwarded = fields.hdict.get(b"x-forwarded-for")
    out.append(b"x-forwarded-for: ")
    if forwarded:
        out += (forwarded, b", ")
    return b"".join(out)


def host_field(endpoint: Endpoint) -> bytes:
    """A Host value naming ``endpoint`` (IPv6 addresses in brackets)."""
    address = endpoint.address
    if ":" in address:
        address = f"[{address}]"
    return f"{address}:{endpoint.port}".encode()


def cookie_value(header: bytes | None, name: bytes) -> bytes | None:
    """The value of cookie ``name`` in a Cookie header."""
    if not header:
        return None
    for part in header.split(b";"):
        key, sep, value = part.strip().partition(b"=")
        if sep and key == name:
            return value
    return None
