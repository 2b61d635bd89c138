"""The listener's cache of request heads (``http1.headcache``) against the parser it stands in
for.

Each scenario runs through a real listener to a recording upstream twice: with the cache, and
with it switched off (every request parsed by httptools). The client must receive the same
bytes, and the upstream the same requests (request ids aside, which are new every time).
"""

from __future__ import annotations

import asyncio
import contextlib
import re
from typing import Any

import pytest

from interknit.http1 import headcache
from interknit.proxy import RouteSpec
from interknit.proxy import http as http_module
from tests.proxy.talk import exchange

OK = b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok"


class Recorder:
    """An upstream that keeps every byte it receives (per connection) and answers OK."""

    def __init__(self) -> None:
        self.received: list[bytes] = []
        self.server: asyncio.Server | None = None

    async def start(self) -> str:
        self.server = await asyncio.start_server(self.handle, "127.0.0.1", 0)
        return f"127.0.0.1:{self.server.sockets[0].getsockname()[1]}"

    async def handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        index = len(self.received)
        self.received.append(b"")
        with contextlib.suppress(ConnectionError, asyncio.IncompleteReadError):
            while True:
                head = await reader.readuntil(b"\r\n\r\n")
                self.received[index] += head
                length = re.search(rb"(?i)\r\ncontent-length: *(\d+)", head)
                if length:
                    self.received[index] += await reader.readexactly(int(length.group(1)))
                writer.write(OK)
                await writer.drain()
        writer.close()

    def close(self) -> None:
        if self.server is not None:
            self.server.close()


