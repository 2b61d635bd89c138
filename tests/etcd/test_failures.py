"""etcd going away and coming back, members dying, nodes dying: what each node serves."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from pathlib import Path

import pytest

from interknit.registry.etcd_client import EtcdClient
from interknit.registry.model import Event, InstanceSpec
from interknit.registry.registry import Unavailable
from tests.etcd.cluster import EtcdCluster
from tests.etcd.conftest import MakeRegistry
from tests.etcd.helpers import eventually, ids, retrying

PLAIN = InstanceSpec(address="10.0.0.1", port=80)


@pytest.fixture
def cluster3(tmp_path: Path) -> Iterator[EtcdCluster]:
    cluster = EtcdCluster(tmp_path / "etcd3", 3).start()
    try:
        yield cluster
    finally:
        cluster.stop()


async def test_two_nodes_agree(etcd: EtcdCluster, make_registry: MakeRegistry) -> None:
    a = await make_registry(etcd, "a")
    b = await make_registry(etcd, "b")
    for i in range(10):
        await (a if i % 2 else b).register("web", f"i{i}", PLAIN)
    await a.set_operator("web", "i3", "draining")
    await b.deregister("web", "i4")
    await eventually(lambda: a.state.revision == b.state.revision)
    assert list(a.state.all_instances()) == list(b.state.all_instances())
    assert len(ids(a)) == 9 and a.state.get("web", "i3").health == "draining"  # type: ignore[union-attr]
    # Each node owns what was registered through it; checks run there.
    assert a.owns("web", "i1") and not b.owns("web", "i1")
    assert b.owns("web", "i0") and not a.owns("web", "i0")


async def test_outage_serves_stale_refuses_writes_and_catches_up(
    own_etcd: EtcdCluster, make_registry: MakeRegistry
) -> None:
    a = await make_registry(own_etcd, "a", node_ttl=2.0)
    acked = []
    for i in range(5):
        await a.register("web", f"i{i}", PLAIN)
        acked.append(f"i{i}")
    own_etcd.kill_all()
    await eventually(lambda: a.stale, timeout=5)
    assert ids(a) == acked  # lookups still answered from the last copy
    with pytest.raises(Unavailable) as info:
        await a.register("web", "late", PLAIN)
    assert info.value.status == 503 and "etcd cannot be reached" in info.value.message
    with pytest.raises(Unavailable):
        await a.deregister("web", "i0")
    # Longer than the node's lease: etcd extends leases when it comes back, so nothing goes.
    await asyncio.sleep(2.5)
    own_etcd.restart_all()
    await eventually(lambda: not a.stale)
    _, rev = await a.register("web", "after", PLAIN)
    assert ids(a) == sorted([*acked, "after"])
    # A fresh node reading etcd sees every acknowledged write.
    b = await make_registry(own_etcd, "b")
    await eventually(lambda: b.state.revision >= rev)
    assert ids(b) == sorted([*acked, "after"])
    await asyncio.sleep(2.5)  # past the lease TTL again: still there
    assert ids(b) == sorted([*acked, "after"])


async def test_member_down_fails_over_and_resumes_the_watch(
    cluster3: EtcdCluster, make_registry: MakeRegistry
) -> None:
    a = await make_registry(cluster3, "a")
    b = await make_registry(cluster3, "b", endpoints=cluster3.endpoints[1:])
    resyncs: list[int] = []
    seen: list[Event] = []
    a.subscribe(seen.extend, lambda: resyncs.append(1))
    await b.register("web", "before", PLAIN)
    await eventually(lambda: ids(a) == ["before"])
    watched = a._client.target
    cluster3.kill(cluster3.endpoints.index("http://" + watched))
    # a's stream broke; it resumes on another member from its last revision + 1.
    for i in range(3):
        await retrying(lambda i=i: b.register("web", f"during{i}", PLAIN))  # type: ignore[misc]
    await eventually(lambda: len(ids(a)) == 4)
    assert not a.stale and resyncs == []  # resumed, not re-listed
    assert [e.instance.id for e in seen] == ["before", "during0", "during1", "during2"]
    # Writes through a go to a live member.
    await retrying(lambda: a.register("web", "via-a", PLAIN))
    await eventually(lambda: "via-a" in ids(b))


async def test_compaction_while_cut_off_forces_a_relist(
    cluster3: EtcdCluster, make_registry: MakeRegistry
) -> None:
    a = await make_registry(cluster3, "a", endpoints=cluster3.endpoints[:1])
    b = await make_registry(cluster3, "b", endpoints=cluster3.endpoints[1:])
    resyncs: list[int] = []
    a.subscribe(lambda events: None, lambda: resyncs.append(1))
    await b.register("web", "keep", PLAIN)
    await b.register("web", "drop", PLAIN)
    await eventually(lambda: ids(a) == ["drop", "keep"])
    cluster3.kill(0)
    await eventually(lambda: a.stale)
    await retrying(lambda: b.deregister("web", "drop"))
    _, rev = await retrying(lambda: b.register("web", "new", PLAIN))
    client = EtcdClient(cluster3.endpoints[1:])
    await client.compact(rev)
    await client.close()
    cluster3.restart(0)
    await eventually(lambda: not a.stale and ids(a) == ["keep", "new"])
    assert resyncs == [1]
    assert a.state.revision >= rev


async def test_quorum_lost_makes_nodes_stale(
    cluster3: EtcdCluster, make_registry: MakeRegistry
) -> None:
    a = await make_registry(cluster3, "a", endpoints=cluster3.endpoints[:1])
    await a.register("web", "x", PLAIN)
    cluster3.kill(1)
    cluster3.kill(2)
    # The surviving member loses its leader; it ends our watch and writes cannot commit.
    await eventually(lambda: a.stale, timeout=10)
    assert ids(a) == ["x"]
    with pytest.raises(Unavailable):
        await a.register("web", "y", PLAIN)
    cluster3.restart_all()
    await eventually(lambda: not a.stale, timeout=10)
    await retrying(lambda: a.register("web", "y", PLAIN))
    # If the node's lease ran out meanwhile, x comes back by anti-entropy under the new lease,
    # which may land after y.
    await eventually(lambda: ids(a) == ["x", "y"], timeout=10)


async def test_dead_node_takes_its_instances_after_the_lease(
    etcd: EtcdCluster, make_registry: MakeRegistry
) -> None:
    a = await make_registry(etcd, "a", node_ttl=1.0)
    b = await make_registry(etcd, "b", node_ttl=5.0)
    seen: list[Event] = []
    b.subscribe(seen.extend)
    await a.register("web", "mine", PLAIN)
    await b.register("web", "theirs", PLAIN)
    await eventually(lambda: ids(b) == ["mine", "theirs"])
    await a.close()  # as a crash looks to etcd: keepalives stop, the lease is not revoked
    await eventually(lambda: ids(b) == ["theirs"], timeout=6)
    gone = [e for e in seen if e.type == "delete"]
    assert [(e.instance.id, e.reason) for e in gone] == [("mine", "expire")]


async def test_quick_restart_keeps_instances(
    etcd: EtcdCluster, make_registry: MakeRegistry
) -> None:
    a = await make_registry(etcd, "a", node_ttl=2.0)
    b = await make_registry(etcd, "b")
    await a.register("web", "mine", PLAIN)
    lease = a.lease_id
    await a.close()
    again = await make_registry(etcd, "a", node_ttl=2.0)  # same name and data_dir
    assert again.lease_id == lease
    assert again.owns("web", "mine")
    await asyncio.sleep(3.0)  # well past the TTL: the new process renews the old lease
    assert ids(b) == ["mine"]


async def test_node_cut_off_past_its_lease_registers_its_instances_again(
    cluster3: EtcdCluster, make_registry: MakeRegistry
) -> None:
    a = await make_registry(cluster3, "a", endpoints=cluster3.endpoints[:1], node_ttl=1.0)
    b = await make_registry(cluster3, "b", endpoints=cluster3.endpoints[1:])
    await a.register("web", "mine", PLAIN)
    await eventually(lambda: ids(b) == ["mine"])
    old_lease = a.lease_id
    cluster3.kill(0)  # a cannot renew; the other two members still form a quorum
    await eventually(lambda: ids(b) == [], timeout=8)
    cluster3.restart(0)
    # a is alive: it takes a new lease and registers what the old one took, as Consul's
    # anti-entropy does, so a client that registered through it does not have to notice.
    await eventually(lambda: ids(b) == ["mine"], timeout=10)
    await eventually(lambda: a.owns("web", "mine"))
    assert a.lease_id != old_lease and not a.stale


async def test_concurrent_writes_through_two_nodes_compare_and_swap(
    etcd: EtcdCluster, make_registry: MakeRegistry
) -> None:
    a = await make_registry(etcd, "a")
    b = await make_registry(etcd, "b")
    specs = [InstanceSpec(address="10.0.0.1", port=1000 + i) for i in range(10)]
    # Both nodes race to (re-)register one instance with different specs and to drain it.
    writes = [node.register("web", "x", spec) for spec in specs for node in (a, b)]
    await asyncio.gather(*writes)
    await asyncio.gather(
        a.set_operator("web", "x", "draining"),
        b.set_check_status("web", "x", "warning", "slow"),
        b.set_ejected("web", "x", 99.0),
    )
    await eventually(lambda: a.state.revision == b.state.revision)
    x_a, x_b = a.state.get("web", "x"), b.state.get("web", "x")
    assert x_a == x_b and x_a is not None and x_a.spec in specs
    # Each health write compared and swapped: none overwrote another.
    assert (x_a.operator, x_a.check_status, x_a.ejected_until) == ("draining", "warning", 99.0)


async def test_close_with_revoke_removes_the_nodes_instances_at_once(
    etcd: EtcdCluster, make_registry: MakeRegistry
) -> None:
    a = await make_registry(etcd, "a", node_ttl=60.0)
    b = await make_registry(etcd, "b")
    await a.register("web", "mine", PLAIN)
    await eventually(lambda: ids(b) == ["mine"])
    await a.close(revoke=True)  # a node leaving for good, not restarting
    await eventually(lambda: ids(b) == [], timeout=5)  # far sooner than the 60 s lease
