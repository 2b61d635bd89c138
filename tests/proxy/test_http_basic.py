"""Requests through a real listener to real backends: forwarding, headers, keep-alive, bodies."""

from __future__ import annotations

import asyncio

import httpx

from interknit.proxy import RouteSpec
from tests.proxy.conftest import body_json, read_response, seen_headers


async def test_get_is_forwarded_with_forwarding_headers(backends, proxy) -> None:
    b = await backends("a")
    p = await proxy(RouteSpec(servers=(b.server,)))
    async with httpx.AsyncClient() as client:
        r = await client.get(
            f"http://127.0.0.1:{p.port}/hello?x=1", headers={"Host": "example.com"}
        )
    assert r.status_code == 200
    assert r.headers["x-backend"] == "a"
    seen = seen_headers(b.seen[-1])
    assert b.seen[-1]["path"] == "/hello?x=1"
    assert seen["host"] == "example.com"
    assert seen["x-forwarded-for"] == "127.0.0.1"
    assert seen["x-forwarded-proto"] == "http"
    assert seen["x-forwarded-host"] == "example.com"
    assert len(seen["x-request-id"]) > 8


async def test_request_id_kept_and_forwarded_for_appended(backends, proxy) -> None:
    b = await backends("a")
    p = await proxy(RouteSpec(servers=(b.server,)))
    async with httpx.AsyncClient() as client:
        r = await client.get(
            f"http://127.0.0.1:{p.port}/",
            headers={"X-Request-Id": "abc-123", "X-Forwarded-For": "10.1.2.3"},
        )
    assert r.status_code == 200
    seen = seen_headers(b.seen[-1])
    assert seen["x-request-id"] == "abc-123"
    assert seen["x-forwarded-for"] == "10.1.2.3, 127.0.0.1"


async def test_hop_by_hop_headers_are_removed(backends, proxy) -> None:
    b = await backends("a")
    p = await proxy(RouteSpec(servers=(b.server,)))
    reader, writer = await asyncio.open_connection("127.0.0.1", p.port)
    writer.write(
        b"GET /h HTTP/1.1\r\nHost: x\r\nConnection: keep-alive, X-Secret\r\nX-Secret: 1\r\n"
        b"Keep-Alive: timeout=5\r\nProxy-Connection: keep-alive\r\nTE: trailers\r\n"
        b"Trailer: X-T\r\nX-Kept: yes\r\n\r\n"
    )
    status, headers, _ = await read_response(reader)
    writer.close()
    assert status == 200
    seen = seen_headers(b.seen[-1])
    for name in ("x-secret", "keep-alive", "proxy-connection", "te", "trailer", "upgrade"):
        assert name not in seen, name
    assert seen["x-kept"] == "yes"
    # The backend's own framing/connection headers are re-done, not copied.
    assert "keep-alive" not in headers


async def test_keep_alive_and_pipelined_requests_answer_in_order(backends, proxy) -> None:
    b = await backends("a")
    p = await proxy(RouteSpec(servers=(b.server,)))
    reader, writer = await asyncio.open_connection("127.0.0.1", p.port)
    # The first is the slowest: the answers must still come back in request order.
    writer.write(
        b"GET /1?delay=0.2 HTTP/1.1\r\nHost: x\r\n\r\n"
        b"GET /2?delay=0.05 HTTP/1.1\r\nHost: x\r\n\r\n"
        b"POST /3 HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\n\r\nhello"
        b"GET /4 HTTP/1.1\r\nHost: x\r\n\r\n"
    )
    paths = []
    for _ in range(4):
        status, _, body = await asyncio.wait_for(read_response(reader), 5)
        assert status == 200
        paths.append(body_json(body)["path"].split("?")[0])
    assert paths == ["/1", "/2", "/3", "/4"]
    assert [s["body_len"] for s in b.seen if s["path"] == "/3"] == [5]
    # Same connection is still usable (keep-alive).
    writer.write(b"GET /5 HTTP/1.1\r\nHost: x\r\n\r\n")
    status, _, body = await read_response(reader)
    assert body_json(body)["path"] == "/5"
    writer.close()


async def test_http10_close_and_keep_alive(backends, proxy) -> None:
    b = await backends("a")
    p = await proxy(RouteSpec(servers=(b.server,)))
    reader, writer = await asyncio.open_connection("127.0.0.1", p.port)
    writer.write(b"GET /s HTTP/1.0\r\n\r\n")
    status, headers, body = await read_response(reader)
    assert status == 200 and body_json(body)["path"] == "/s"
    assert headers["connection"] == "close"
    assert await asyncio.wait_for(reader.read(), 2) == b""
    writer.close()


