"""Request partitioning, retries, the retry budget and the proxy's own error answers."""

from __future__ import annotations

import asyncio
import contextlib

import httpx
from prometheus_client import CollectorRegistry

from interknit.proxy import MatchSpec, RouteSpec
from interknit.proxy.pools import BalancedPool, PoolLike
from interknit.proxy.spec import RouteSpec as _RouteSpec
from tests.proxy.conftest import RoundRobin, body_json, free_port


async def test_route_matchers_first_match_wins_and_404(backends, proxy) -> None:
    names = ["host", "exact", "prefix", "regex", "method", "hdr-present", "hdr-value", "all"]
    bs = {n: await backends(n) for n in names}
    routes = [
        RouteSpec(match=MatchSpec(host="*.shop.test"), servers=(bs["host"].server,)),
        RouteSpec(match=MatchSpec(path_exact="/exact"), servers=(bs["exact"].server,)),
        RouteSpec(match=MatchSpec(path_prefix="/api/"), servers=(bs["prefix"].server,)),
        RouteSpec(match=MatchSpec(path_regex=r"/items/\d+$"), servers=(bs["regex"].server,)),
        RouteSpec(match=MatchSpec(method="DELETE"), servers=(bs["method"].server,)),
        RouteSpec(
            match=MatchSpec(headers=(("X-Canary", None),)), servers=(bs["hdr-present"].server,)
        ),
        RouteSpec(
            match=MatchSpec(headers=(("X-Tier", "gold"),)), servers=(bs["hdr-value"].server,)
        ),
        # Never reached for /api/ paths: the prefix route comes first.
        RouteSpec(match=MatchSpec(path_prefix="/api/", method="GET"), servers=(bs["all"].server,)),
    ]
    p = await proxy(*routes)
    base = f"http://127.0.0.1:{p.port}"
    cases = [
        ("GET", "/x", {"Host": "www.shop.test"}, "host"),
        ("GET", "/exact", {}, "exact"),
        ("GET", "/exact?q=1", {}, "exact"),
        ("GET", "/api/v1", {}, "prefix"),
        ("GET", "/items/42", {}, "regex"),
        ("DELETE", "/thing", {}, "method"),
        ("GET", "/c", {"X-Canary": ""}, "hdr-present"),
        ("GET", "/t", {"X-Tier": "gold"}, "hdr-value"),
    ]
    async with httpx.AsyncClient() as client:
        for method, path, headers, want in cases:
            r = await client.request(method, base + path, headers=headers)
            assert r.status_code == 200, (path, r.text)
            assert r.headers["x-backend"] == want, (method, path, headers)
        for path, headers in [
            ("/exact/no", {}),
            ("/items/4x", {}),
            ("/t", {"X-Tier": "silver"}),
            ("/x", {"Host": "shop.test"}),
        ]:
            r = await client.get(base + path, headers=headers)
            assert r.status_code == 404, path
            assert r.headers["x-interknit-reason"] == "no-route"
    assert not bs["all"].seen


async def test_update_swaps_routes_without_dropping_connections(backends, proxy) -> None:
    a, b = await backends("a"), await backends("b")
    p = await proxy(RouteSpec(servers=(a.server,)))
    reader, writer = await asyncio.open_connection("127.0.0.1", p.port)
    from tests.proxy.conftest import read_response

    writer.write(b"GET /1 HTTP/1.1\r\nHost: x\r\n\r\n")
    _, headers, _ = await read_response(reader)
    assert headers["x-backend"] == "a"
    p.update(p.spec.__class__(name="test", routes=(RouteSpec(servers=(b.server,)),)))
    writer.write(b"GET /2 HTTP/1.1\r\nHost: x\r\n\r\n")
    _, headers, _ = await read_response(reader)
    assert headers["x-backend"] == "b"
    writer.close()


async def test_retry_after_connect_failure_goes_to_another_endpoint(backends, proxy) -> None:
    live = await backends("live")
    dead = f"127.0.0.1:{await free_port()}"
    registry = CollectorRegistry()
    p = await proxy(RouteSpec(servers=(dead, live.server), attempts=1), metrics=registry)
    async with httpx.AsyncClient() as client:
        for _ in range(4):
            r = await client.post(f"http://127.0.0.1:{p.port}/p", content=b"abc")
            assert r.status_code == 200 and r.headers["x-backend"] == "live"
    assert [s["body_len"] for s in live.seen] == [3, 3, 3, 3]
    # The retry advances the round robin too, so every request starts on the dead one.
    labels = {"listener": "test", "route": f"{dead},{live.server}"}
    assert registry.get_sample_value("interknit_proxy_retries_total", labels) == 4
    errors = registry.get_sample_value(
        "interknit_proxy_endpoint_errors_total", {**labels, "endpoint": dead}
    )
    assert errors == 4


async def test_connect_failure_without_retries_is_502(proxy) -> None:
    dead = f"127.0.0.1:{await free_port()}"
    p = await proxy(RouteSpec(servers=(dead,), attempts=2))
    async with httpx.AsyncClient() as client:
        r = await client.get(f"http://127.0.0.1:{p.port}/")
    assert r.status_code == 502
    assert r.headers["x-interknit-reason"] == "connect-failed"
    assert r.text.startswith("502")


