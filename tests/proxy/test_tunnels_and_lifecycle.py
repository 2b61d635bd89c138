"""Upgrade tunnels, the TCP relay, connection limits and draining on stop."""

from __future__ import annotations

import asyncio
import contextlib
import re

import httpx
import pytest

from interknit.proxy import RouteSpec
from interknit.proxy.listener import HttpListener
from tests.proxy.conftest import read_response, until


async def _switch_and_echo(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    """Answer 101, then echo every byte upper-cased until the proxy closes its side."""
    writer.write(
        b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: echo\r\nConnection: Upgrade\r\n\r\n"
    )
    while data := await reader.read(65536):
        writer.write(data.upper())
        await writer.drain()
    writer.close()


async def _upgrade_backend() -> tuple[asyncio.Server, str]:
    """Answers an Upgrade with 101, then echoes every byte upper-cased."""

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        head = await reader.readuntil(b"\r\n\r\n")
        if b"upgrade: echo" not in head.lower():
            writer.write(b"HTTP/1.1 400 Bad Request\r\nContent-Length: 0\r\n\r\n")
            writer.close()
            return
        await _switch_and_echo(reader, writer)

    server = await asyncio.start_server(handle, "127.0.0.1", 0)
    return server, f"127.0.0.1:{server.sockets[0].getsockname()[1]}"


async def test_upgrade_is_tunneled_after_101(proxy) -> None:
    server, addr = await _upgrade_backend()
    p = await proxy(RouteSpec(servers=(addr,)))
    reader, writer = await asyncio.open_connection("127.0.0.1", p.port)
    # Bytes sent right after the head (before the 101) must reach the backend too.
    writer.write(
        b"GET /ws HTTP/1.1\r\nHost: x\r\nConnection: Upgrade\r\nUpgrade: echo\r\n\r\nearly "
    )
    head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)
    assert head.startswith(b"HTTP/1.1 101")
    assert b"upgrade: echo" in head.lower()
    writer.write(b"hello tunnel")
    got = b""
    while len(got) < len(b"EARLY HELLO TUNNEL"):
        got += await asyncio.wait_for(reader.read(100), 5)
    assert got == b"EARLY HELLO TUNNEL"
    writer.write_eof()
    assert await asyncio.wait_for(reader.read(), 5) == b""
    writer.close()
    server.close()


async def _read_body(reader: asyncio.StreamReader, head: bytes) -> bytes:
    """A request's body by its Content-Length or its chunks."""
    if re.search(rb"(?i)\r\ntransfer-encoding: *chunked", head):
        body = b""
        while size := int((await reader.readuntil(b"\r\n")).split(b";")[0], 16):
            body += await reader.readexactly(size)
            await reader.readexactly(2)
        while await reader.readuntil(b"\r\n") != b"\r\n":
            pass  # trailer fields
        return body
    found = re.search(rb"(?i)\r\ncontent-length: *(\d+)", head)
    return await reader.readexactly(int(found.group(1))) if found else b""


async def _upgrade_after_body_backend(
    accept: bool,
) -> tuple[asyncio.Server, str, list[bytes]]:
    """Reads a request and its body (recorded), then answers it with the body (``accept``
    False: the upgrade ignored, as an HTTP/1.1-only server does) or with 101 and echoes every
    byte upper-cased."""
    bodies: list[bytes] = []

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        head = await reader.readuntil(b"\r\n\r\n")
        body = await _read_body(reader, head)
        bodies.append(body)
        if not accept:
            writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n%s" % (len(body), body))
            await writer.drain()
            writer.close()
            return
        await _switch_and_echo(reader, writer)

    server = await asyncio.start_server(handle, "127.0.0.1", 0)
    return server, f"127.0.0.1:{server.sockets[0].getsockname()[1]}", bodies


