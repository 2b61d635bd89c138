"""The response fast path (``wire.SIMPLE_HEADS``) against the parser it stands in for.

Each case goes through a real listener to a scripted upstream, twice: once as it is, once
with the fast path switched off (no head short enough for it, so httptools parses every
response). What the client receives must be the same bytes, and the upstream must see the
same connections. A head the fast path accepts must also be one httptools reads the same way.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Iterator, Sequence
from typing import Any

import httptools
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from interknit.proxy import RouteSpec
from interknit.proxy import http as http_module
from interknit.proxy import upstream as upstream_module
from interknit.proxy.wire import SimpleHead, parse_simple_head
from tests.proxy.talk import exchange

DATE = b"Date: Thu, 27 Nov 2026 07:55:16 GMT\r\n"
OK = b"HTTP/1.1 200 OK\r\nServer: t\r\n" + DATE + b"Content-Length: 2\r\n\r\nok"

# A scripted answer: the pieces the upstream writes, with a short pause between them.
Script = Sequence[bytes]


class Upstream:
    """Answers the n-th request (over all connections) with ``scripts[n]``."""

    def __init__(self, scripts: Sequence[Script]) -> None:
        self.scripts = list(scripts)
        self.requests = 0
        self.connections = 0
        self.server: asyncio.Server | None = None

    async def start(self) -> str:
        self.server = await asyncio.start_server(self.handle, "127.0.0.1", 0)
        return f"127.0.0.1:{self.server.sockets[0].getsockname()[1]}"

    async def handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        with contextlib.suppress(ConnectionError, asyncio.IncompleteReadError):
            while True:
                await reader.readuntil(b"\r\n\r\n")
                script = self.scripts[min(self.requests, len(self.scripts) - 1)]
                self.requests += 1
                for i, piece in enumerate(script):
                    if i:
                        await asyncio.sleep(0.02)
                    writer.write(piece)
                    await writer.drain()
        writer.close()

    def close(self) -> None:
        if self.server is not None:
            self.server.close()


@contextlib.contextmanager
def parser_only(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    with monkeypatch.context() as m:
        m.setattr(upstream_module, "SIMPLE_HEAD_MAX", 0)  # no head is short enough
        yield


GET = b"GET /x HTTP/1.1\r\nHost: a\r\n\r\n"
HEAD = b"HEAD /x HTTP/1.1\r\nHost: a\r\n\r\n"
GET10 = b"GET /x HTTP/1.0\r\n\r\n"

CASES: dict[str, tuple[list[Script], list[bytes]]] = {
    "plain": ([[OK]], [GET, GET, GET]),
    "two equal content-lengths": (
        [[b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nContent-Length: 2\r\n\r\nok"], [OK]],
        [GET, GET],
    ),
    "two different content-lengths": (
        [[b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nContent-Length: 3\r\n\r\nok"], [OK]],
        [GET, GET],
    ),
    "content-length and chunked": (
        [
            [
                b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nTransfer-Encoding: chunked\r\n\r\n"
                b"2\r\nok\r\n0\r\n\r\n"
            ]
        ],
        [GET, GET],
    ),
    "chunked": (
        [[b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n2\r\nok\r\n0\r\n\r\n"], [OK]],
        [GET, GET],
    ),
    "204 with a content-length": (
        [[b"HTTP/1.1 204 No Content\r\nContent-Length: 2\r\n\r\n"], [OK]],
        [GET, GET],
    ),
    "304 with a content-length": (
        [[b"HTTP/1.1 304 Not Modified\r\nContent-Length: 2\r\n\r\n"], [OK]],
        [GET, GET],
    ),
    "head": (
        [[b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\n"], [OK]],
        [HEAD, GET],
    ),
    "head split across reads": (
        [[b"HTTP/1.1 200 OK\r\nServer: t\r\nConte", b"nt-Length: 2\r\n\r\nok"], [OK]],
        [GET, GET],
    ),
    "head split at its blank line": (
        [[b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n", b"\r\nok"], [OK]],
        [GET, GET],
    ),
    "body split across reads": (
        [[b"HTTP/1.1 200 OK\r\nContent-Length: 4\r\n\r\nok", b"ok"], [OK]],
        [GET, GET],
    ),
    "two responses in one write": ([[OK + OK], [OK]], [GET, GET]),
    "body longer than its content-length": (
        [[b"HTTP/1.1 200 OK\r\nContent-Length: 1\r\n\r\nok"], [OK]],
        [GET, GET],
    ),
    "upstream closes": (
        [[b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nConnection: close\r\n\r\nok"], [OK]],
        [GET, GET],
    ),
    "connection lists a header": (
        [
            [
                b"HTTP/1.1 200 OK\r\nConnection: keep-alive, X-Hop\r\nX-Hop: 1\r\n"
                b"Content-Length: 2\r\n\r\nok"
            ]
        ],
        [GET],
    ),
    "keep-alive header dropped": (
        [
            [
                b"HTTP/1.1 200 OK\r\nConnection: Keep-Alive\r\nKeep-Alive: timeout=5\r\n"
                b"Content-Length: 2\r\n\r\nok"
            ]
        ],
        [GET, GET],
    ),
    "http/1.0 upstream": (
        [[b"HTTP/1.0 200 OK\r\nContent-Length: 2\r\n\r\nok"], [OK]],
        [GET, GET],
    ),
    "http/1.0 client": ([[OK]], [GET10]),
    "100 continue first": (
        [[b"HTTP/1.1 100 Continue\r\n\r\n", OK], [OK]],
        [GET, GET],
    ),
    "503 is retried elsewhere": (
        [[b"HTTP/1.1 503 Service Unavailable\r\nContent-Length: 4\r\n\r\nbusy"], [OK]],
        [GET],
    ),
    "bare lf inside a header": (
        [[b"HTTP/1.1 200 OK\r\nX-A: 1\nContent-Length: 5\r\nContent-Length: 2\r\n\r\nok"], [OK]],
        [GET, GET],
    ),
    "folded header": (
        [[b"HTTP/1.1 200 OK\r\nX-A: 1\r\n  2\r\nContent-Length: 2\r\n\r\nok"], [OK]],
        [GET, GET],
    ),
    "space before colon": (
        [[b"HTTP/1.1 200 OK\r\nContent-Length : 2\r\n\r\nok"], [OK]],
        [GET, GET],
    ),
    "signed content-length": (
        [[b"HTTP/1.1 200 OK\r\nContent-Length: +2\r\n\r\nok"], [OK]],
        [GET, GET],
    ),
    "no content-length": (
        [[b"HTTP/1.1 200 OK\r\nServer: t\r\n\r\nok"]],
        [GET],
    ),
    "several set-cookies and odd spacing": (
        [
            [
                b"HTTP/1.1 201 Created\r\nSet-Cookie: a=1\r\nset-cookie:b=2  \r\nX-E:\r\n"
                b"Content-Length: 2\r\n\r\nok"
            ]
        ],
        [GET, GET],
    ),
    "obs-text in a value": (
        [[b"HTTP/1.1 200 OK\r\nX-A: \xe9\r\nContent-Length: 2\r\n\r\nok"]],
        [GET],
    ),
    "status without a reason": (
        [[b"HTTP/1.1 404\r\nContent-Length: 2\r\n\r\nno"], [OK]],
        [GET, GET],
    ),
}


@pytest.mark.parametrize("name", list(CASES))
async def test_client_sees_what_the_parser_alone_gives(
    name: str, proxy: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    scripts, requests = CASES[name]
    results = []
    for fast in (True, False):
        upstreams = [Upstream(scripts), Upstream([[OK]])]
        servers = tuple([await u.start() for u in upstreams])
        p = await proxy(RouteSpec(servers=servers, attempts=1), name=f"fast-{fast}")
        if fast:
            got = await exchange(p.port, requests, settle=0.3)
        else:
            with parser_only(monkeypatch):
                got = await exchange(p.port, requests, settle=0.3)
        results.append((got, [(u.requests, u.connections) for u in upstreams]))
        for u in upstreams:
            u.close()
    assert results[0] == results[1]
    assert results[0][0]  # the client got an answer


async def test_fast_path_is_taken_for_the_plain_case(
    proxy: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The comparison above is only worth something if the fast path does run."""
    taken: list[SimpleHead] = []
    original = http_module.Exchange.on_response_whole

    def spy(self: Any, head: SimpleHead, body: bytes) -> bool:
        done = original(self, head, body)
        if done:
            taken.append(head)
        return done

    monkeypatch.setattr(http_module.Exchange, "on_response_whole", spy)
    u = Upstream([[OK]])
    p = await proxy(RouteSpec(servers=(await u.start(),)))
    got = await exchange(p.port, [GET, GET], settle=0.3)
    assert got.count(b"HTTP/1.1 200 OK\r\n") == 2 and got.endswith(b"\r\n\r\nok")
    assert len(taken) == 2 and u.connections == 1
    u.close()


