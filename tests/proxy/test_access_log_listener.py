"""The access log of a listener, in process: every way a request or connection ends writes
one line through the same writer, with the bytes the client was sent."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Container, Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

import httpx
from prometheus_client import CollectorRegistry

from interknit.balance.base import Endpoint
from interknit.proxy import ListenerSpec, MatchSpec, RouteSpec, StaticPoolSource
from interknit.proxy.listener import TcpListener, build_listener
from tests.proxy.conftest import free_port, read_response, round_robin, until


def records(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text().splitlines()]


async def test_answers_of_the_proxy_itself_count_their_bytes(
    backends: Any, proxy: Any, tmp_path: Path
) -> None:
    b = await backends("a")
    path = tmp_path / "access.log"
    p = await proxy(
        RouteSpec(servers=(b.server,), name="known", match=MatchSpec(path_prefix="/known")),
        RouteSpec(service="nowhere", name="gone", match=MatchSpec(path_prefix="/gone")),
        access_log=str(path),
        access_log_json=True,
    )
    sizes = {}
    async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{p.port}") as client:
        for target in ("/known/x?q=1", "/gone", "/other"):
            r = await client.get(target, headers={"X-Request-Id": "rid-" + target[1:3]})
            sizes[target] = (r.status_code, len(r.content))
    p.flush_access_log()
    got = {r["target"]: r for r in records(path)}
    assert set(got) == set(sizes)
    for target, (status, size) in sizes.items():
        line = got[target]
        assert line["status"] == status and line["bytes_out"] == size > 0, line
        assert line["listener"] == "test" and line["method"] == "GET"
        assert line["client"] == "127.0.0.1" and line["request_id"] == "rid-" + target[1:3]
        assert isinstance(line["duration_ms"], float)
    assert got["/known/x?q=1"]["route"] == "known"
    assert got["/known/x?q=1"]["endpoint"] == b.server and got["/known/x?q=1"]["reason"] is None
    assert (got["/gone"]["status"], got["/gone"]["reason"], got["/gone"]["route"]) == (
        503,
        "no-pool",
        "gone",
    )
    assert (got["/other"]["status"], got["/other"]["reason"], got["/other"]["route"]) == (
        404,
        "no-route",
        None,
    )


class Empty:
    """A balancer with nothing to pick."""

    def set_endpoints(self, endpoints: Sequence[Endpoint], now: float) -> None:
        pass

    def pick(
        self, hash_key: bytes | None, now: float, exclude: Container[Endpoint] = ()
    ) -> Endpoint | None:
        return None


async def test_no_endpoint_is_a_503_with_its_body_counted(proxy: Any, tmp_path: Path) -> None:
    path = tmp_path / "access.log"
    p = await proxy(
        RouteSpec(servers=("127.0.0.1:9",), name="empty"),
        pools=StaticPoolSource(lambda route: Empty()),
        access_log=str(path),
    )
    async with httpx.AsyncClient() as client:
        r = await client.delete(f"http://127.0.0.1:{p.port}/p")
    assert r.status_code == 503
    p.flush_access_log()
    (line,) = path.read_text().splitlines()
    assert "status=503 " in line and "reason=no-endpoint " in line and "method=DELETE " in line
    assert f"bytes_out={len(r.content)} " in line and "endpoint=- " in line


async def test_refusals_before_routing_are_logged_and_counted(
    backends: Any, proxy: Any, tmp_path: Path
) -> None:
    b = await backends("a")
    path = tmp_path / "access.log"
    registry = CollectorRegistry()
    p = await proxy(
        RouteSpec(servers=(b.server,)),
        access_log=str(path),
        access_log_json=True,
        metrics=registry,
        header_timeout=0.3,
        max_header_bytes=1024,
    )

    async def answer(data: bytes) -> tuple[int, bytes]:
        reader, writer = await asyncio.open_connection("127.0.0.1", p.port)
        writer.write(data)
        status, _, body = await read_response(reader)
        if status == 200:  # the good one before a bad one: the refusal follows
            status, _, body = await read_response(reader)
        writer.close()
        return status, body

    bad = await answer(b"GET / HTTP/1.1\r\nHost: a\r\nBad Header: x\r\n\r\n")
    big = await answer(b"GET / HTTP/1.1\r\nHost: a\r\nX-Big: " + b"x" * 2000 + b"\r\n\r\n")
    slow = await answer(b"GET / HTTP/1.1\r\nHost: a\r\n")  # never ends: header-timeout
    # A refusal behind a good pipelined request goes out after its answer, and counts too.
    late = await answer(b"GET / HTTP/1.1\r\nHost: a\r\n\r\nGET / HTTP/9.9\r\n\r\n")
    p.flush_access_log()
    lines = [r for r in records(path) if r["status"] != 200]
    assert [(r["status"], r["reason"]) for r in lines] == [
        (400, "bad-request"),
        (431, "headers-too-large"),
        (408, "header-timeout"),
        (400, "bad-request"),
    ]
    for record, (status, body) in zip(lines, (bad, big, slow, late), strict=True):
        assert record["status"] == status
        assert record["bytes_out"] == len(body) > 0
        assert record["route"] is None and record["endpoint"] is None
        assert record["client"] == "127.0.0.1"
    assert lines[2]["duration_ms"] >= 290.0  # from the connection's start to the refusal
    counted = sum(
        registry.get_sample_value(
            "interknit_proxy_requests_total", {"listener": "test", "route": "-", "code": c}
        )
        or 0.0
        for c in ("4xx", "5xx")
    )
    assert counted == 4


async def test_a_refused_connection_is_logged(backends: Any, proxy: Any, tmp_path: Path) -> None:
    b = await backends("a")
    path = tmp_path / "access.log"
    p = await proxy(RouteSpec(servers=(b.server,)), access_log=str(path), max_connections=1)
    _, holder = await asyncio.open_connection("127.0.0.1", p.port)
    await until(lambda: len(p.connections) == 1)
    reader, writer = await asyncio.open_connection("127.0.0.1", p.port)
    refused = await reader.read(-1)
    writer.close()
    holder.close()
    assert refused.startswith(b"HTTP/1.1 503")
    p.flush_access_log()
    (line,) = path.read_text().splitlines()
    body = refused.split(b"\r\n\r\n", 1)[1]
    assert "status=503 " in line and "reason=max-connections " in line
    assert f"bytes_out={len(body)} " in line


async def test_tcp_connections_are_logged(tmp_path: Path) -> None:
    async def echo(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.write((await reader.read(100)) * 2)
        await writer.drain()
        writer.close()

    upstream = await asyncio.start_server(echo, "127.0.0.1", 0)
    port = upstream.sockets[0].getsockname()[1]
    dead = await free_port()
    path = tmp_path / "access.log"
    listeners = []
    for name, server in (("relay", f"127.0.0.1:{port}"), ("broken", f"127.0.0.1:{dead}")):
        spec = ListenerSpec(
            name=name,
            protocol="tcp",
            routes=(RouteSpec(servers=(server,), name=name, attempts=0),),
            access_log=str(path),
        )
        listener = build_listener(spec, StaticPoolSource(round_robin))
        assert isinstance(listener, TcpListener)
        await listener.start()
        listeners.append(listener)
    reader, writer = await asyncio.open_connection("127.0.0.1", listeners[0].port)
    writer.write(b"hello")
    assert await reader.read(-1) == b"hellohello"
    writer.close()
    reader, writer = await asyncio.open_connection("127.0.0.1", listeners[1].port)
    assert await reader.read(-1) == b""
    writer.close()
    for listener in listeners:
        await until(lambda listener=listener: not listener.connections)
        await listener.stop(0.5)  # a stop writes what waits
    upstream.close()
    lines = {line.split()[1]: line for line in path.read_text().splitlines()}
    ok = lines["listener=relay"]
    assert "status=200 " in ok and "bytes_in=5 " in ok and "bytes_out=10 " in ok
    assert f"endpoint=127.0.0.1:{port} " in ok and "client=127.0.0.1 " in ok
    assert "method=" not in ok  # no HTTP fields on a connection's line
    failed = lines["listener=broken"]
    assert "status=502 " in failed and "reason=connect-failed" in failed


async def test_a_reload_moves_the_access_log(backends: Any, proxy: Any, tmp_path: Path) -> None:
    b = await backends("a")
    first, second = tmp_path / "one.log", tmp_path / "two.log"
    route = RouteSpec(servers=(b.server,))
    p = await proxy(route, access_log=str(first))
    async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{p.port}") as client:
        await client.get("/before")
        p.update(replace(p.spec, access_log=str(second)))
        await client.get("/after")
        p.update(replace(p.spec, access_log="off"))
        await client.get("/off")
    p.flush_access_log()
    assert ["target=/before" in x for x in first.read_text().splitlines()] == [True]
    assert ["target=/after" in x for x in second.read_text().splitlines()] == [True]
