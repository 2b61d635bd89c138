"""The proxy's adapter from the registry to balance pools: events and resyncs reach every pool
of their service, in the pool's own terms (``EndpointState``)."""

from __future__ import annotations

from interknit.proxy.pool_feed import RegistryPools, endpoint_state
from interknit.proxy.spec import RouteSpec
from interknit.registry.model import InstanceSpec
from interknit.registry.state import RegistryState

SECRET = b"k" * 32


def spec(port: int, weight: int = 1) -> InstanceSpec:
    return InstanceSpec(
        address="10.0.0.1", port=port, weight=weight, zone="z1", meta=(("tier", "gold"),)
    )


def test_an_instance_as_a_pool_sees_it() -> None:
    state = RegistryState()
    [event] = state.register("web", "a", spec(8001, weight=3), now=0.0)
    state.set_operator("web", "a", "draining")
    instance = state.get("web", "a")
    assert instance is not None
    seen = endpoint_state(instance)
    assert (seen.key, seen.address, seen.port, seen.weight) == ("web/a", "10.0.0.1", 8001, 3)
    assert (seen.zone, seen.meta, seen.health) == ("z1", (("tier", "gold"),), "draining")
    assert endpoint_state(event.instance).health == "passing"


def test_events_and_resyncs_reach_every_pool_of_their_service() -> None:
    state = RegistryState()
    state.register("web", "a", spec(8001), now=0.0)
    pools = RegistryPools(lambda: state, SECRET)
    first, second = RouteSpec(service="web", name="one"), RouteSpec(service="web", name="two")
    other = RouteSpec(service="api")
    pools.prepare([first, second, other])
    web = [pools.pool(first), pools.pool(second)]
    assert all(p is not None and [e.key for e in p.pool.endpoints] == ["web/a"] for p in web)

    events = state.register("web", "b", spec(8002), now=1.0)
    events += state.set_check_status("web", "a", "critical", "down", now=1.0)
    pools.apply(events)
    for route_pool in web:
        assert route_pool is not None
        assert [e.key for e in route_pool.pool.selected] == ["web/b"]
        assert route_pool.pool.health("web/a") == "critical"
    api = pools.pool(other)
    assert api is not None and api.pool.endpoints == []

    pools.apply(state.deregister("web", "b"))
    for route_pool in web:
        assert route_pool is not None and route_pool.pool.get("web/b") is None

    # A resync replaces the membership with the state's, whatever events were missed.
    state.register("web", "c", spec(8003), now=2.0)
    state.deregister("web", "a")
    pools.resync()
    for route_pool in web:
        assert route_pool is not None
        assert [e.key for e in route_pool.pool.endpoints] == ["web/c"]
