"""Both middlewares in real servers on 127.0.0.1: Starlette under uvicorn, and aiohttp.

Each scenario runs against both, so the ASGI and aiohttp faces are held to the same behaviour:
503 (429 for rate limits) with Retry-After for every reason, the deadline handed to the app,
and a health endpoint that flips with load.
"""

from __future__ import annotations

import asyncio
import importlib.util
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from typing import Any

import httpx
import pytest
from aiohttp import web

from interknit.demand.aiohttp import DEADLINE, PRIORITY, admission_middleware
from interknit.demand.asgi import AdmissionMiddleware
from interknit.demand.asyncio_gate import Gate
from interknit.demand.overload import OverloadMonitor
from interknit.demand.settings import DemandSettings
from tests.conftest import STRICT

# Starlette and uvicorn belong in the test extras; without them (outside strict mode) only the
# ASGI half is skipped, and the aiohttp half still runs.
HAVE_ASGI = all(importlib.util.find_spec(m) is not None for m in ("starlette", "uvicorn"))
KINDS = [
    pytest.param(
        "starlette",
        marks=pytest.mark.skipif(
            not HAVE_ASGI and not STRICT, reason="starlette and uvicorn are not installed"
        ),
    ),
    "aiohttp",
]


class Backend:
    """What the test controls in the app: a gate that holds /work until released."""

    def __init__(self) -> None:
        self.release = asyncio.Event()


def starlette_app(backend: Backend, gate: Gate, settings: DemandSettings) -> Any:
    from starlette.applications import Starlette
    from starlette.middleware import Middleware
    from starlette.requests import Request
    from starlette.responses import JSONResponse, PlainTextResponse
    from starlette.routing import Route

    async def work(request: Request) -> PlainTextResponse:
        await backend.release.wait()
        return PlainTextResponse("done")

    async def fast(request: Request) -> PlainTextResponse:
        return PlainTextResponse("ok")

    async def state(request: Request) -> JSONResponse:
        deadline = request.state.deadline
        left = None if deadline is None else deadline - gate.clock()
        return JSONResponse({"left": left, "priority": request.state.priority})

    async def broken(request: Request) -> PlainTextResponse:
        return PlainTextResponse("no", status_code=503)

    return Starlette(
        routes=[
            Route("/work", work),
            Route("/fast", fast),
            Route("/state", state),
            Route("/broken", broken),
        ],
        middleware=[Middleware(AdmissionMiddleware, gate=gate, settings=settings)],
    )


def aiohttp_app(backend: Backend, gate: Gate, settings: DemandSettings) -> web.Application:
    async def work(request: web.Request) -> web.Response:
        await backend.release.wait()
        return web.Response(text="done")

    async def fast(request: web.Request) -> web.Response:
        return web.Response(text="ok")

    async def state(request: web.Request) -> web.Response:
        deadline = request.get(DEADLINE)
        left = None if deadline is None else deadline - gate.clock()
        return web.json_response({"left": left, "priority": request[PRIORITY]})

    async def broken(request: web.Request) -> web.Response:
        raise web.HTTPServiceUnavailable()

    app = web.Application(middlewares=[admission_middleware(gate=gate, settings=settings)])
    app.router.add_get("/work", work)
    app.router.add_get("/fast", fast)
    app.router.add_get("/state", state)
    app.router.add_get("/broken", broken)
    return app


@asynccontextmanager
async def serve(kind: str, app: Any) -> AsyncIterator[str]:
    if kind == "starlette":
        import uvicorn

        config = uvicorn.Config(app, host="127.0.0.1", port=0, log_level="warning", lifespan="off")
        server = uvicorn.Server(config)
        task = asyncio.create_task(server.serve())
        for _ in range(500):
            if server.started:
                break
            await asyncio.sleep(0.01)
        assert server.started, "uvicorn did not start"
        port = server.servers[0].sockets[0].getsockname()[1]
        try:
            yield f"http://127.0.0.1:{port}"
        finally:
            server.should_exit = True
            await asyncio.wait_for(task, 10)
    else:
        runner = web.AppRunner(app)
        await runner.setup()
        site = web.TCPSite(runner, "127.0.0.1", 0)
        await site.start()
        port = runner.addresses[0][1]
        try:
            yield f"http://127.0.0.1:{port}"
        finally:
            await runner.cleanup()


