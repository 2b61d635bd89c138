"""The store contract, the same on both backends: the embedded SQLite registry and etcd.

Each test runs twice, once per backend, through the public surface the API uses.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from interknit.registry.etcd import EtcdRegistry
from interknit.registry.model import Check, Event, InstanceSpec
from interknit.registry.registry import Registry, RegistryBackend
from interknit.registry.state import Conflict, NotFound, RegistryError
from interknit.registry.store import SqliteStore
from tests.etcd.cluster import EtcdCluster

PLAIN = InstanceSpec(address="10.0.0.1", port=80)
MOVED = InstanceSpec(address="10.0.0.1", port=81)
TTL = InstanceSpec(address="10.0.0.2", port=80, check=Check(ttl=10.0))
HTTP = InstanceSpec(address="10.0.0.3", port=80, check=Check(http="/health"))


@pytest.fixture(params=["embedded", "etcd"])
async def registry(
    request: pytest.FixtureRequest, tmp_path: Path, prefix: str
) -> AsyncIterator[Any]:
    if request.param == "embedded":
        reg: Any = Registry(SqliteStore(tmp_path / "data"))
    else:
        cluster: EtcdCluster = request.getfixturevalue("etcd")
        reg = EtcdRegistry(
            cluster.endpoints, node_name="n1", data_dir=tmp_path / "data", prefix=prefix
        )
    await reg.start()
    try:
        yield reg
    finally:
        await reg.close()


async def test_registration_and_noop_reregistration(registry: Any) -> None:
    inst, rev = await registry.register("web", "a", PLAIN)
    assert (inst.service, inst.id, inst.port, inst.health) == ("web", "a", 80, "passing")
    assert rev == registry.state.revision and inst.create_revision == inst.mod_revision == rev
    assert registry.state.get("web", "a") == inst
    again, rev2 = await registry.register("web", "a", PLAIN)
    assert rev2 == rev and again.mod_revision == rev
    moved, rev3 = await registry.register("web", "a", MOVED)
    assert rev3 > rev and moved.port == 81
    assert moved.create_revision == rev and moved.mod_revision == rev3
    assert [i.port for i in registry.state.instances("web")] == [81]


async def test_initial_health_by_check_kind(registry: Any) -> None:
    await registry.register("web", "plain", PLAIN)
    await registry.register("web", "ttl", TTL)
    http, _ = await registry.register("web", "http", HTTP)
    assert http.output == "no check has run yet" and http.critical_since is not None
    health = {i.id: i.health for i in registry.state.instances("web")}
    assert health == {"plain": "passing", "ttl": "passing", "http": "critical"}


async def test_deregister_and_not_found(registry: Any) -> None:
    _, rev = await registry.register("web", "a", PLAIN)
    rev2 = await registry.deregister("web", "a")
    assert rev2 > rev and registry.state.get("web", "a") is None
    assert registry.state.service_names() == []
    with pytest.raises(NotFound):
        await registry.deregister("web", "a")
    with pytest.raises(NotFound):
        await registry.heartbeat("nope", "x")
    with pytest.raises(NotFound):
        await registry.set_operator("web", "a", "draining")


async def test_heartbeat(registry: Any) -> None:
    await registry.register("web", "plain", PLAIN)
    with pytest.raises(Conflict):
        await registry.heartbeat("web", "plain")
    _, rev = await registry.register("web", "ttl", TTL)
    inst, rev2 = await registry.heartbeat("web", "ttl")
    # A heartbeat of a passing instance changes nothing anyone can see.
    assert inst.health == "passing" and rev2 == rev == registry.state.revision


async def test_operator_health(registry: Any) -> None:
    _, rev = await registry.register("web", "a", PLAIN)
    inst, rev2 = await registry.set_operator("web", "a", "draining")
    assert inst.health == "draining" and rev2 > rev
    same, rev3 = await registry.set_operator("web", "a", "draining")
    assert same.health == "draining" and rev3 == rev2
    back, rev4 = await registry.set_operator("web", "a", "passing")
    assert back.health == "passing" and rev4 > rev3
    with pytest.raises(RegistryError) as info:
        await registry.set_operator("web", "a", "bogus")
    assert info.value.status == 400


async def test_check_results_and_ejection(registry: Any) -> None:
    await registry.register("web", "h", HTTP)
    await registry.set_check_status("web", "h", "passing", "200 OK")
    inst = registry.state.get("web", "h")
    assert inst.health == "passing" and inst.output == "200 OK" and inst.critical_since is None
    rev = registry.state.revision
    await registry.set_check_status("web", "h", "passing", "200 OK again")
    assert registry.state.revision == rev  # a steady result writes nothing
    await registry.set_check_status("web", "h", "critical", "503")
    assert registry.state.get("web", "h").critical_since is not None
    await registry.set_ejected("web", "h", 1234.5)
    assert registry.state.get("web", "h").ejected_until == 1234.5
    await registry.set_check_status("web", "gone", "critical", "x")  # unknown: ignored


async def test_revisions_grow_and_events_reach_listeners(registry: Any) -> None:
    seen: list[Event] = []
    registry.subscribe(seen.extend)
    revisions = []
    for i in range(5):
        _, rev = await registry.register("web", f"i{i}", PLAIN)
        revisions.append(rev)
    await registry.set_operator("web", "i0", "maintenance")
    await registry.deregister("web", "i1")
    assert revisions == sorted(set(revisions))
    for _ in range(100):
        if len(seen) == 7:
            break
        await asyncio.sleep(0.01)
    assert [(e.type, e.reason, e.instance.id) for e in seen] == [
        ("put", "register", "i0"),
        ("put", "register", "i1"),
        ("put", "register", "i2"),
        ("put", "register", "i3"),
        ("put", "register", "i4"),
        ("put", "health", "i0"),
        ("delete", "deregister", "i1"),
    ]
    got = registry.state.events_since(revisions[2])
    assert got is not None
    events, upto = got
    assert [e.instance.id for e in events] == ["i3", "i4", "i0", "i1"]
    assert upto == registry.state.revision
    only = registry.state.events_since(revisions[2], "other")
    assert only is not None and only[0] == []


async def test_watch_wakeups_by_service(registry: Any) -> None:
    _, rev = await registry.register("web", "a", PLAIN)
    assert not registry.changed_since("web", rev)
    assert await registry.wait_for_change("web", rev, 0.05) is False
    waiter = asyncio.create_task(registry.wait_for_change("web", rev, 5.0))
    other = asyncio.create_task(registry.wait_for_change("db", rev, 0.5))
    await asyncio.sleep(0.05)
    await registry.register("web", "b", PLAIN)
    assert await asyncio.wait_for(waiter, 2.0) is True
    # Another service's change does not wake a watcher of "db".
    assert await other is False
    assert registry.changed_since(None, rev)


async def test_wake_all_answers_blocking_queries_at_once(registry: Any) -> None:
    _, rev = await registry.register("web", "a", PLAIN)
    waiter = asyncio.create_task(registry.wait_for_change("web", rev, 30.0))
    await asyncio.sleep(0.02)
    registry.wake_all()
    assert await asyncio.wait_for(waiter, 2.0) is False
    assert await asyncio.wait_for(registry.wait_for_change("web", rev, 30.0), 2.0) is False


def _both_conform(embedded: Registry, etcd: EtcdRegistry) -> list[RegistryBackend]:
    return [embedded, etcd]