async def test_chunked_upload_and_download(backends, proxy) -> None:
    b = await backends("a")
    p = await proxy(RouteSpec(servers=(b.server,)))

    async def gen():
        for i in range(50):
            yield bytes([65 + i % 26]) * 10_000

    async with httpx.AsyncClient() as client:
        r = await client.post(f"http://127.0.0.1:{p.port}/count", content=gen())
        assert r.status_code == 200
        assert r.json() == {"received": 500_000}
        r = await client.get(f"http://127.0.0.1:{p.port}/stream?size=300001")
        assert r.status_code == 200
        assert r.headers["transfer-encoding"] == "chunked"
        assert len(r.content) == 300_001
        r = await client.get(f"http://127.0.0.1:{p.port}/stream?size=70000&sized=1")
        assert r.headers["content-length"] == "70000" and len(r.content) == 70_000
        r = await client.head(f"http://127.0.0.1:{p.port}/stream?size=70000&sized=1")
        assert r.status_code == 200 and r.content == b""
        r = await client.get(f"http://127.0.0.1:{p.port}/after-head")
        assert r.status_code == 200


async def test_chunked_upload_reaches_backend_chunked(backends, proxy) -> None:
    b = await backends("a")
    p = await proxy(RouteSpec(servers=(b.server,)))
    reader, writer = await asyncio.open_connection("127.0.0.1", p.port)
    writer.write(
        b"POST /c HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n"
        b"5;ext=1\r\nhello\r\n6\r\n world\r\n0\r\nX-Trailer: t\r\n\r\n"
    )
    status, _, body = await read_response(reader)
    writer.close()
    record = body_json(body)
    assert status == 200 and record["body_len"] == 11 and record["chunked"]
    assert "x-trailer" not in seen_headers(record)


async def test_expect_100_continue(backends, proxy) -> None:
    b = await backends("a")
    p = await proxy(RouteSpec(servers=(b.server,)))
    reader, writer = await asyncio.open_connection("127.0.0.1", p.port)
    writer.write(
        b"POST /e HTTP/1.1\r\nHost: x\r\nContent-Length: 4\r\nExpect: 100-continue\r\n\r\n"
    )
    interim = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)
    assert interim == b"HTTP/1.1 100 Continue\r\n\r\n"
    writer.write(b"data")
    status, _, body = await read_response(reader)
    writer.close()
    assert status == 200 and body_json(body)["body_len"] == 4
    assert "expect" not in seen_headers(b.seen[-1])


async def test_curl_through_proxy(backends, proxy) -> None:
    from tests.conftest import require_tool

    curl = require_tool("curl")
    b = await backends("a")
    p = await proxy(RouteSpec(servers=(b.server,)))
    proc = await asyncio.create_subprocess_exec(
        curl,
        "-s",
        "-d",
        "x" * 3000,
        f"http://127.0.0.1:{p.port}/curl",
        stdout=asyncio.subprocess.PIPE,
    )
    out, _ = await proc.communicate()
    assert proc.returncode == 0
    assert body_json(out)["body_len"] == 3000


async def _close_delimited_backend() -> tuple[asyncio.Server, str]:
    """Answers without Content-Length or chunking: the body ends when the connection does."""

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.readuntil(b"\r\n\r\n")
        writer.write(b"HTTP/1.1 200 OK\r\nConnection: close\r\n\r\n" + b"e" * 100_000)
        await writer.drain()
        writer.close()

    server = await asyncio.start_server(handle, "127.0.0.1", 0)
    return server, f"127.0.0.1:{server.sockets[0].getsockname()[1]}"


async def test_close_delimited_upstream_body_is_reframed(proxy) -> None:
    server, addr = await _close_delimited_backend()
    p = await proxy(RouteSpec(servers=(addr,)))
    async with httpx.AsyncClient() as client:
        for _ in range(2):  # and the client connection stays usable
            r = await client.get(f"http://127.0.0.1:{p.port}/")
            assert r.status_code == 200
            assert r.headers["transfer-encoding"] == "chunked"
            assert r.content == b"e" * 100_000
    reader, writer = await asyncio.open_connection("127.0.0.1", p.port)
    writer.write(b"GET / HTTP/1.0\r\n\r\n")
    answer = await asyncio.wait_for(reader.read(-1), 5)
    head, _, body = answer.partition(b"\r\n\r\n")
    assert b"transfer-encoding" not in head.lower() and body == b"e" * 100_000
    writer.close()
    server.close()


async def test_unrequested_101_is_a_bad_response(proxy) -> None:
    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.readuntil(b"\r\n\r\n")
        writer.write(
            b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: x\r\nConnection: upgrade\r\n\r\n"
        )
        await writer.drain()

    server = await asyncio.start_server(handle, "127.0.0.1", 0)
    p = await proxy(RouteSpec(servers=(f"127.0.0.1:{server.sockets[0].getsockname()[1]}",)))
    async with httpx.AsyncClient() as client:
        r = await client.get(f"http://127.0.0.1:{p.port}/")
    assert r.status_code == 502 and r.headers["x-interknit-reason"] == "bad-response"
    server.close()