@asynccontextmanager
async def running(
    kind: str, settings: DemandSettings, **gate_kw: Any
) -> AsyncIterator[tuple[httpx.AsyncClient, Backend, Gate]]:
    backend = Backend()
    gate = Gate.from_settings(settings, **gate_kw)
    if gate.limiter is not None:
        # These tests are about HTTP behaviour; keep a slow machine from turning the queue LIFO
        # with its 5 ms CoDel target halfway through a scenario.
        gate.limiter.queue.interval = 60.0
    build: Callable[[Backend, Gate, DemandSettings], Any] = (
        starlette_app if kind == "starlette" else aiohttp_app
    )
    async with (
        serve(kind, build(backend, gate, settings)) as url,
        httpx.AsyncClient(base_url=url, timeout=10) as client,
    ):
        try:
            yield client, backend, gate
        finally:
            backend.release.set()


async def until(condition: Callable[[], bool]) -> None:
    for _ in range(1000):
        if condition():
            return
        await asyncio.sleep(0.005)
    raise AssertionError("condition never became true")


def inflight(gate: Gate) -> int:
    assert gate.limiter is not None
    return gate.limiter.inflight


def queued(gate: Gate) -> int:
    assert gate.limiter is not None
    return len(gate.limiter.queue)


def refused(response: httpx.Response, status: int, reason: str) -> None:
    assert response.status_code == status, response.text
    assert int(response.headers["retry-after"]) >= 1
    assert response.json()["detail"]["reason"] == reason


@pytest.mark.parametrize("kind", KINDS)
async def test_queue_full_and_priority_then_queue_drains(kind: str) -> None:
    settings = DemandSettings(concurrency=1, queue=2, queue_timeout=10.0, reserve=0.0)
    async with running(kind, settings) as (client, backend, gate):
        held = asyncio.create_task(client.get("/work"))
        await until(lambda: inflight(gate) == 1)
        first = asyncio.create_task(client.get("/fast"))
        await until(lambda: queued(gate) == 1)
        # The queue is half full: sheddable work is refused before anything else.
        refused(await client.get("/fast", headers={"X-Priority": "sheddable"}), 503, "priority")
        second = asyncio.create_task(client.get("/fast"))
        await until(lambda: queued(gate) == 2)
        refused(await client.get("/fast"), 503, "queue_full")
        backend.release.set()
        assert (await held).text == "done"
        assert (await first).text == "ok"
        assert (await second).text == "ok"
        assert inflight(gate) == 0


@pytest.mark.parametrize("kind", KINDS)
async def test_queue_timeout(kind: str) -> None:
    settings = DemandSettings(concurrency=1, queue=4, queue_timeout=0.05, reserve=0.0)
    async with running(kind, settings) as (client, backend, gate):
        held = asyncio.create_task(client.get("/work"))
        await until(lambda: inflight(gate) == 1)
        refused(await client.get("/fast"), 503, "queue_timeout")
        backend.release.set()
        assert (await held).status_code == 200


@pytest.mark.parametrize("kind", KINDS)
async def test_deadline_from_headers(kind: str) -> None:
    settings = DemandSettings(concurrency=1, queue=4, queue_timeout=10.0, reserve=0.0)
    async with running(kind, settings, timeout=5.0) as (client, backend, gate):
        # No time left at all: refused at once, even with a free slot.
        refused(await client.get("/fast", headers={"X-Request-Timeout": "0ms"}), 503, "deadline")
        # The remaining deadline reaches the application (the route's 5s caps a longer ask).
        body = (await client.get("/state", headers={"X-Request-Timeout": "2s"})).json()
        assert 0 < body["left"] <= 2.0
        body = (await client.get("/state", headers={"grpc-timeout": "60S"})).json()
        assert 0 < body["left"] <= 5.0
        body = (await client.get("/state", headers={"X-Request-Timeout": "bogus"})).json()
        assert 0 < body["left"] <= 5.0
        # A queued request whose deadline passes while it waits is refused as deadline.
        held = asyncio.create_task(client.get("/work"))
        await until(lambda: inflight(gate) == 1)
        waiting = await client.get("/fast", headers={"X-Request-Timeout": "50ms"})
        refused(waiting, 503, "deadline")
        backend.release.set()
        await held