async def test_503_retried_for_get_but_not_for_post(backends, proxy) -> None:
    a, b = await backends("a"), await backends("b")
    p = await proxy(RouteSpec(servers=(a.server, b.server), attempts=1))
    async with httpx.AsyncClient() as client:
        r = await client.get(f"http://127.0.0.1:{p.port}/x?status=503")
        # Both answer 503; the GET went to both, and the last answer is passed on.
        assert r.status_code == 503 and "x-interknit-reason" not in r.headers
        assert len(a.seen) == 1 and len(b.seen) == 1
        r = await client.post(f"http://127.0.0.1:{p.port}/x?status=503", content=b"z")
        assert r.status_code == 503
        assert len(a.seen) + len(b.seen) == 3


async def test_retry_budget_stops_retries(backends, proxy) -> None:
    live = await backends("live")
    dead = f"127.0.0.1:{await free_port()}"
    p = await proxy(
        RouteSpec(servers=(dead, live.server), attempts=3, retry_budget=0.0, retry_min=0)
    )
    async with httpx.AsyncClient() as client:
        r = await client.get(f"http://127.0.0.1:{p.port}/")
    assert r.status_code == 502
    assert r.headers["x-interknit-reason"] == "connect-failed"
    assert live.seen == []


async def test_retry_budget_places_are_given_back(backends, proxy) -> None:
    """A connect failure, then a 503 retried elsewhere, then an answer: each retry's place in
    the budget is held by its own attempt and given back, whatever the path to it."""
    dead = f"127.0.0.1:{await free_port()}"
    a, b = await backends("a"), await backends("b")
    p = await proxy(RouteSpec(servers=(dead, a.server, b.server), attempts=2))
    budget = p.routing[1][0].budget
    async with httpx.AsyncClient() as client:
        for _ in range(3):
            r = await client.get(f"http://127.0.0.1:{p.port}/x?status=503")
            assert r.status_code == 503
            r = await client.get(f"http://127.0.0.1:{p.port}/x")
            assert r.status_code == 200
    assert (budget.requests, budget.retries) == (0, 0)


class EmptyPools:
    def pool(self, route: _RouteSpec) -> PoolLike | None:
        if route.servers == ("none:1",):
            return None
        return BalancedPool([], RoundRobin())


async def test_no_endpoint_is_503_with_retry_after(proxy) -> None:
    p = await proxy(
        RouteSpec(match=MatchSpec(path_prefix="/np"), servers=("none:1",)),
        RouteSpec(service="search"),
        pools=EmptyPools(),
    )
    async with httpx.AsyncClient() as client:
        r = await client.get(f"http://127.0.0.1:{p.port}/")
        assert r.status_code == 503
        assert r.headers["retry-after"] == "1"
        assert r.headers["x-interknit-reason"] == "no-endpoint"
        r = await client.get(f"http://127.0.0.1:{p.port}/np")
        assert r.status_code == 503 and r.headers["x-interknit-reason"] == "no-pool"


async def test_response_timeout_is_504(backends, proxy) -> None:
    b = await backends("slow")
    p = await proxy(RouteSpec(servers=(b.server,), response_timeout=0.2))
    async with httpx.AsyncClient() as client:
        r = await client.get(f"http://127.0.0.1:{p.port}/?delay=0.6")
        assert r.status_code == 504
        assert r.headers["x-interknit-reason"] == "response-timeout"
        # The connection to the client is still good for the next request.
        r = await client.get(f"http://127.0.0.1:{p.port}/")
        assert r.status_code == 200


async def test_total_timeout_is_504(backends, proxy) -> None:
    b = await backends("slow")
    p = await proxy(RouteSpec(servers=(b.server,), timeout=0.2))
    async with httpx.AsyncClient() as client:
        r = await client.get(f"http://127.0.0.1:{p.port}/?delay=0.6")
    assert r.status_code == 504
    assert r.headers["x-interknit-reason"] == "timeout"


async def _resetting_server(answer_after: int) -> tuple[asyncio.Server, list[int]]:
    """Accepts, reads a request head, and closes without answering (first N connections)."""
    count = [0]

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        count[0] += 1
        await reader.readuntil(b"\r\n\r\n")
        if count[0] > answer_after:
            writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nX-Backend: r\r\n\r\nok")
            await writer.drain()
        writer.close()

    server = await asyncio.start_server(handle, "127.0.0.1", 0)
    return server, count