async def test_an_upgrade_request_with_a_body_from_curl_is_answered(proxy) -> None:
    """``curl --http2`` on plain HTTP asks for h2c with the request (a POST's body and all);
    an upstream that speaks only HTTP/1.1 answers it as it is. The body goes on with the
    head (the proxy held it for a tunnel and the request hung until the upstream gave up)."""
    server, addr, bodies = await _upgrade_after_body_backend(accept=False)
    p = await proxy(RouteSpec(servers=(addr,)))
    curl = await asyncio.create_subprocess_exec(
        "curl", "-sS", "--http2", "--max-time", "5", "-d", "hello=upgrade",
        f"http://127.0.0.1:{p.port}/form",
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )  # fmt: skip
    out, err = await curl.communicate()
    assert curl.returncode == 0, err
    assert out == b"hello=upgrade"
    assert bodies == [b"hello=upgrade"]
    server.close()


@pytest.mark.parametrize(
    ("framing", "first", "second", "body"),
    [
        # The body's last five bytes, then the tunnel's first, in one packet.
        (b"Content-Length: 10", b"first", b"-halfafter ", b"first-half"),
        # The body's end, a trailer field, and the tunnel's first bytes, in one packet.
        (
            b"Transfer-Encoding: chunked",
            b"6;ext=1\r\nline\n\n\r\n3\r\n",
            b"abc\r\n0\r\nDigest: x\r\n\r\nafter ",
            b"line\n\nabc",
        ),
    ],
    ids=["content-length", "chunked"],
)
async def test_an_upgrade_takes_effect_after_the_requests_body(
    proxy, framing: bytes, first: bytes, second: bytes, body: bytes
) -> None:
    server, addr, bodies = await _upgrade_after_body_backend(accept=True)
    p = await proxy(RouteSpec(servers=(addr,)))
    reader, writer = await asyncio.open_connection("127.0.0.1", p.port)
    writer.write(
        b"PUT /ws HTTP/1.1\r\nHost: x\r\nConnection: Upgrade\r\nUpgrade: echo\r\n%s\r\n\r\n%s"
        % (framing, first)
    )
    await asyncio.sleep(0.05)
    writer.write(second)
    head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)
    assert head.startswith(b"HTTP/1.1 101")
    writer.write(b"tunnel")
    got = b""
    while len(got) < len(b"AFTER TUNNEL"):
        got += await asyncio.wait_for(reader.read(100), 5)
    assert got == b"AFTER TUNNEL"
    assert bodies == [body]
    writer.close()
    server.close()


async def test_an_upgrade_request_that_expects_100_continue_is_asked_for_its_body(proxy) -> None:
    """curl sends ``Expect: 100-continue`` with a large body, upgrade or not."""
    server, addr, bodies = await _upgrade_after_body_backend(accept=False)
    p = await proxy(RouteSpec(servers=(addr,)))
    reader, writer = await asyncio.open_connection("127.0.0.1", p.port)
    writer.write(
        b"POST /x HTTP/1.1\r\nHost: x\r\nConnection: Upgrade\r\nUpgrade: h2c\r\n"
        b"Content-Length: 5\r\nExpect: 100-continue\r\n\r\n"
    )
    interim = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)
    assert interim == b"HTTP/1.1 100 Continue\r\n\r\n"
    writer.write(b"hello")
    status, _, body = await asyncio.wait_for(read_response(reader), 5)
    assert (status, body, bodies) == (200, b"hello", [b"hello"])
    writer.close()
    server.close()


