"""AsyncClient against real ``interknit up`` processes."""

from __future__ import annotations

import asyncio
import time
from collections import Counter
from collections.abc import Callable

import pytest

from interknit.client import (
    AsyncClient,
    DiscoveryUnavailable,
    Lookup,
    NoInstances,
    Query,
    RequestRejected,
)
from tests.clock import ManualClock
from tests.nodeproc import NodeProcess, free_port

# Cache ages, TTLs and max_stale are read from an injected clock that the tests move; only
# what the node does (leases, heartbeats) runs on real time, waited on with generous deadlines.


async def eventually(predicate: Callable[[], bool], timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError("condition not reached in time")
        await asyncio.sleep(0.02)


def ids(lookup: Lookup) -> list[str]:
    return sorted(i.id for i in lookup)


def health_of(node: NodeProcess, service: str, iid: str) -> str | None:
    resp = node.client.get(f"/v1/services/{service}/instances/{iid}")
    return None if resp.status_code == 404 else str(resp.json()["health"])


async def test_lookup_filters_and_unknown_services(node: NodeProcess) -> None:
    node.register("web", "a", port=9001, tags=["v1"]).raise_for_status()
    node.register("web", "b", port=9002, check={"http": "/nope"}).raise_for_status()
    async with AsyncClient(node.url, refresh_wait=0.5) as client:
        passing = await client.instances("web")
        assert ids(passing) == ["a"] and not passing.stale and passing.node == node.url
        assert ids(await client.instances("web", healthy=False)) == ["a", "b"]
        assert ids(await client.instances("web", healthy=False, tag="v1")) == ["a"]
        unknown = await client.instances("nothing-here")
        assert unknown.instances == () and not unknown.stale
        with pytest.raises(RequestRejected) as info:
            await client.instances("Not_A_Label")
        assert info.value.status == 400


async def test_cache_answers_within_ttl_and_asks_again_after(node: NodeProcess) -> None:
    node.register("web", "a", port=9001).raise_for_status()
    clock = ManualClock()
    async with AsyncClient(node.url, cache_ttl=0.3, refresh=False, clock=clock) as client:
        assert ids(await client.instances("web")) == ["a"]
        node.register("web", "b", port=9002).raise_for_status()
        clock.advance(0.29)
        cached = await client.instances("web")
        assert ids(cached) == ["a"] and not cached.stale
        clock.advance(0.02)
        assert ids(await client.instances("web")) == ["a", "b"]


async def test_background_blocking_query_keeps_the_cache_current(node: NodeProcess) -> None:
    node.register("web", "a", port=9001).raise_for_status()
    clock = ManualClock()
    async with AsyncClient(node.url, cache_ttl=0.1, refresh_wait=1, clock=clock) as client:
        assert ids(await client.instances("web")) == ["a"]
        query = Query("web")

        def live() -> bool:
            entry = client.cache.entry(query)
            return entry is not None and entry.live

        await eventually(live)
        node.register("web", "b", port=9002).raise_for_status()

        def has_b() -> bool:
            entry = client.cache.entry(query)
            return entry is not None and len(entry.instances) == 2

        await eventually(has_b)
        await eventually(live)  # the next blocking query is connected again
        clock.advance(0.2)  # well past the TTL, but the blocking query is connected
        lookup = await client.instances("web")
        assert ids(lookup) == ["a", "b"] and lookup.age == 0.0 and not lookup.stale


def lookups_served(node: NodeProcess) -> float:
    """How many service lookups the node has answered (its own request counter)."""
    total = 0.0
    for line in node.client.get("/metrics").text.splitlines():
        if line.startswith("interknit_http_requests_total{") and (
            'endpoint="/v1/services/{service}",method="GET"' in line
        ):
            total += float(line.rsplit(" ", 1)[1])
    return total


async def test_concurrent_lookups_share_one_request(node: NodeProcess) -> None:
    node.register("web", "a", port=9001).raise_for_status()
    async with AsyncClient(node.url, refresh=False, cache_ttl=60) as client:
        before = lookups_served(node)
        results = await asyncio.gather(*(client.instances("web") for _ in range(20)))
        assert all(ids(r) == ["a"] for r in results)
        for _ in range(20):
            await client.instances("web")
        assert lookups_served(node) - before == 1


async def test_failover_to_the_next_node_when_one_is_stopped(
    two_nodes: tuple[NodeProcess, NodeProcess],
) -> None:
    first, second = two_nodes
    for node in two_nodes:
        node.register("web", "a", port=9001).raise_for_status()
    second.register("web", "only-on-2", port=9002).raise_for_status()
    clock = ManualClock()
    async with AsyncClient(
        [first.url, second.url], cache_ttl=0.1, refresh=False, clock=clock
    ) as client:
        lookup = await client.instances("web")
        assert lookup.node == first.url and ids(lookup) == ["a"]
        assert first.terminate() == 0
        clock.advance(0.15)
        lookup = await client.instances("web")
        assert lookup.node == second.url and not lookup.stale
        assert ids(lookup) == ["a", "only-on-2"]
        assert client.nodes.preferred == second.url
        # The stopped node stays behind the one that works.
        assert client.nodes.order(clock()) == [second.url, first.url]


async def test_a_dead_node_first_in_the_list_costs_nothing_once_known(
    node: NodeProcess,
) -> None:
    dead = f"http://127.0.0.1:{free_port()}"
    node.register("web", "a", port=9001).raise_for_status()
    async with AsyncClient([dead, node.url], refresh=False) as client:
        lookup = await client.instances("web")
        assert lookup.node == node.url
        assert dead in client.nodes.errors()


async def test_stale_results_while_every_registry_node_is_down(
    two_nodes: tuple[NodeProcess, NodeProcess],
) -> None:
    first, second = two_nodes
    for node in two_nodes:
        node.register("web", "a", port=9001).raise_for_status()
        node.register("web", "b", port=9002).raise_for_status()
    clock = ManualClock()
    async with AsyncClient(
        [first.url, second.url], cache_ttl=0.2, max_stale=1.5, refresh_wait=1, clock=clock
    ) as client:
        fresh = await client.instances("web")
        assert not fresh.stale and ids(fresh) == ["a", "b"]
        confirmed = clock()
        first.kill9()
        second.kill9()
        # The background blocking query notices the nodes are gone (no answer is live).
        await eventually(lambda: not client.cache.entry(Query("web")).live)  # type: ignore[union-attr]
        clock.advance(0.3)
        stale = await client.instances("web")
        assert stale.stale and ids(stale) == ["a", "b"]
        assert stale.age == pytest.approx(0.3)
        # Balancing still works on the stale answer.
        assert (await client.pick("web")).id in {"a", "b"}
        # A service never looked up has nothing to fall back on.
        with pytest.raises(DiscoveryUnavailable) as info:
            await client.instances("other")
        assert set(info.value.errors) == {first.url, second.url}
        # Past max_stale the cached answer is no longer served.
        clock.advance(confirmed + 1.6 - clock())
        with pytest.raises(DiscoveryUnavailable):
            await client.instances("web")
        with pytest.raises(DiscoveryUnavailable):
            await client.pick("web")


async def test_recovers_when_a_node_comes_back(node: NodeProcess) -> None:
    node.register("web", "a", port=9001).raise_for_status()
    clock = ManualClock()
    async with AsyncClient(
        node.url, cache_ttl=0.1, refresh_wait=1, retry_after=0.05, clock=clock
    ) as client:
        await client.instances("web")
        node.kill9()
        await eventually(lambda: not client.cache.entry(Query("web")).live)  # type: ignore[union-attr]
        clock.advance(0.2)
        assert (await client.instances("web")).stale
        node.start()
        node.register("web", "b", port=9002).raise_for_status()

        async def recovered() -> Lookup:
            while True:
                clock.advance(0.05)  # the dead node's rest (retry_after) runs out
                lookup = await client.instances("web")
                if not lookup.stale and len(lookup.instances) == 2:
                    return lookup
                await asyncio.sleep(0.05)

        lookup = await asyncio.wait_for(recovered(), 20)
        assert ids(lookup) == ["a", "b"]


async def test_pick_uses_the_balancer(node: NodeProcess) -> None:
    node.register("web", "a", port=9001, weight=2).raise_for_status()
    node.register("web", "b", port=9002).raise_for_status()
    node.register("web", "c", port=9003).raise_for_status()
    node.register("web", "d", port=9004).raise_for_status()
    node.client.put("/v1/services/web/instances/d/health", json={"status": "draining"})
    async with AsyncClient(node.url, refresh=False) as client:
        counts = Counter([(await client.pick("web")).id for _ in range(40)])
        assert counts == {"a": 20, "b": 10, "c": 10}
        chosen = {(await client.pick("web", key="user-7", balance="maglev")).id for _ in range(10)}
        assert len(chosen) == 1
        retry = await client.pick("web", exclude={"a", "b"})
        assert retry.id == "c"
        with pytest.raises(NoInstances):
            await client.pick("nothing-here")
        with pytest.raises(ValueError):
            await client.pick("web", balance="fastest")


async def test_watch_yields_updates_on_change(node: NodeProcess) -> None:
    node.register("web", "a", port=9001).raise_for_status()
    async with AsyncClient(node.url, refresh_wait=0.5) as client:
        updates: asyncio.Queue[Lookup] = asyncio.Queue()

        async def follow() -> None:
            async for lookup in client.watch("web"):
                await updates.put(lookup)

        task = asyncio.create_task(follow())
        try:
            first = await asyncio.wait_for(updates.get(), 5)
            assert ids(first) == ["a"] and not first.stale
            node.register("web", "b", port=9002).raise_for_status()
            second = await asyncio.wait_for(updates.get(), 5)
            assert ids(second) == ["a", "b"] and second.revision > first.revision
            # Draining leaves the passing view; an unrelated service does not wake it.
            node.register("other", "x", port=9100).raise_for_status()
            node.client.put("/v1/services/web/instances/a/health", json={"status": "draining"})
            third = await asyncio.wait_for(updates.get(), 5)
            assert ids(third) == ["b"]
            node.client.delete("/v1/services/web/instances/b")
            fourth = await asyncio.wait_for(updates.get(), 5)
            assert ids(fourth) == []
            assert updates.empty()
        finally:
            task.cancel()


async def test_watch_marks_stale_when_nodes_die_then_gives_up(node: NodeProcess) -> None:
    node.register("web", "a", port=9001).raise_for_status()
    async with AsyncClient(node.url, cache_ttl=0.1, max_stale=0.8, retry_after=0.05) as client:
        stream = client.watch("web")
        first = await asyncio.wait_for(anext(stream), 10)
        assert not first.stale
        node.kill9()
        stale = await asyncio.wait_for(anext(stream), 10)
        assert stale.stale and ids(stale) == ["a"]
        with pytest.raises(DiscoveryUnavailable):
            await asyncio.wait_for(anext(stream), 10)


async def test_watch_with_no_node_and_no_cache_raises() -> None:
    async with AsyncClient(f"127.0.0.1:{free_port()}") as client:
        with pytest.raises(DiscoveryUnavailable):
            await anext(client.watch("web"))


async def test_registration_heartbeats_keep_a_short_ttl_passing(node: NodeProcess) -> None:
    async with AsyncClient(node.url, refresh_wait=0.5) as client:
        # A heartbeat every TTL/3: a lease lapses only if two in a row are more than a third
        # of a second late, where 500ms left a busy machine 170ms.
        registration = client.register(
            "me", "m1", address="127.0.0.1", port=1234, ttl="1s", tags=["v2"]
        )
        async with registration:
            started = time.monotonic()
            assert registration.instance is not None
            assert registration.instance.check is not None
            assert registration.instance.check.ttl == 1.0
            # More than one TTL of heartbeats: without them the lease would have run out.
            await eventually(lambda: registration.heartbeats >= 4, timeout=20)
            assert time.monotonic() - started > 1.0
            assert health_of(node, "me", "m1") == "passing"
            assert ids(await client.instances("me", tag="v2")) == ["m1"]
        assert health_of(node, "me", "m1") is None


async def test_without_heartbeats_the_lease_runs_out(node: NodeProcess) -> None:
    async with AsyncClient(node.url, refresh_wait=0.5) as client:
        registration = client.register("me", "m1", address="127.0.0.1", port=1234, ttl=0.3)
        await registration.start()
        await registration.close(deregister=False)
        await eventually(lambda: health_of(node, "me", "m1") == "critical")


async def test_registration_comes_back_after_the_registry_forgets_it(node: NodeProcess) -> None:
    client = AsyncClient(node.url, refresh_wait=0.5)
    async with client, client.register("me", "m1", address="127.0.0.1", port=1234, ttl=1.0) as reg:
        node.client.delete("/v1/services/me/instances/m1").raise_for_status()
        await eventually(lambda: reg.registrations == 2)
        assert health_of(node, "me", "m1") == "passing"


async def test_bad_registration_is_refused(node: NodeProcess) -> None:
    async with AsyncClient(node.url, refresh_wait=0.5) as client:
        with pytest.raises(RequestRejected) as info:
            await client.register("me", "m1", address="127.0.0.1", port=0).start()
        assert info.value.status == 400
        with pytest.raises(ValueError):
            client.register("me", "m1", address="127.0.0.1", port=1, ttl=None)


async def test_client_close_deregisters_open_registrations(node: NodeProcess) -> None:
    client = AsyncClient(node.url, refresh_wait=0.5)
    await client.register("me", "m1", address="127.0.0.1", port=1234).start()
    assert health_of(node, "me", "m1") == "passing"
    await client.close()
    assert health_of(node, "me", "m1") is None