async def test_reset_before_response_is_retried_elsewhere_or_502(proxy) -> None:
    bad, bad_count = await _resetting_server(answer_after=10**6)
    good, _ = await _resetting_server(answer_after=0)
    bad_addr = f"127.0.0.1:{bad.sockets[0].getsockname()[1]}"
    good_addr = f"127.0.0.1:{good.sockets[0].getsockname()[1]}"
    p = await proxy(RouteSpec(servers=(bad_addr, good_addr), attempts=1))
    p2 = await proxy(RouteSpec(servers=(bad_addr,), attempts=1), name="only-bad")
    async with httpx.AsyncClient() as client:
        r = await client.post(f"http://127.0.0.1:{p.port}/", content=b"abc")
        assert r.status_code == 200 and r.text == "ok"
        r = await client.get(f"http://127.0.0.1:{p2.port}/")
        assert r.status_code == 502
        assert r.headers["x-interknit-reason"] == "upstream-reset"
    assert bad_count[0] >= 2
    bad.close()
    good.close()


async def test_access_log_line(backends, proxy, tmp_path) -> None:
    b = await backends("a")
    path = tmp_path / "access.log"
    p = await proxy(RouteSpec(servers=(b.server,), name="web-route"), access_log=str(path))
    async with httpx.AsyncClient() as client:
        await client.get(f"http://127.0.0.1:{p.port}/logged")
    p.flush_access_log()
    lines = path.read_text().splitlines()
    assert len(lines) == 1
    line = lines[0]
    assert "route=web-route" in line and "status=200" in line and "target=/logged " in line
    assert f"endpoint={b.server}" in line and "retries=0" in line and "duration_ms=" in line


async def test_metrics_per_route_and_endpoint(backends, proxy) -> None:
    b = await backends("a")
    registry = CollectorRegistry()
    p = await proxy(RouteSpec(servers=(b.server,), name="r1"), metrics=registry)
    async with httpx.AsyncClient() as client:
        for _ in range(3):
            await client.get(f"http://127.0.0.1:{p.port}/m")
        await client.get(f"http://127.0.0.1:{p.port}/m?status=500")
    labels = {"listener": "test", "route": "r1"}
    assert (
        registry.get_sample_value("interknit_proxy_requests_total", {**labels, "code": "2xx"}) == 3
    )
    assert (
        registry.get_sample_value("interknit_proxy_requests_total", {**labels, "code": "5xx"}) == 1
    )
    assert registry.get_sample_value("interknit_proxy_request_duration_seconds_count", labels) == 4
    assert registry.get_sample_value("interknit_proxy_inflight", labels) == 0
    ep = {**labels, "endpoint": b.server}
    assert registry.get_sample_value("interknit_proxy_endpoint_requests_total", ep) == 4
    assert body_json  # keep helper import used


async def test_stale_kept_alive_connection_is_replaced_transparently(proxy) -> None:
    """The upstream drops a kept-alive connection as the proxy reuses it: no error, no retry."""
    connections = [0]

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        connections[0] += 1
        await reader.readuntil(b"\r\n\r\n")
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")
        await writer.drain()
        # Keep-alive promised, but the second request on this connection gets a close.
        with contextlib.suppress(asyncio.IncompleteReadError):
            await reader.readuntil(b"\r\n\r\n")
        writer.close()

    server = await asyncio.start_server(handle, "127.0.0.1", 0)
    addr = f"127.0.0.1:{server.sockets[0].getsockname()[1]}"
    registry = CollectorRegistry()
    p = await proxy(RouteSpec(servers=(addr,), attempts=0, name="r"), metrics=registry)
    async with httpx.AsyncClient() as client:
        for _ in range(3):
            r = await client.get(f"http://127.0.0.1:{p.port}/")
            assert r.status_code == 200 and r.text == "ok"
    assert connections[0] == 3
    ep = {"listener": "test", "route": "r", "endpoint": addr}
    assert not registry.get_sample_value("interknit_proxy_endpoint_errors_total", ep)
    server.close()


async def test_upstream_keep_alive_connections_are_reused(backends, proxy) -> None:
    b = await backends("a")
    p = await proxy(RouteSpec(servers=(b.server,)))
    async with httpx.AsyncClient() as client:
        for _ in range(5):
            r = await client.get(f"http://127.0.0.1:{p.port}/")
            assert r.status_code == 200
    peers = {h for s in b.seen for k, h in s["headers"] if k.lower() == "x-request-id"}
    assert len(peers) == 5
    assert p.upstreams.idle_count("127.0.0.1", b.port) == 1


async def test_a_burst_keeps_the_connections_it_needed(backends, proxy) -> None:
    """48 requests at once to one endpoint, twice: the second burst finds the 48 connections
    of the first (as HAProxy keeps them), instead of connecting again past a low cap."""
    b = await backends("a")
    p = await proxy(RouteSpec(servers=(b.server,)))
    limits = httpx.Limits(max_connections=48, max_keepalive_connections=48)
    async with httpx.AsyncClient(limits=limits) as client:
        url = f"http://127.0.0.1:{p.port}/?delay=0.2"
        for _ in range(2):
            answers = await asyncio.gather(*(client.get(url) for _ in range(48)))
            assert [r.status_code for r in answers] == [200] * 48
            assert p.upstreams.idle_count("127.0.0.1", b.port) == 48
    assert len(b.seen) == 96 and len({s["peer_port"] for s in b.seen}) == 48
