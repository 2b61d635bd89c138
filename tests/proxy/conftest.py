"""Plumbing for proxy tests: a trivial balancer, real backends, a proxy on an ephemeral port."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator, Awaitable, Callable, Container, Sequence
from dataclasses import dataclass, field
from typing import Any

import pytest
import uvloop
from aiohttp import web

from interknit.balance.base import Balancer, Endpoint
from interknit.proxy import HttpListener, ListenerSpec, RouteSpec, StaticPoolSource
from interknit.proxy.listener import TcpListener, build_listener


def pytest_asyncio_loop_factories(config: Any, item: Any) -> dict[str, Any]:
    # The proxy runs on uvloop in production; test it there.
    return {"uvloop": uvloop.new_event_loop}


class RoundRobin:
    """The simplest balancer: next endpoint not excluded, honouring a hash_key naming a key."""

    def __init__(self) -> None:
        self.endpoints: list[Endpoint] = []
        self.next = 0

    def set_endpoints(self, endpoints: Sequence[Endpoint], now: float) -> None:
        self.endpoints = list(endpoints)

    def pick(
        self, hash_key: bytes | None, now: float, exclude: Container[Endpoint] = ()
    ) -> Endpoint | None:
        if hash_key is not None:
            for ep in self.endpoints:
                if ep.key.encode() == hash_key and ep not in exclude:
                    return ep
        for _ in range(len(self.endpoints)):
            ep = self.endpoints[self.next % len(self.endpoints)]
            self.next += 1
            if ep not in exclude:
                return ep
        return None


def round_robin(route: RouteSpec) -> Balancer:
    return RoundRobin()


@dataclass
class Backend:
    """A real aiohttp server that records what it was sent."""

    port: int = 0
    name: str = ""
    seen: list[dict[str, Any]] = field(default_factory=list)
    runner: web.AppRunner | None = None

    @property
    def server(self) -> str:
        return f"127.0.0.1:{self.port}"


BACKEND = web.AppKey("backend", Backend)


async def _echo(request: web.Request) -> web.StreamResponse:
    backend: Backend = request.app[BACKEND]
    body = await request.read()
    record = {
        "backend": backend.name,
        "method": request.method,
        "path": request.path_qs,
        "headers": [[k.decode("latin-1"), v.decode("latin-1")] for k, v in request.raw_headers],
        "body_len": len(body),
        "chunked": request.headers.get("Transfer-Encoding") == "chunked",
        # Which connection it came on (the proxy's port).
        "peer_port": request.transport.get_extra_info("peername")[1] if request.transport else 0,
    }
    backend.seen.append(record)
    delay = float(request.query.get("delay", "0"))
    if delay:
        await asyncio.sleep(delay)
    status = int(request.query.get("status", "200"))
    return web.json_response(record, status=status, headers={"X-Backend": backend.name})


async def _count(request: web.Request) -> web.StreamResponse:
    total = 0
    slow = request.query.get("slow") == "1"
    async for data in request.content.iter_any():
        if slow and total // (1 << 20) != (total + len(data)) // (1 << 20):
            await asyncio.sleep(0.001)  # a slow upstream: the proxy must wait, not buffer
        total += len(data)
    return web.json_response({"received": total})


async def _stream(request: web.Request) -> web.StreamResponse:
    size = int(request.query.get("size", "1000"))
    sized = request.query.get("sized") == "1"
    resp = web.StreamResponse()
    if sized:
        resp.content_length = size
    await resp.prepare(request)
    block = b"x" * 65536
    left = size
    while left > 0:
        piece = block if left >= len(block) else block[:left]
        await resp.write(piece)
        left -= len(piece)
    await resp.write_eof()
    return resp


async def start_backend(name: str = "a", ssl_context: Any = None) -> Backend:
    backend = Backend(name=name)
    app = web.Application(client_max_size=1 << 30)
    app[BACKEND] = backend
    app.router.add_route("POST", "/count", _count)
    app.router.add_route("PUT", "/count", _count)
    app.router.add_get("/stream", _stream)
    app.router.add_route("*", "/{tail:.*}", _echo)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0, ssl_context=ssl_context)
    await site.start()
    backend.runner = runner
    backend.port = runner.addresses[0][1]
    return backend


@pytest.fixture
async def backends() -> AsyncIterator[Callable[[str], Awaitable[Backend]]]:
    started: list[Backend] = []

    async def make(name: str = "a", ssl_context: Any = None) -> Backend:
        b = await start_backend(name, ssl_context)
        started.append(b)
        return b

    yield make
    for b in started:
        assert b.runner is not None
        await b.runner.cleanup()


ProxyFactory = Callable[..., Awaitable[HttpListener | TcpListener]]


@pytest.fixture
async def proxy() -> AsyncIterator[ProxyFactory]:
    started: list[HttpListener | TcpListener] = []

    async def make(
        *routes: RouteSpec, pools: Any = None, metrics: Any = None, **kw: Any
    ) -> HttpListener | TcpListener:
        spec = ListenerSpec(name=kw.pop("name", "test"), routes=tuple(routes), **kw)
        listener = build_listener(spec, pools or StaticPoolSource(round_robin), metrics=metrics)
        await listener.start()
        started.append(listener)
        return listener

    yield make
    for listener in started:
        await listener.stop(0.5)


async def until(condition: Callable[[], bool], timeout: float = 5.0) -> None:
    """Wait for ``condition`` instead of guessing a sleep (the machine may be busy)."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while not condition():
        assert loop.time() < deadline, "condition not reached"
        await asyncio.sleep(0.005)


async def free_port() -> int:
    """A port with nothing listening (bound, then released)."""
    server = await asyncio.start_server(lambda r, w: None, "127.0.0.1", 0)
    port = int(server.sockets[0].getsockname()[1])
    server.close()
    await server.wait_closed()
    return port


async def raw_exchange(port: int, data: bytes, timeout: float = 5.0) -> bytes:
    """Send bytes, read until the proxy closes the connection."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(data)
    try:
        return await asyncio.wait_for(reader.read(-1), timeout)
    finally:
        writer.close()


async def read_response(reader: asyncio.StreamReader) -> tuple[int, dict[str, str], bytes]:
    """One response off a raw connection (Content-Length or chunked framing)."""
    head = await reader.readuntil(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    status = int(lines[0].split()[1])
    headers: dict[str, str] = {}
    for line in lines[1:]:
        if line:
            k, _, v = line.partition(":")
            headers[k.strip().lower()] = v.strip()
    if "content-length" in headers:
        body = await reader.readexactly(int(headers["content-length"]))
    elif headers.get("transfer-encoding") == "chunked":
        parts = []
        while True:
            size = int((await reader.readuntil(b"\r\n")).strip(), 16)
            if size == 0:
                await reader.readuntil(b"\r\n")
                break
            parts.append(await reader.readexactly(size))
            await reader.readexactly(2)
        body = b"".join(parts)
    else:
        body = b""
    return status, headers, body


def seen_headers(record: dict[str, Any]) -> dict[str, str]:
    return {k.lower(): v for k, v in record["headers"]}


def body_json(body: bytes) -> Any:
    return json.loads(body)