@pytest.mark.parametrize(
    ("chunks", "status"),
    [(b"5\r\nhello\r\n0\r\n\r\n", 200), (b"zz\r\nhello\r\n0\r\n\r\n", 400)],
    ids=["declined", "broken-chunks"],
)
async def test_an_upgrade_request_with_a_chunked_body_is_answered(
    proxy, chunks: bytes, status: int
) -> None:
    """An upstream that ignores the upgrade answers the request, chunked body and all, and the
    connection closes after it; chunks that break the framing are a 400."""
    server, addr, bodies = await _upgrade_after_body_backend(accept=False)
    p = await proxy(RouteSpec(servers=(addr,)))
    reader, writer = await asyncio.open_connection("127.0.0.1", p.port)
    writer.write(
        b"POST /x HTTP/1.1\r\nHost: x\r\nConnection: Upgrade\r\nUpgrade: h2c\r\n"
        b"Transfer-Encoding: chunked\r\n\r\n" + chunks
    )
    got, headers, body = await asyncio.wait_for(read_response(reader), 5)
    assert got == status and headers["connection"] == "close"
    if status == 200:
        assert body == b"hello" and bodies == [b"hello"]
    assert await asyncio.wait_for(reader.read(), 5) == b""
    writer.close()
    server.close()


async def _half_close_backend() -> tuple[asyncio.Server, str]:
    """Reads until EOF, then answers with the byte count and closes (needs half-close)."""

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        data = await reader.read(-1)
        writer.write(b"got %d bytes" % len(data))
        await writer.drain()
        writer.close()

    server = await asyncio.start_server(handle, "127.0.0.1", 0)
    return server, f"127.0.0.1:{server.sockets[0].getsockname()[1]}"


async def test_tcp_relay_with_half_close(proxy) -> None:
    server, addr = await _half_close_backend()
    p = await proxy(RouteSpec(servers=(addr,)), protocol="tcp")
    reader, writer = await asyncio.open_connection("127.0.0.1", p.port)
    payload = b"z" * 3_000_000
    writer.write(payload)
    writer.write_eof()
    answer = await asyncio.wait_for(reader.read(-1), 10)
    assert answer == b"got 3000000 bytes"
    writer.close()
    server.close()


async def test_tcp_relay_retries_connect_and_closes_without_endpoint(proxy) -> None:
    from tests.proxy.conftest import free_port

    server, addr = await _half_close_backend()
    dead = f"127.0.0.1:{await free_port()}"
    p = await proxy(RouteSpec(servers=(dead, addr), attempts=1), protocol="tcp")
    for _ in range(2):
        reader, writer = await asyncio.open_connection("127.0.0.1", p.port)
        writer.write(b"abc")
        writer.write_eof()
        assert await asyncio.wait_for(reader.read(-1), 5) == b"got 3 bytes"
        writer.close()
    p2 = await proxy(RouteSpec(servers=(dead,), attempts=0), protocol="tcp", name="dead")
    reader, writer = await asyncio.open_connection("127.0.0.1", p2.port)
    assert await asyncio.wait_for(reader.read(-1), 5) == b""
    writer.close()
    server.close()


