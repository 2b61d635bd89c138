"""The supervisor's checks of its child, against real sockets."""

from __future__ import annotations

import asyncio

from interknit.agent.probe import http_check, tcp_check
from tests.nodeproc import free_port


async def serve(answer: bytes | None) -> tuple[asyncio.Server, int]:
    """A server that answers ``answer`` to anything (``None``: reads and never answers)."""

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.readuntil(b"\r\n\r\n")
        if answer is None:
            await asyncio.sleep(0.4)
        else:
            writer.write(answer)
            await writer.drain()
        writer.close()

    server = await asyncio.start_server(handle, "127.0.0.1", 0)
    return server, int(server.sockets[0].getsockname()[1])


async def test_http_check_passes_only_on_2xx() -> None:
    for answer, passed, output in [
        (b"HTTP/1.1 204 No Content\r\n\r\n", True, "HTTP 204"),
        (b"HTTP/1.0 200 OK\r\nContent-Length: 2\r\n\r\nok", True, "HTTP 200"),
        (b"HTTP/1.1 404 Not Found\r\n\r\n", False, "HTTP 404"),
        (b"HTTP/1.1 503 Busy\r\n\r\n", False, "HTTP 503"),
        (b"SSH-2.0-OpenSSH\r\n", False, "an answer that is not HTTP/1.x"),
        (None, False, "no answer within 0.2s"),
    ]:
        server, port = await serve(answer)
        async with server:
            assert await http_check("127.0.0.1", port, "/health", 0.2) == (passed, output)


async def test_nothing_listening_fails_both_checks() -> None:
    port = free_port()
    passed, output = await tcp_check("127.0.0.1", port, 0.5)
    assert not passed and str(port) in output
    passed, output = await http_check("127.0.0.1", port, "/", 0.5)
    assert not passed and output.startswith("GET /")
    server, port = await serve(b"HTTP/1.1 200 OK\r\n\r\n")
    async with server:
        assert await tcp_check("127.0.0.1", port, 0.5) == (True, "connected")