async def test_pipelined_requests_get_their_own_answers_in_order(proxy: Any) -> None:
    answers = [[b"HTTP/1.1 200 OK\r\nContent-Length: 1\r\n\r\n%d" % i] for i in range(5)]
    u = Upstream(answers)
    p = await proxy(RouteSpec(servers=(await u.start(),)))
    got = await exchange(p.port, [GET * 5], settle=0.3)
    bodies = [part[-1:] for part in got.split(b"HTTP/1.1 200 OK\r\n")[1:]]
    assert bodies == [b"0", b"1", b"2", b"3", b"4"]


# What the fast path accepts, httptools must read the same way.

_names = st.sampled_from(
    [
        b"Server",
        b"X-A",
        b"content-type",
        b"Content-Length",
        b"Connection",
        b"Keep-Alive",
        b"Set-Cookie",
        b"Transfer-Encoding",
        b"Upgrade",
        b"TE",
        b"x y",
        b"X-\x01",
        b"",
    ]
)
_values = st.sampled_from(
    [
        b"1",
        b"2",
        b"0",
        b"007",
        b" 2",
        b"2 ",
        b"+2",
        b"-1",
        b"keep-alive",
        b"close",
        b"chunked",
        b"a\rb",
        b"a\nb",
        b"\t x",
        b"\xe9",
        b"",
        b"a=1; Path=/",
        b"99999999999999999999",
    ]
)
_lines = st.builds(
    lambda n, sep, v: n + sep + v, _names, st.sampled_from([b":", b": ", b" :"]), _values
)
_status = st.sampled_from(
    [
        b"HTTP/1.1 200 OK",
        b"HTTP/1.1 204 No Content",
        b"HTTP/1.1 304 NM",
        b"HTTP/1.1 101 S",
        b"HTTP/1.1 503 X",
        b"HTTP/1.0 200 OK",
        b"HTTP/1.1 200",
        b"HTTP/1.1 299 \xe9",
        b"HTTP/1.1 404 ",
        b"http/1.1 200 OK",
        b"HTTP/1.1  200 OK",
        b"HTTP/1.1 600 X",
    ]
)