@pytest.mark.parametrize("kind", KINDS)
async def test_rate_limits(kind: str) -> None:
    settings = DemandSettings(rate=2.0, burst=2)
    async with running(kind, settings) as (client, _, _gate):
        assert (await client.get("/fast")).status_code == 200
        assert (await client.get("/fast")).status_code == 200
        response = await client.get("/fast")
        refused(response, 429, "rate")
        assert 0 < response.json()["detail"]["retry_after"] <= 0.5 + 1e-6


@pytest.mark.parametrize("kind", KINDS)
async def test_rate_limits_per_client_header(kind: str) -> None:
    settings = DemandSettings(client_rate=1.0, client_burst=1, client_key="header:X-Api-Key")
    async with running(kind, settings) as (client, _, _gate):
        assert (await client.get("/fast", headers={"X-Api-Key": "a"})).status_code == 200
        assert (await client.get("/fast", headers={"X-Api-Key": "b"})).status_code == 200
        refused(await client.get("/fast", headers={"X-Api-Key": "a"}), 429, "rate")


@pytest.mark.parametrize("kind", KINDS)
async def test_priority_header_reaches_the_app(kind: str) -> None:
    async with running(kind, DemandSettings(priority=2)) as (client, _, _gate):
        assert (await client.get("/state")).json()["priority"] == 2
        critical = await client.get("/state", headers={"X-Priority": "critical"})
        assert critical.json()["priority"] == 0


@pytest.mark.parametrize("kind", KINDS)
async def test_app_503_feeds_the_limit_as_a_drop(kind: str) -> None:
    settings = DemandSettings(concurrency="aimd")
    async with running(kind, settings) as (client, _, gate):
        assert gate.limiter is not None
        before = gate.limiter.limit
        assert (await client.get("/broken")).status_code == 503
        assert gate.limiter.limit < before
        assert inflight(gate) == 0


@pytest.mark.parametrize("kind", KINDS)
async def test_health_flips_with_load_and_recovers(kind: str) -> None:
    now = [1000.0]
    overload = OverloadMonitor(threshold=0.1, window=2.0, hold=1.0, min_requests=5)
    settings = DemandSettings(concurrency=1, queue=0, reserve=0.0)
    async with running(kind, settings, overload=overload, clock=lambda: now[0]) as (
        client,
        backend,
        gate,
    ):
        health = await client.get("/health")
        assert health.status_code == 200 and health.json() == {"status": "ok"}
        held = asyncio.create_task(client.get("/work"))
        await until(lambda: inflight(gate) == 1)
        for _ in range(10):
            refused(await client.get("/fast"), 503, "queue_full")
        assert (await client.get("/health")).status_code == 503
        backend.release.set()
        await held
        # Load is gone, but the node stays out until the window has cleared and the hold passed.
        now[0] += 2.5
        assert (await client.get("/health")).status_code == 503
        now[0] += 1.5
        assert (await client.get("/health")).status_code == 200


async def test_asgi_middleware_builds_its_gate_with_metrics_and_passes_other_scopes() -> None:
    from prometheus_client import CollectorRegistry

    seen: list[str] = []

    async def app(scope: Any, receive: Any, send: Any) -> None:
        seen.append(scope["type"])
        if scope["type"] == "http":
            await send({"type": "http.response.start", "status": 200, "headers": []})
            await send({"type": "http.response.body", "body": b"hi"})

    registry = CollectorRegistry()
    middleware = AdmissionMiddleware(
        app, settings=DemandSettings(concurrency=4), registry=registry, route="web"
    )
    transport = httpx.ASGITransport(app=middleware)
    async with httpx.AsyncClient(transport=transport, base_url="http://test") as client:
        assert (await client.get("/anything")).text == "hi"
        assert (await client.get("/health")).json() == {"status": "ok"}

    async def receive() -> dict[str, Any]:
        return {"type": "lifespan.startup"}

    async def send(message: Any) -> None:
        pass

    await middleware({"type": "lifespan"}, receive, send)
    assert seen == ["http", "lifespan"]
    assert registry.get_sample_value("interknit_demand_admitted_total", {"route": "web"}) == 1
    assert registry.get_sample_value("interknit_demand_limit", {"route": "web"}) == 4
