"""The proxy with its neighbours' real parts plugged in: ``balance.Pool`` with ``StickyCookie``,
and ``demand.DemandAdmissions``. These pin the interfaces the node wires together."""

from __future__ import annotations

import asyncio
from collections.abc import Container

import httpx

from interknit.balance.base import Endpoint
from interknit.balance.pool import Pool, make_balancer
from interknit.balance.sticky import StickyCookie, new_secret
from interknit.demand.route import DemandAdmissions
from interknit.demand.settings import DemandSettings
from interknit.proxy import RouteSpec
from interknit.proxy.spec import RouteSpec as _RouteSpec


class RegistryPoolAdapter:
    """What the node writes: a balance ``Pool`` (and its sticky cookie) as a ``PoolLike``."""

    def __init__(self, pool: Pool, sticky: StickyCookie | None) -> None:
        self.pool = pool
        self.sticky = sticky
        self.reports: list[tuple[str, bool]] = []

    def pick(
        self, hash_key: bytes | None, now: float, exclude: Container[Endpoint] = ()
    ) -> Endpoint | None:
        return self.pool.pick(hash_key, now, exclude)

    def report(self, endpoint: Endpoint, ok: bool, now: float) -> None:
        self.reports.append((endpoint.key, ok))

    def pick_sticky(
        self, cookie: str | None, hash_key: bytes | None, now: float, exclude: Container[Endpoint]
    ) -> tuple[Endpoint | None, str | None]:
        assert self.sticky is not None
        return self.sticky.choose(cookie, self.pool, hash_key, now, exclude)


class Pools:
    def __init__(self) -> None:
        self.pools: dict[_RouteSpec, RegistryPoolAdapter] = {}

    def pool(self, route: _RouteSpec) -> RegistryPoolAdapter | None:
        found = self.pools.get(route)
        if found is None:
            pool = Pool.for_servers(route.servers, make_balancer(route.balance), now=0.0)
            sticky = None
            if route.sticky_cookie is not None:
                sticky = StickyCookie(new_secret(), route.sticky_cookie)
            found = self.pools[route] = RegistryPoolAdapter(pool, sticky)
        return found


async def test_balance_pool_with_sticky_cookie(backends, proxy) -> None:
    a, b = await backends("a"), await backends("b")
    pools = Pools()
    route = RouteSpec(servers=(a.server, b.server), sticky_cookie="ik_affinity")
    p = await proxy(route, pools=pools)
    async with httpx.AsyncClient() as client:
        r = await client.get(f"http://127.0.0.1:{p.port}/")
        first = r.headers["x-backend"]
        cookie = r.headers["set-cookie"]
        assert cookie.startswith("ik_affinity=") and "127.0.0.1" not in cookie
        for _ in range(3):
            r = await client.get(f"http://127.0.0.1:{p.port}/")
            assert r.headers["x-backend"] == first and "set-cookie" not in r.headers
    assert all(ok for _, ok in pools.pools[route].reports)
    assert len(pools.pools[route].reports) == 4


async def test_demand_admissions_reject_beyond_the_limit(backends, proxy) -> None:
    from interknit.proxy import ListenerSpec, StaticPoolSource
    from interknit.proxy.listener import HttpListener
    from tests.proxy.conftest import round_robin, until

    b = await backends("a")
    admissions = DemandAdmissions(
        lambda route: DemandSettings(concurrency=1, queue=0) if route.label == "lim" else None
    )
    spec = ListenerSpec(name="d", routes=(RouteSpec(servers=(b.server,), name="lim"),))
    listener = HttpListener(spec, StaticPoolSource(round_robin), admission=admissions)
    await listener.start()
    try:
        async with httpx.AsyncClient() as client:
            url = f"http://127.0.0.1:{listener.port}/"
            slow = asyncio.create_task(client.get(url + "?delay=0.3"))
            await until(lambda: len(b.seen) == 1)
            r = await client.get(url)
            assert r.status_code == 503
            assert "retry-after" in r.headers and r.headers["x-interknit-reason"]
            assert (await slow).status_code == 200
            r = await client.get(url, headers={"X-Request-Timeout": "5s"})
            assert r.status_code == 200
    finally:
        await listener.stop(1)
    # The permit's remaining time went upstream in place of the client's value.
    sent = {k.lower(): v for k, v in b.seen[-1]["headers"]}
    assert "x-request-timeout" in sent
