"""TTL checks on etcd: heartbeats renew an etcd lease through any node, the owner marks the
instance critical when it runs out, and removes it after ``deregister_after``."""

from __future__ import annotations

import asyncio

from interknit.registry.model import Check, Event, InstanceSpec
from tests.etcd.cluster import EtcdCluster
from tests.etcd.conftest import MakeRegistry
from tests.etcd.helpers import eventually

TTL = InstanceSpec(address="10.0.0.2", port=80, check=Check(ttl=1.0))
TTL2 = InstanceSpec(address="10.0.0.2", port=80, check=Check(ttl=2.0))
TTL_DEREG = InstanceSpec(address="10.0.0.2", port=80, check=Check(ttl=1.0, deregister_after=1.0))


async def test_heartbeats_through_any_node_keep_it_passing_without_events(
    etcd: EtcdCluster, make_registry: MakeRegistry
) -> None:
    a = await make_registry(etcd, "a")
    b = await make_registry(etcd, "b")
    _, rev = await a.register("web", "t", TTL2)
    await eventually(lambda: b.state.get("web", "t") is not None)
    for _ in range(12):  # 3 s: half again the TTL
        inst, rev2 = await b.heartbeat("web", "t")
        assert inst.health == "passing"
        await asyncio.sleep(0.25)
    # Steady heartbeats wrote nothing: no revision moved on either node.
    assert a.state.revision == b.state.revision == rev == rev2


async def test_missed_heartbeats_turn_critical_then_a_heartbeat_revives(
    etcd: EtcdCluster, make_registry: MakeRegistry
) -> None:
    a = await make_registry(etcd, "a")
    b = await make_registry(etcd, "b")
    seen: list[Event] = []
    b.subscribe(seen.extend)
    await a.register("web", "t", TTL)
    await eventually(lambda: b.state.get("web", "t") is not None)
    # No heartbeat: etcd drops the TTL key with its lease, the owner (a) marks it critical.
    await eventually(lambda: b.state.get("web", "t").health == "critical", timeout=5)  # type: ignore[union-attr]
    inst = b.state.get("web", "t")
    assert inst is not None and "expired without a heartbeat" in inst.output
    assert seen[-1].reason == "lease"
    revived, _ = await b.heartbeat("web", "t")
    assert revived.health == "passing" and revived.output == "heartbeat"
    await eventually(lambda: a.state.get("web", "t").health == "passing")  # type: ignore[union-attr]


async def test_deregister_after_removes_by_the_owner(
    etcd: EtcdCluster, make_registry: MakeRegistry
) -> None:
    a = await make_registry(etcd, "a")
    b = await make_registry(etcd, "b")
    seen: list[Event] = []
    b.subscribe(seen.extend)
    await a.register("web", "t", TTL_DEREG)
    await a.register(
        "web", "h", InstanceSpec("10.0.0.3", 80, check=Check(http="/", deregister_after=1.0))
    )
    await a.set_check_status("web", "h", "passing", "ok")
    await eventually(lambda: any(e.instance.id == "t" for e in seen))
    await eventually(lambda: b.state.get("web", "t") is None, timeout=8)
    assert [(e.type, e.reason) for e in seen if e.instance.id == "t"][-2:] == [
        ("put", "lease"),
        ("delete", "expire"),
    ]
    # A passing instance with deregister_after is left alone.
    assert b.state.get("web", "h") is not None