async def test_max_connections_http_gets_503(backends, proxy) -> None:
    b = await backends("a")
    p = await proxy(RouteSpec(servers=(b.server,)), max_connections=2)
    held = [await asyncio.open_connection("127.0.0.1", p.port) for _ in range(2)]
    await until(lambda: len(p.connections) == 2)
    reader, writer = await asyncio.open_connection("127.0.0.1", p.port)
    answer = await asyncio.wait_for(reader.read(-1), 5)
    assert answer.startswith(b"HTTP/1.1 503")
    assert b"x-interknit-reason: max-connections" in answer
    writer.close()
    # The held connections still work, and a slot frees when one closes.
    r0, w0 = held[0]
    w0.write(b"GET / HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
    status, _, _ = await read_response(r0)
    assert status == 200
    await asyncio.wait_for(r0.read(), 5)
    w0.close()
    await until(lambda: len(p.connections) == 1)
    async with httpx.AsyncClient() as client:
        r = await client.get(f"http://127.0.0.1:{p.port}/")
        assert r.status_code == 200
    held[1][1].close()


async def test_max_connections_tcp_closes(proxy) -> None:
    server, addr = await _half_close_backend()
    p = await proxy(RouteSpec(servers=(addr,)), protocol="tcp", max_connections=1)
    r1, w1 = await asyncio.open_connection("127.0.0.1", p.port)
    await until(lambda: len(p.connections) == 1)
    r2, w2 = await asyncio.open_connection("127.0.0.1", p.port)
    with contextlib.suppress(ConnectionResetError):
        assert await asyncio.wait_for(r2.read(-1), 5) == b""
    w1.write_eof()
    assert await asyncio.wait_for(r1.read(-1), 5) == b"got 0 bytes"
    w1.close()
    w2.close()
    server.close()


async def test_stop_drains_in_flight_request(backends, proxy) -> None:
    b = await backends("slow")
    p = await proxy(RouteSpec(servers=(b.server,)))
    assert isinstance(p, HttpListener)
    idle_reader, idle_writer = await asyncio.open_connection("127.0.0.1", p.port)
    async with httpx.AsyncClient() as client:
        request = asyncio.create_task(client.get(f"http://127.0.0.1:{p.port}/?delay=0.3"))
        await until(lambda: len(b.seen) == 1)
        stopping = asyncio.create_task(p.stop(drain_timeout=5))
        await until(lambda: p.stopping)
        # New connections are refused while draining; idle ones are closed at once.
        try:
            _, w = await asyncio.open_connection("127.0.0.1", p.port)
            w.close()
            refused = False
        except OSError:
            refused = True
        assert refused
        assert await asyncio.wait_for(idle_reader.read(-1), 1) == b""
        r = await request
        assert r.status_code == 200
        assert r.headers["connection"] == "close"
        await asyncio.wait_for(stopping, 5)
    idle_writer.close()
    assert not p.connections


async def _echo_backend(push: bool = False) -> tuple[asyncio.Server, str]:
    """Echoes every byte; with ``push`` it also sends a byte every 0.1 s on its own."""

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        async def pusher() -> None:
            while True:
                await asyncio.sleep(0.1)
                writer.write(b".")

        task = asyncio.create_task(pusher()) if push else None
        try:
            while data := await reader.read(65536):
                writer.write(data)
        except ConnectionError:
            pass
        finally:
            if task is not None:
                task.cancel()
            writer.close()

    server = await asyncio.start_server(handle, "127.0.0.1", 0)
    return server, f"127.0.0.1:{server.sockets[0].getsockname()[1]}"


async def test_tcp_relay_closes_a_connection_idle_for_its_idle_timeout(proxy) -> None:
    # HAProxy's timeout client/server in mode tcp: a peer gone without a FIN must not hold
    # the slot for ever. Bytes either way keep the connection open.
    server, addr = await _echo_backend()
    pushing, push_addr = await _echo_backend(push=True)
    p = await proxy(RouteSpec(servers=(addr,), idle_timeout=0.4), protocol="tcp")
    q = await proxy(RouteSpec(servers=(push_addr,), idle_timeout=0.4), protocol="tcp", name="push")
    loop = asyncio.get_running_loop()

    reader, writer = await asyncio.open_connection("127.0.0.1", p.port)
    sent = loop.time()  # the last bytes move after this (the listener runs on this loop)
    writer.write(b"hi")
    assert await asyncio.wait_for(reader.readexactly(2), 5) == b"hi"
    assert await asyncio.wait_for(reader.read(), 5) == b""
    assert loop.time() - sent >= 0.38  # a timer may fire a hair early
    writer.close()

    # The client talking every 0.1 s keeps it open well past the timeout.
    reader, writer = await asyncio.open_connection("127.0.0.1", p.port)
    for _ in range(12):
        writer.write(b"x")
        assert await asyncio.wait_for(reader.readexactly(1), 5) == b"x"
        await asyncio.sleep(0.1)
    writer.close()

    # So does the upstream talking while the client only listens.
    reader, writer = await asyncio.open_connection("127.0.0.1", q.port)
    got = b""
    while len(got) < 10:
        got += await asyncio.wait_for(reader.read(100), 5)
    assert not reader.at_eof()
    writer.close()
    await until(lambda: not p.connections and not q.connections)
    server.close()
    pushing.close()
