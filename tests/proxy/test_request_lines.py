"""``with_request_line`` against the parser it stands in for: for a head whose header fields
were parsed before, reading only its request line must give what httptools and ``read_head``
give for the whole head, and must never take a line the parser would not."""

from __future__ import annotations

from typing import Any

import httptools
from hypothesis import given, settings
from hypothesis import strategies as st

from interknit.proxy.request import (
    Rejected,
    RequestHead,
    read_head,
    request_line,
    upstream_head,
    with_request_line,
)
from tests.proxy.test_access_log import SAFE


class Parsed:
    """httptools' callbacks for one head, and ``read_head`` of them (or its refusal)."""

    def __init__(self, data: bytes) -> None:
        self.url = b""
        self.fields: list[tuple[bytes, bytes]] = []
        self.head: RequestHead | Rejected | None = None
        self.complete = False
        parser = httptools.HttpRequestParser(self)
        self.parser = parser
        try:
            parser.feed_data(data)
        except httptools.HttpParserError as exc:
            cause = exc.__context__
            self.head = cause if isinstance(cause, Rejected) else None

    def on_url(self, url: bytes) -> None:
        self.url += url

    def on_header(self, name: bytes, value: bytes) -> None:
        self.fields.append((name, value))

    def on_headers_complete(self) -> None:
        p = self.parser
        self.head = read_head(
            p.get_method(),
            self.url,
            p.get_http_version(),
            self.fields,
            bool(p.should_keep_alive()),
        )

    def on_message_complete(self) -> None:
        self.complete = True


def same(a: RequestHead, b: RequestHead) -> bool:
    keys = [
        "method",
        "target",
        "path",
        "route_host",
        "host",
        "headers",
        "hdict",
        "http10",
        "keep_alive",
        "chunked",
        "content_length",
        "expect_continue",
        "upgrade",
        "request_id",
    ]
    return all(getattr(a, k) == getattr(b, k) for k in keys)


FIELD_LINES = [
    b"Host: shop.example\r\n",
    b"Host: Example.COM:8080\r\n",
    b"User-Agent: Mozilla/5.0 (X11; Linux x86_64)\r\n",
    b"Cookie: s=1; t=2\r\n",
    b"Accept: */*\r\n",
    b"Connection: keep-alive\r\n",
    b"Connection: keep-alive, X-Drop\r\n",
    b"X-Drop: 1\r\n",
    b"X-Request-Id: client-id\r\n",
    b"X-Forwarded-For: 10.0.0.1\r\n",
    b"Accept-Language: en;q=0.9\r\n",
]
PLAIN = st.from_regex(
    rb"/(?:[A-Za-z0-9\-._~!$&'()*+,;=:@/?]|%[0-9A-Fa-f]{2}){0,40}", fullmatch=True
)


@settings(max_examples=300)
@given(
    host=st.sampled_from(FIELD_LINES[:2]),
    fields=st.lists(st.sampled_from(FIELD_LINES), max_size=6),
    method=st.sampled_from([b"GET", b"HEAD", b"DELETE", b"OPTIONS"]),
    version=st.sampled_from([b"HTTP/1.1", b"HTTP/1.1", b"HTTP/1.0"]),
    first=PLAIN,
    second=st.one_of(PLAIN, st.binary(max_size=40)),
)
def test_only_the_line_read_gives_what_the_parser_gives(
    host: bytes, fields: list[bytes], method: bytes, version: bytes, first: bytes, second: bytes
) -> None:
    block = b"\r\n" + host + b"".join(fields) + b"\r\n"
    earlier = Parsed(method + b" " + first + b" " + version + block)
    prev = earlier.head
    if not isinstance(prev, RequestHead) or not prev.cacheable or not earlier.complete:
        return  # only such heads are kept (http.py's learn_fields)
    assert request_line(prev) == method + b" " + first + b" " + version
    upstream_head(prev, b"127.0.0.1", b"id-1")  # sets prev.upstream, as sending does
    line = method + b" " + second + b" " + version
    derived = with_request_line(prev, line)
    if derived is None:
        return  # the parser reads it: nothing to compare
    whole = Parsed(line + block)
    assert whole.complete and whole.url == second, "a line the parser would not take"
    assert isinstance(whole.head, RequestHead)
    assert same(derived, whole.head)
    assert upstream_head(derived, b"10.1.1.1", b"id-2") == upstream_head(
        whole.head, b"10.1.1.1", b"id-2"
    )


