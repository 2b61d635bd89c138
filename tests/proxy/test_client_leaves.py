"""A client that leaves ends its exchange at once, wherever the exchange stands.

Queued by demand control: its place is given up (not held until the queue timeout).
Connecting: the connect is abandoned, and a connection that arrives anyway is not kept.
Sending: the attempt is abandoned and its upstream connection closed, not reused.
In each case the metrics and the access log say ``client-closed`` with status 499.

Leaving is a reset, or (while nothing was sent upstream yet) a close of the client's side, as
HAProxy's ``option abortonclose``; a client that half-closes after a request already sent
upstream is still answered.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import struct
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import pytest
from prometheus_client import CollectorRegistry

from interknit.demand.route import DemandAdmissions
from interknit.demand.settings import DemandSettings
from interknit.proxy import ListenerSpec, RouteSpec, StaticPoolSource
from interknit.proxy.listener import HttpListener
from tests.proxy.conftest import round_robin, until

GET = b"GET /?delay=%s HTTP/1.1\r\nHost: a\r\n\r\n"


def closed_errors(registry: CollectorRegistry, route: str) -> float:
    labels = {"listener": "leave", "route": route, "reason": "client-closed"}
    return registry.get_sample_value("interknit_proxy_errors_total", labels) or 0.0


async def send_and_leave(port: int, data: bytes, before_leaving: Any, reset: bool = False) -> None:
    _, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(data)
    await writer.drain()
    await before_leaving()
    if reset:
        sock = writer.get_extra_info("socket")
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    writer.close()


@pytest.fixture
async def listener_factory() -> AsyncIterator[Any]:
    started: list[HttpListener] = []

    async def make(route: RouteSpec, access_log: str = "off", **kw: Any) -> HttpListener:
        spec = ListenerSpec(name="leave", routes=(route,), access_log=access_log)
        listener = HttpListener(spec, StaticPoolSource(round_robin), **kw)
        await listener.start()
        started.append(listener)
        return listener

    yield make
    for listener in started:
        await listener.stop(0.5)


async def test_a_queued_client_that_leaves_frees_its_place_at_once(
    backends: Any, listener_factory: Any, tmp_path: Path
) -> None:
    b = await backends("a")
    admissions = DemandAdmissions(
        lambda route: DemandSettings(concurrency=1, queue=8, queue_timeout=30.0, reserve=0.0)
    )
    registry = CollectorRegistry()
    log_path = tmp_path / "access.log"
    listener = await listener_factory(
        RouteSpec(servers=(b.server,), name="q"),
        access_log=str(log_path),
        admission=admissions,
        metrics=registry,
    )
    gate = admissions.gates()[0] if admissions.gates() else None
    # One request holds the only slot for a while.
    holder = asyncio.create_task(send_and_leave(listener.port, GET % b"3", asyncio.Event().wait))
    await until(lambda: len(b.seen) == 1)
    gate = admissions.gates()[0]
    limiter = gate.limiter
    assert limiter is not None

    queued = asyncio.Event()

    async def wait_queued() -> None:
        await until(lambda: len(limiter.queue) == 1)
        queued.set()

    await send_and_leave(listener.port, GET % b"0", wait_queued)
    assert queued.is_set()
    # Long before the 30 s queue timeout: the place is free once the client is gone.
    await until(lambda: len(limiter.queue) == 0, timeout=2.0)
    await until(lambda: closed_errors(registry, "q") == 1, timeout=2.0)
    listener.flush_access_log()
    lines = log_path.read_text().splitlines()
    assert any("status=499" in x and "reason=client-closed" in x for x in lines), lines
    assert len(b.seen) == 1  # the queued request never reached the upstream
    holder.cancel()


@pytest.fixture
def unaccepting() -> Iterator[str]:
    """An address whose connects hang: a listener with a full accept queue."""
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(0)
    port = server.getsockname()[1]
    fillers = []
    for _ in range(8):
        c = socket.socket()
        c.setblocking(False)
        with contextlib.suppress(BlockingIOError):
            c.connect(("127.0.0.1", port))
        fillers.append(c)
    try:
        yield f"127.0.0.1:{port}"
    finally:
        for c in fillers:
            c.close()
        server.close()


async def test_a_client_that_leaves_while_connecting_abandons_the_connect(
    listener_factory: Any, unaccepting: str
) -> None:
    registry = CollectorRegistry()
    listener = await listener_factory(
        RouteSpec(servers=(unaccepting,), name="c", connect_timeout=30.0), metrics=registry
    )

    async def connecting() -> None:
        await until(lambda: any(c.active is not None for c in listener.connections))

    await send_and_leave(listener.port, GET % b"0", connecting)
    await until(lambda: closed_errors(registry, "c") == 1, timeout=2.0)
    await until(lambda: not listener.connections, timeout=2.0)
    # Nothing waits on the connect any more, and no connection to it is kept.
    await until(
        lambda: (
            not [
                t
                for t in asyncio.all_tasks()
                if getattr(t.get_coro(), "__qualname__", "") == "UpstreamPool.connect"
            ]
        )
    )
    host, port = unaccepting.split(":")
    assert listener.upstreams.idle_count(host, int(port)) == 0


async def test_a_client_that_leaves_mid_request_abandons_the_attempt(
    backends: Any, listener_factory: Any
) -> None:
    b = await backends("a")
    registry = CollectorRegistry()
    listener = await listener_factory(RouteSpec(servers=(b.server,), name="s"), metrics=registry)
    # A first request leaves a kept-alive connection to reuse.
    reader, writer = await asyncio.open_connection("127.0.0.1", listener.port)
    writer.write(GET % b"0")
    await reader.readuntil(b"\r\n\r\n")
    writer.close()
    assert listener.upstreams.idle_count("127.0.0.1", b.port) == 1

    await send_and_leave(
        listener.port, GET % b"2", lambda: until(lambda: len(b.seen) == 2), reset=True
    )
    await until(lambda: closed_errors(registry, "s") == 1, timeout=2.0)
    # The attempt's connection was closed, not returned: the upstream may still be writing to
    # it, and its answer belongs to nobody.
    assert listener.upstreams.idle_count("127.0.0.1", b.port) == 0
    labels = {"listener": "leave", "route": "s"}
    assert registry.get_sample_value("interknit_proxy_inflight", labels) == 0
    assert registry.get_sample_value("interknit_proxy_requests_total", {**labels, "code": "4xx"})


async def test_a_client_that_half_closes_after_sending_is_still_answered(
    backends: Any, listener_factory: Any
) -> None:
    b = await backends("a")
    listener = await listener_factory(RouteSpec(servers=(b.server,), name="h"))
    reader, writer = await asyncio.open_connection("127.0.0.1", listener.port)
    writer.write(GET % b"0.2")
    await until(lambda: len(b.seen) == 1)
    writer.write_eof()  # done sending; still reading
    answer = await asyncio.wait_for(reader.read(-1), 5)
    writer.close()
    assert answer.startswith(b"HTTP/1.1 200 OK\r\n") and b"connection: close" in answer