GET = b"GET /a?b=c HTTP/1.1\r\nHost: example.test\r\nAccept: */*\r\n\r\n"
# A head is kept from its second parse and used from its third: scenarios repeat theirs.
SCENARIOS: dict[str, list[list[bytes]]] = {
    "repeated": [[GET] * 4],
    "pipelined in one read, then one by one": [[GET * 3, GET, GET, GET]],
    "connection close": [
        [b"GET / HTTP/1.1\r\nHost: a\r\nConnection: close\r\n\r\n"],
        [b"GET / HTTP/1.1\r\nHost: a\r\nConnection: close\r\n\r\n"],
        [b"GET / HTTP/1.1\r\nHost: a\r\nConnection: close\r\n\r\n"],
    ],
    "more after connection close": [
        [GET, GET, GET, b"GET / HTTP/1.1\r\nHost: a\r\nConnection: close\r\n\r\n" + GET, GET],
    ],
    "http/1.0 kept alive, and without host": [
        [b"GET / HTTP/1.0\r\nConnection: keep-alive\r\nHost: a\r\n\r\n"] * 4,
        [b"GET / HTTP/1.0\r\nConnection: keep-alive\r\n\r\n"] * 4,
    ],
    "connection lists a header": [
        [b"GET / HTTP/1.1\r\nHost: a\r\nConnection: keep-alive, X-Drop\r\nX-Drop: 1\r\n\r\n"] * 4
    ],
    "forwarded-for and request id from the client": [
        [b"GET / HTTP/1.1\r\nHost: a\r\nX-Forwarded-For: 10.0.0.1\r\nX-Request-Id: r-1\r\n\r\n"] * 4
    ],
    "two hosts": [[b"GET / HTTP/1.1\r\nHost: a\r\nHost: b\r\n\r\n"] * 2],
    "no host": [[b"GET / HTTP/1.1\r\n\r\n"] * 2],
    "expect on a get": [[b"GET / HTTP/1.1\r\nHost: a\r\nExpect: 100-continue\r\n\r\n"] * 4],
    "upgrade": [[b"GET / HTTP/1.1\r\nHost: a\r\nConnection: upgrade\r\nUpgrade: x\r\n\r\n"] * 2],
    "bodies": [
        [b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 2\r\n\r\nhi"] * 4,
        [b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 0\r\n\r\n"] * 4,
        [b"POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n"] * 4,
    ],
    "split across reads": [[GET[:20], GET[20:], GET, GET, GET[:20], GET[20:], GET]],
    "then a bad request": [
        [GET, GET, GET, b"GET / HTTP/1.1\r\nHost: a\r\nBad Header: x\r\n\r\n", GET]
    ],
    "blank lines around": [[b"\r\n" + GET] * 4, [GET + b"\r\n"] * 4, [GET + b"\r\n\r\n"] * 4],
    "a byte after the head": [[GET + b"G"] * 3],
    "connect": [[b"CONNECT a:443 HTTP/1.1\r\nHost: a:443\r\n\r\n"] * 2],
    # The same fields under other request lines: only the line is read (with_request_line),
    # or the parser reads all when the line is not plain.
    "other targets, the same fields": [
        [
            b"GET /%s?q=%d HTTP/1.1\r\nHost: a\r\nCookie: s=1\r\nAccept: */*\r\n\r\n" % (part, i)
            for i, part in enumerate([b"a", b"b", b"c/d%20e;f=g~h@i:j!k$l&'()*+,", b"", b"a"])
        ]
    ],
    "targets only the parser reads": [
        [
            b"GET %s HTTP/1.1\r\nHost: a\r\nAccept: */*\r\n\r\n" % target
            for target in [b"/a", b"/b", b"/c#d", b"/e%zz", b'/f"\xc3\xa9', b"http://a/g", b"*"]
        ]
    ],
    "other lines with the same fields": [
        [
            b"GET /a HTTP/1.1\r\nHost: a\r\n\r\n",
            b"GET /b HTTP/1.1\r\nHost: a\r\n\r\n",
            b"HEAD /c HTTP/1.1\r\nHost: a\r\n\r\n",
            b"GET /d HTTP/1.0\r\nHost: a\r\n\r\n",
        ],
        [
            b"GET /a HTTP/1.0\r\nHost: a\r\nConnection: keep-alive\r\n\r\n",
            b"GET /b HTTP/1.1\r\nHost: a\r\nConnection: keep-alive\r\n\r\n",
            b"GET  /c HTTP/1.0\r\nHost: a\r\nConnection: keep-alive\r\n\r\n",
            b"GET /d  HTTP/1.0\r\nHost: a\r\nConnection: keep-alive\r\n\r\n",
            b"GET /e http/1.0\r\nHost: a\r\nConnection: keep-alive\r\n\r\n",
        ],
        [
            b"GET /a HTTP/1.1\r\nHost: a\r\n\r\n",
            b"POST /b HTTP/1.1\r\nHost: a\r\n\r\n",
            b"GET /c HTTP/1.1\r\nHost: a\r\n\r\nGET /d HTTP/1.1\r\nHost: a\r\n\r\n",
            b"GET /e HTTP/1.1\r\nHost: a\r\nConnection: close\r\n\r\n",
        ],
    ],
    "the same fields, but the first after blank lines": [
        [b"\r\nGET /a HTTP/1.1\r\nHost: a\r\n\r\n", b"GET /b HTTP/1.1\r\nHost: a\r\n\r\n"] * 2
    ],
    "http/2 preface": [[b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"] * 2],
}


def normalized(data: bytes) -> bytes:
    """Request ids, and the upstream's own port as Host for a request without one."""
    data = re.sub(rb"x-request-id: [0-9a-f]{16}-[0-9a-f]+", b"x-request-id: ID", data)
    return re.sub(rb"host: 127\.0\.0\.1:\d+", b"host: UPSTREAM", data)


async def run(proxy: Any, name: str, connections: list[list[bytes]], **kw: Any) -> Any:
    recorder = Recorder()
    p = await proxy(RouteSpec(servers=(await recorder.start(),)), name=name, **kw)
    replies = [await exchange(p.port, pieces, settle=0.1) for pieces in connections]
    await asyncio.sleep(0.05)
    recorder.close()
    return replies, [normalized(r) for r in recorder.received]


@pytest.mark.parametrize("scenario", list(SCENARIOS))
async def test_upstream_and_client_see_what_the_parser_alone_gives(
    scenario: str, proxy: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    connections = SCENARIOS[scenario]
    cached = await run(proxy, "cached", connections)
    with monkeypatch.context() as m:
        m.setattr(headcache, "MAX_BYTES", -1)  # listeners made now never keep a head
        parsed = await run(proxy, "parsed", connections)
    assert cached == parsed
    assert any(cached[0])


async def test_the_cache_is_used_and_keeps_the_listeners_limit(
    proxy: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    hits: list[bytes] = []
    original = http_module.HttpProxyProtocol.request_from_cache

    def spy(self: Any, head: Any, now: float) -> None:
        hits.append(head.target)
        original(self, head, now)

    monkeypatch.setattr(http_module.HttpProxyProtocol, "request_from_cache", spy)
    replies, received = await run(proxy, "hits", [[GET] * 4])
    assert replies[0].count(b"HTTP/1.1 200 OK") == 4
    # The connection's last fields answer from its second request on.
    assert hits == [b"/a?b=c"] * 3
    # Across connections the listener's cache keeps a head from its second parse and answers
    # it from the third.
    hits.clear()
    await run(proxy, "across", [[GET], [GET], [GET]])
    assert hits == [b"/a?b=c"]
    # Only the request line is read for the same fields under another target.
    hits.clear()
    heads = [GET.replace(b"/a?b=c", b"/%d" % i) for i in range(4)]
    replies, received = await run(proxy, "lines", [heads])
    assert hits == [b"/1", b"/2", b"/3"]
    assert re.findall(rb"GET (/\d) HTTP/1.1\r\n", received[0]) == [b"/0", b"/1", b"/2", b"/3"]
    assert len(set(re.findall(rb"x-request-id: ([^\r]+)", received[0]))) == 1  # normalized
    # Each listener has its own cache: a head cached by a listener with a large limit is still
    # too large for a small one.
    big = b"GET / HTTP/1.1\r\nHost: a\r\nX-Big: " + b"b" * 1100 + b"\r\n\r\n"
    await run(proxy, "large", [[big, big, big]])
    replies, _ = await run(proxy, "small", [[big]], max_header_bytes=1024)
    assert replies[0].startswith(b"HTTP/1.1 431 ")


async def test_request_ids_stay_unique_on_cached_requests(proxy: Any) -> None:
    recorder = Recorder()
    p = await proxy(RouteSpec(servers=(await recorder.start(),)))
    await exchange(p.port, [GET] * 5)
    ids = re.findall(rb"x-request-id: ([^\r]+)", recorder.received[0])
    assert len(ids) == 5 and len(set(ids)) == 5
    assert recorder.received[0].count(b"x-forwarded-for: 127.0.0.1\r\n") == 5
    recorder.close()