class _Recorder:
    def __init__(self) -> None:
        self.headers: list[tuple[bytes, bytes]] = []
        self.body = b""
        self.complete = False
        self.keep_alive = False
        self.parser: Any = None

    def on_header(self, name: bytes, value: bytes) -> None:
        self.headers.append((name, value))

    def on_body(self, body: bytes) -> None:
        self.body += body

    def on_message_complete(self) -> None:
        self.complete = True
        self.keep_alive = self.parser.should_keep_alive()  # reads False once it returns


_good_lines = st.sampled_from(
    [
        b"Server: nginx",
        b"X-A:1",
        b"Set-Cookie: a=1; Path=/",
        b"Connection: keep-alive",
        b"Keep-Alive: timeout=5",
        b"X-E:",
        b"X-T:\tv v \t",
    ]
)


@settings(max_examples=500, deadline=None)
@given(
    st.one_of(st.just(b"HTTP/1.1 200 OK"), _status),
    st.lists(st.one_of(_good_lines, _lines), max_size=5),
    st.integers(min_value=0, max_value=5),
    st.sampled_from([b"Content-Length: 2", b"Content-Length:0", b"content-length: 10", b""]),
)
def test_an_accepted_head_reads_the_same_in_httptools(
    status: bytes, lines: list[bytes], at: int, length: bytes
) -> None:
    if length:
        lines.insert(min(at, len(lines)), length)
    head = b"\r\n".join([status, *lines])
    found = parse_simple_head(head)
    if found is None:
        return
    body = b"x" * found.length
    recorder = _Recorder()
    parser = recorder.parser = httptools.HttpResponseParser(recorder)
    parser.feed_data(head + b"\r\n\r\n" + body)  # raises if httptools refuses it
    assert recorder.complete and recorder.body == body
    assert parser.get_status_code() == found.status
    assert parser.get_http_version() == "1.1" and recorder.keep_alive
    lengths = [v for n, v in recorder.headers if n.lower() == b"content-length"]
    assert lengths == [found.length_bytes]
    kept = b"".join(
        n + b": " + v + b"\r\n"
        for n, v in recorder.headers
        if n.lower() not in (b"content-length", b"connection", b"keep-alive")
    )
    assert found.prefix.split(b"\r\n", 1)[1] == kept
    assert not any(
        n.lower() in (b"transfer-encoding", b"upgrade", b"te", b"trailer")
        for n, _ in recorder.headers
    )
