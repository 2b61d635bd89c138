"""The plug points: stickiness through the pool's hash key, and the admission (demand) slot."""

from __future__ import annotations

from collections.abc import Callable

import httpx

from interknit.proxy import RouteSpec
from interknit.proxy.spec import RouteSpec as _RouteSpec


async def test_sticky_cookie_pins_a_client_to_its_endpoint(backends, proxy) -> None:
    a, b = await backends("a"), await backends("b")
    p = await proxy(RouteSpec(servers=(a.server, b.server), sticky_cookie="ik"))
    async with httpx.AsyncClient() as client:
        r = await client.get(f"http://127.0.0.1:{p.port}/")
        first = r.headers["x-backend"]
        assert "ik=" in r.headers["set-cookie"]
        # The client now sends the cookie: every request lands on the same endpoint, and
        # the cookie is not set again.
        for _ in range(4):
            r = await client.get(f"http://127.0.0.1:{p.port}/")
            assert r.headers["x-backend"] == first
            assert "set-cookie" not in r.headers
    async with httpx.AsyncClient() as fresh:
        backends_seen = {(await fresh.get(f"http://127.0.0.1:{p.port}/")).headers["x-backend"]}
        fresh.cookies.clear()
        backends_seen.add((await fresh.get(f"http://127.0.0.1:{p.port}/")).headers["x-backend"])
    assert backends_seen == {"a", "b"}


class Ticket:
    """Admitted or refused at once (the proxy's ``Ticket`` interface)."""

    def __init__(self, owner: OneAtATime, admitted: bool) -> None:
        self.owner = owner
        self.admitted = admitted
        self.refused = not admitted
        self.status = 503
        self.reason = "overloaded"
        self.retry_after = 1

    def forward_timeout(self) -> str | None:
        return None

    def release(self, ok: bool, now: float) -> None:
        self.owner.busy = False
        self.owner.log.append(("release", ok))

    def cancel(self) -> None:
        raise AssertionError("never queued")


class OneAtATime:
    """Admits while nothing else is admitted; rejects otherwise."""

    client_header = None

    def __init__(self) -> None:
        self.log: list[tuple[str, bool]] = []
        self.busy = False

    def admit(self, now: float, *, on_decided: Callable[[], None], **demand: object) -> Ticket:
        self.demand = demand
        if self.busy:
            self.log.append(("reject", False))
            return Ticket(self, False)
        self.busy = True
        self.log.append(("admit", True))
        return Ticket(self, True)


class Admissions:
    def __init__(self) -> None:
        self.limiter = OneAtATime()

    def admission(self, route: _RouteSpec) -> OneAtATime | None:
        return self.limiter if route.name == "limited" else None


async def test_admission_rejects_with_503_and_releases_permits(backends, proxy) -> None:
    import asyncio

    from interknit.proxy import ListenerSpec, StaticPoolSource
    from interknit.proxy.listener import HttpListener
    from tests.proxy.conftest import round_robin, until

    b = await backends("a")
    admissions = Admissions()
    spec = ListenerSpec(name="adm", routes=(RouteSpec(servers=(b.server,), name="limited"),))
    listener = HttpListener(spec, StaticPoolSource(round_robin), admission=admissions)
    await listener.start()
    try:
        async with httpx.AsyncClient() as client:
            url = f"http://127.0.0.1:{listener.port}/"
            slow = asyncio.create_task(client.get(url + "?delay=0.3"))
            await until(lambda: len(b.seen) == 1)
            r = await client.get(url)
            assert r.status_code == 503
            assert r.headers["x-interknit-reason"] == "overloaded"
            assert r.headers["retry-after"] == "1"
            assert (await slow).status_code == 200
            r = await client.get(url)
            assert r.status_code == 200
    finally:
        await listener.stop(1)
    assert admissions.limiter.log == [
        ("admit", True),
        ("reject", False),
        ("release", True),
        ("admit", True),
        ("release", True),
    ]