@given(target=st.binary(min_size=1, max_size=60))
def test_a_line_taken_is_one_the_parser_takes_as_it_is(target: bytes) -> None:
    block = b"\r\nHost: a\r\n\r\n"
    prev = Parsed(b"GET /x HTTP/1.1" + block).head
    assert isinstance(prev, RequestHead)
    derived = with_request_line(prev, b"GET " + target + b" HTTP/1.1")
    if derived is None:
        return
    whole = Parsed(b"GET " + target + b" HTTP/1.1" + block)
    assert whole.complete and whole.url == target == derived.target
    # The access log writes a target so marked as it is, without looking: it must need no
    # escaping (printable ASCII but space, '"' and '\').
    assert derived.plain_target or derived is prev
    assert not derived.plain_target or not target.translate(None, SAFE)


def test_other_methods_versions_and_spellings_go_to_the_parser() -> None:
    prev = Parsed(b"GET /x HTTP/1.1\r\nHost: a\r\n\r\n").head
    assert isinstance(prev, RequestHead)
    for line in [
        b"POST /y HTTP/1.1",
        b"GET /y HTTP/1.0",
        b"GET  /y HTTP/1.1",
        b"GET /y  HTTP/1.1",
        b"get /y HTTP/1.1",
        b"GET /y http/1.1",
        b"GET http://a/y HTTP/1.1",
        b"GET /y#z HTTP/1.1",
        b"GET /y%zz HTTP/1.1",
        b"GET /\xc3\xa9 HTTP/1.1",
        b"GET",
        b"",
    ]:
        assert with_request_line(prev, line) is None, line
    assert with_request_line(prev, b"GET /x HTTP/1.1") is prev
    found: Any = with_request_line(prev, b"GET /y?q=1 HTTP/1.1")
    assert (found.target, found.path, found.route_host) == (b"/y?q=1", b"/y", b"a")


async def test_a_rule_added_to_make_head_holds_for_a_head_read_by_its_line(
    proxy: Any, backends: Any, monkeypatch: Any
) -> None:
    """The shortcut goes through the same rule functions as the parser path: a request-line
    rule added to ``make_head`` refuses a head whose fields are the last head's too."""
    import asyncio

    from interknit.proxy import RouteSpec
    from interknit.proxy import http as http_module
    from interknit.proxy import request as request_module
    from tests.proxy.conftest import read_response

    original = request_module.make_head
    used: list[bytes] = []

    def strict(
        method: bytes, target: bytes, fields: Any, plain_target: bool = False
    ) -> RequestHead:
        if target.startswith(b"/forbidden"):
            raise Rejected(403, "test-rule")
        return original(method, target, fields, plain_target)

    def spy(prev: RequestHead, line: bytes) -> RequestHead | None:
        used.append(line)
        return with_request_line(prev, line)

    monkeypatch.setattr(request_module, "make_head", strict)
    monkeypatch.setattr(http_module, "with_request_line", spy)
    b = await backends("a")
    p = await proxy(RouteSpec(servers=(b.server,)))
    reader, writer = await asyncio.open_connection("127.0.0.1", p.port)
    fields = b"Host: a\r\nAccept: */*\r\n\r\n"
    writer.write(b"GET /allowed HTTP/1.1\r\n" + fields)
    status, _, _ = await read_response(reader)
    assert status == 200
    writer.write(b"GET /forbidden/x HTTP/1.1\r\n" + fields)
    answer = await asyncio.wait_for(reader.read(-1), 5)
    writer.close()
    assert used == [b"GET /forbidden/x HTTP/1.1"]  # read by its line alone
    assert answer.startswith(b"HTTP/1.1 403") and b"test-rule" in answer
    assert [s["path"] for s in b.seen] == ["/allowed"]
