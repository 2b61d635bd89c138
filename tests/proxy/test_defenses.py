"""Request smuggling vectors, oversized heads and slow clients: refused, closed, never forwarded."""

from __future__ import annotations

import asyncio
import time

import pytest

from interknit.proxy import RouteSpec
from tests.proxy.conftest import raw_exchange

VECTORS = {
    "cl-and-te": b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 4\r\n"
    b"Transfer-Encoding: chunked\r\n\r\n0\r\n\r\nGET /smuggled HTTP/1.1\r\nHost: x\r\n\r\n",
    "te-and-cl": b"POST / HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n"
    b"Content-Length: 4\r\n\r\n0\r\n\r\n",
    "duplicate-cl": b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 3\r\n"
    b"Content-Length: 3\r\n\r\nabc",
    "conflicting-cl": b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 3\r\n"
    b"Content-Length: 30\r\n\r\nabc",
    "cl-list": b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 3, 3\r\n\r\nabc",
    "negative-cl": b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: -1\r\n\r\n",
    "cl-plus": b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: +3\r\n\r\nabc",
    "te-not-chunked": b"POST / HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: gzip\r\n\r\nabc",
    "te-chunked-not-last": b"POST / HTTP/1.1\r\nHost: x\r\n"
    b"Transfer-Encoding: chunked, gzip\r\n\r\n",
    "te-obfuscated": b"POST / HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: xchunked\r\n\r\n",
    "te-space-before-colon": b"POST / HTTP/1.1\r\nHost: x\r\nTransfer-Encoding : chunked\r\n\r\n",
    "invalid-chunk-size": b"POST / HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n"
    b"zz\r\nabc\r\n0\r\n\r\n",
    "chunk-without-crlf": b"POST / HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n"
    b"3\r\nabcX\r\n0\r\n\r\n",
    "chunk-bare-lf": b"POST / HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n"
    b"3\nabc\n0\n\n",
    "obs-fold": b"GET / HTTP/1.1\r\nHost: x\r\nX-A: b\r\n c\r\n\r\n",
    "ctl-in-value": b"GET / HTTP/1.1\r\nHost: x\r\nX-A: b\x01c\r\n\r\n",
    "nul-in-value": b"GET / HTTP/1.1\r\nHost: x\r\nX-A: b\x00c\r\n\r\n",
    "bad-name-char": b"GET / HTTP/1.1\r\nHost: x\r\nX(A: bc\r\n\r\n",
    "bare-cr": b"GET / HTTP/1.1\r\nHost: x\rX: y\r\n\r\n",
    "bare-lf-head": b"GET / HTTP/1.1\nHost: x\n\n",
    "no-host": b"GET / HTTP/1.1\r\n\r\n",
    "two-hosts": b"GET / HTTP/1.1\r\nHost: a\r\nHost: b\r\n\r\n",
    "http-0.9": b"GET /\r\n\r\n",
    "space-in-target": b"GET /a b HTTP/1.1\r\nHost: x\r\n\r\n",
}


@pytest.fixture
async def guarded(backends, proxy):
    b = await backends("a")
    p = await proxy(RouteSpec(servers=(b.server,)), header_timeout=0.3)
    return b, p


@pytest.mark.parametrize("name", sorted(VECTORS))
async def test_smuggling_vector_is_400_and_closed(guarded, name: str) -> None:
    b, p = guarded
    answer = await raw_exchange(p.port, VECTORS[name])
    status_line = answer.split(b"\r\n", 1)[0]
    assert status_line.split()[1] in (b"400", b"505"), answer
    assert b"connection: close" in answer.lower()
    assert answer.count(b"HTTP/1.1 ") == 1  # nothing after the error: the connection closed
    assert b.seen == []


async def test_bad_request_after_a_good_one_is_answered_in_order(guarded) -> None:
    b, p = guarded
    answer = await raw_exchange(
        p.port,
        b"GET /ok HTTP/1.1\r\nHost: x\r\n\r\n"
        b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 1\r\nTransfer-Encoding: chunked\r\n\r\n",
    )
    first, _, rest = answer.partition(b"HTTP/1.1 400")
    assert first.startswith(b"HTTP/1.1 200") and rest
    assert [s["path"] for s in b.seen] == ["/ok"]


async def test_invalid_chunk_mid_stream_aborts_the_request(guarded) -> None:
    _b, p = guarded
    answer = await raw_exchange(
        p.port,
        b"POST /count HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabc\r\nZZZ\r\n",
    )
    assert answer.startswith(b"HTTP/1.1 400")


async def test_headers_over_32k_are_431(guarded) -> None:
    b, p = guarded
    big = b"X-Big: " + b"a" * 8000 + b"\r\n"
    answer = await raw_exchange(p.port, b"GET / HTTP/1.1\r\nHost: x\r\n" + big * 5 + b"\r\n")
    assert answer.startswith(b"HTTP/1.1 431")
    assert b"x-interknit-reason: headers-too-large" in answer
    assert b.seen == []
    # Just under the limit passes.
    answer = await raw_exchange(
        p.port, b"GET / HTTP/1.1\r\nHost: x\r\nConnection: close\r\n" + big * 3 + b"\r\n"
    )
    assert answer.startswith(b"HTTP/1.1 200")


async def test_slow_client_is_closed_after_header_timeout(guarded) -> None:
    b, p = guarded
    reader, writer = await asyncio.open_connection("127.0.0.1", p.port)
    started = time.monotonic()
    writer.write(b"GET / HTTP/1.1\r\nHost: x\r\n")
    for _ in range(3):  # trickle bytes: each one must not extend the deadline
        await asyncio.sleep(0.1)
        writer.write(b"X")
    answer = await asyncio.wait_for(reader.read(-1), 3)
    assert answer.startswith(b"HTTP/1.1 408")
    assert time.monotonic() - started < 2.5
    writer.close()
    assert b.seen == []


async def test_idle_connection_without_request_is_closed(guarded) -> None:
    _, p = guarded
    reader, writer = await asyncio.open_connection("127.0.0.1", p.port)
    answer = await asyncio.wait_for(reader.read(-1), 3)
    assert answer.startswith(b"HTTP/1.1 408")
    writer.close()


async def test_connect_method_refused(guarded) -> None:
    _, p = guarded
    answer = await raw_exchange(p.port, b"CONNECT example.com:443 HTTP/1.1\r\nHost: x\r\n\r\n")
    assert answer.startswith(b"HTTP/1.1 405")
