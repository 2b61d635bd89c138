"""The HTTP and TCP probes against real servers on 127.0.0.1."""

from __future__ import annotations

import asyncio

import pytest

from interknit.health.probes import (
    MAX_OUTPUT,
    http_probe,
    http_request,
    status_for_code,
    tcp_probe,
)
from tests.health.servers import hang, read_request, refused_port, respond, serve

TIMEOUT = 0.3


@pytest.mark.parametrize(
    ("code", "reason", "status"),
    [
        (200, "OK", "passing"),
        (204, "No Content", "passing"),
        (429, "Too Many Requests", "warning"),
        (500, "Internal Server Error", "critical"),
        (503, "Service Unavailable", "critical"),
        (301, "Moved Permanently", "critical"),
        (404, "Not Found", "critical"),
    ],
)
async def test_http_status_codes(code: int, reason: str, status: str) -> None:
    async with serve(respond(code, reason, b"body text")) as port:
        result = await http_probe("127.0.0.1", port, "/health", TIMEOUT)
    assert result.status == status
    assert result.output.startswith(f"HTTP GET http://127.0.0.1:{port}/health: {code} {reason}")
    if code != 204:
        assert result.output.endswith("Output: body text")
    assert 0 <= result.latency < TIMEOUT


def test_status_for_code() -> None:
    assert [status_for_code(c) for c in (199, 200, 299, 300, 428, 429, 430)] == [
        "critical",
        "passing",
        "passing",
        "critical",
        "critical",
        "warning",
        "critical",
    ]


async def test_http_sends_a_plain_http11_request() -> None:
    seen: list[bytes] = []

    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        seen.append(await read_request(reader))
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n")

    async with serve(handler) as port:
        result = await http_probe("127.0.0.1", port, "/ready?deep=1", TIMEOUT)
    assert result.status == "passing"
    assert seen == [
        f"GET /ready?deep=1 HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nConnection: close\r\n"
        "User-Agent: interknit-health\r\nAccept: */*\r\n\r\n".encode()
    ]


def test_request_bytes() -> None:
    assert http_request("::1", 80, "health").startswith(
        b"GET /health HTTP/1.1\r\nHost: [::1]:80\r\n"
    )
    assert http_request("h", 1, "/a b").startswith(b"GET /a%20b HTTP/1.1\r\n")


async def test_http_timeout_is_critical() -> None:
    async with serve(hang) as port:
        result = await http_probe("127.0.0.1", port, "/", TIMEOUT)
    assert result.status == "critical"
    assert result.output.endswith(": timed out after 0.3s")
    assert result.latency >= TIMEOUT * 0.9


async def test_http_refused_is_critical() -> None:
    port = refused_port()
    result = await http_probe("127.0.0.1", port, "/", TIMEOUT)
    assert result.status == "critical"
    assert result.output == f"HTTP GET http://127.0.0.1:{port}/: connection refused"


async def test_http_close_without_answer_is_critical() -> None:
    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_request(reader)

    async with serve(handler) as port:
        result = await http_probe("127.0.0.1", port, "/", TIMEOUT)
    assert result.status == "critical"
    assert "closed without a response" in result.output


async def test_http_garbage_is_critical() -> None:
    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_request(reader)
        writer.write(b"SSH-2.0-OpenSSH_9.2\r\n")
        await asyncio.sleep(3600)

    async with serve(handler) as port:
        result = await http_probe("127.0.0.1", port, "/", TIMEOUT)
    assert result.status == "critical"
    assert "invalid HTTP response" in result.output


async def test_http_output_is_truncated() -> None:
    body = b"x" * (3 * MAX_OUTPUT)
    async with serve(respond(200, "OK", body)) as port:
        result = await http_probe("127.0.0.1", port, "/", TIMEOUT)
    assert result.status == "passing"
    assert len(result.output) == MAX_OUTPUT
    assert result.output.endswith("xxx...")


async def test_http_chunked_body() -> None:
    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_request(reader)
        writer.write(
            b"HTTP/1.1 503 Service Unavailable\r\nTransfer-Encoding: chunked\r\n\r\n"
            b"5\r\ndown \r\n3\r\nnow\r\n0\r\n\r\n"
        )
        await asyncio.sleep(3600)  # the probe must not wait for the close

    async with serve(handler) as port:
        result = await http_probe("127.0.0.1", port, "/", TIMEOUT)
    assert result.status == "critical"
    assert result.output.endswith("503 Service Unavailable Output: down now")
    assert result.latency < TIMEOUT


async def test_http_body_delimited_by_close() -> None:
    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_request(reader)
        writer.write(b"HTTP/1.0 200 OK\r\n\r\nall good")

    async with serve(handler) as port:
        result = await http_probe("127.0.0.1", port, "/", TIMEOUT)
    assert result.status == "passing"
    assert result.output.endswith("200 OK Output: all good")


async def test_http_status_stands_when_the_body_stalls() -> None:
    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_request(reader)
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\npartial")
        await asyncio.sleep(3600)

    async with serve(handler) as port:
        result = await http_probe("127.0.0.1", port, "/", TIMEOUT)
    assert result.status == "passing"
    assert result.output.endswith("Output: partial")


async def test_tcp_connect_passes() -> None:
    async with serve(hang) as port:
        result = await tcp_probe("127.0.0.1", port, TIMEOUT)
    assert result.status == "passing"
    assert result.output == f"TCP connect 127.0.0.1:{port}: Success"


async def test_tcp_refused_is_critical() -> None:
    port = refused_port()
    result = await tcp_probe("127.0.0.1", port, TIMEOUT)
    assert result.status == "critical"
    assert result.output == f"TCP connect 127.0.0.1:{port}: connection refused"


async def test_probes_do_not_leave_time_wait_sockets_behind() -> None:
    """The probe closes with a reset when it closes first (this server never closes)."""

    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_request(reader)
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")
        await asyncio.sleep(3600)

    async with serve(handler) as port:
        for _ in range(3):
            assert (await http_probe("127.0.0.1", port, "/", TIMEOUT)).status == "passing"
            assert (await tcp_probe("127.0.0.1", port, TIMEOUT)).status == "passing"
        await asyncio.sleep(0.05)  # transports close on the loop's next turn
        # A graceful close would leave each client socket in FIN_WAIT2, then TIME_WAIT.
        assert _client_sockets_to(port) == []


def _client_sockets_to(port: int) -> list[str]:
    """TCP states (hex, /proc/net/tcp) of local client sockets whose peer is ``port``."""
    states = []
    with open("/proc/net/tcp") as f:
        next(f)
        for line in f:
            fields = line.split()
            remote, state = fields[2], fields[3]
            if int(remote.split(":")[1], 16) == port:
                states.append(state)
    return states


@pytest.mark.parametrize(
    "start",
    [b"HTTP/1.1 200 OK\r\nX-A: ", b"HTTP/1.1 200 ", b"HTTP/1.1 200 OK\r\nX-"],
    ids=["header value", "reason phrase", "header name"],
)
async def test_an_answer_whose_head_never_ends_fails_at_once(start: bytes) -> None:
    """Whoever registers an instance chooses where the node's checks go: a server answering
    a head without end was read (and held) until the check's timeout."""

    async def endless(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_request(reader)
        writer.write(start)
        while True:
            writer.write(b"a" * 65536)
            await writer.drain()

    async with serve(endless) as port:
        started = asyncio.get_running_loop().time()
        result = await http_probe("127.0.0.1", port, "/health", 10.0)
    assert result.status == "critical"
    assert "head larger than 16384 bytes" in result.output
    assert asyncio.get_running_loop().time() - started < 5.0
