"""Leases of a consumer's own and compare-and-swap over instances (``registry/txn.py``) on a real
etcd: what the virtual IPs own their addresses with."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from pathlib import Path

import pytest

from interknit.registry.etcd_client import EtcdClient
from interknit.registry.model import Event, InstanceSpec
from interknit.registry.state import Conflict
from interknit.registry.txn import Delete, Expect, Put, Transactional
from tests.etcd.cluster import EtcdCluster
from tests.etcd.conftest import MakeRegistry
from tests.etcd.helpers import eventually, ids, retrying

SPEC = InstanceSpec(address="10.0.0.1", port=80)


@pytest.fixture
def cluster3(tmp_path: Path) -> Iterator[EtcdCluster]:
    cluster = EtcdCluster(tmp_path / "etcd3", 3).start()
    try:
        yield cluster
    finally:
        cluster.stop()


async def test_an_instance_under_a_lease_of_its_own_goes_with_it_alone(
    etcd: EtcdCluster, make_registry: MakeRegistry
) -> None:
    a = await make_registry(etcd, "a")
    b = await make_registry(etcd, "b")
    assert isinstance(a, Transactional)
    await a.register("web", "plain", SPEC)
    lease = await a.grant_lease(5)
    outcome = await a.transact(
        [Expect("web", "leased", created=0)], [Put("web", "leased", SPEC, lease)]
    )
    assert outcome.succeeded and outcome.revision > 0
    await eventually(lambda: ids(b) == ["leased", "plain"])
    assert 0 < await a.keep_lease(lease) <= 5
    seen: list[Event] = []
    b.subscribe(seen.extend)
    # Any node may revoke a lease whose id it knows: b lets a's lease go.
    await b.revoke_lease(lease)
    await eventually(lambda: ids(b) == ["plain"])
    assert [(e.type, e.instance.id) for e in seen] == [("delete", "leased")]
    assert await a.keep_lease(lease) == 0
    await b.revoke_lease(lease)  # already gone: not an error
    # The node's own lease and what is under it were not touched.
    assert await a.keep_lease(a.lease_id) > 0 and ids(a) == ["plain"]


async def test_create_if_absent_lets_exactly_one_of_two_nodes_win(
    etcd: EtcdCluster, make_registry: MakeRegistry
) -> None:
    a = await make_registry(etcd, "a")
    b = await make_registry(etcd, "b")
    for round_ in range(5):
        name = f"x{round_}"
        outcomes = await asyncio.gather(
            *(
                node.transact([Expect("web", name, created=0)], [Put("web", name, spec)])
                for node, spec in ((a, SPEC), (b, InstanceSpec(address="10.0.0.2", port=80)))
            )
        )
        assert sorted(o.succeeded for o in outcomes) == [False, True]
        winner = a if outcomes[0].succeeded else b
        await eventually(lambda n=name: a.state.get("web", n) is not None)  # type: ignore[misc]
        assert a.state.owner("web", name) == winner.node_name


async def test_expectations_compare_creation_and_last_write(
    etcd: EtcdCluster, make_registry: MakeRegistry
) -> None:
    a = await make_registry(etcd, "a")
    first = await a.transact([], [Put("web", "x", SPEC)])
    await eventually(lambda: a.state.get("web", "x") is not None)
    created = first.revision
    # A health change does not move what ``modified`` compares.
    await a.set_check_status("web", "x", "critical", "down")
    second = InstanceSpec(address="10.0.0.9", port=80)
    assert (
        await a.transact([Expect("web", "x", modified=created)], [Put("web", "x", second)])
    ).succeeded
    # The same comparison again is stale now: nothing is written.
    third = InstanceSpec(address="10.0.0.7", port=80)
    stale = await a.transact([Expect("web", "x", modified=created)], [Put("web", "x", third)])
    assert not stale.succeeded
    assert (await a.transact([Expect("web", "x", created=created)], [])).succeeded
    assert not (await a.transact([Expect("web", "x", not_created=created)], [])).succeeded
    # Deleted and registered again: a new creation, which ``not_created`` tells apart.
    assert (await a.transact([Expect("web", "x", created=created)], [Delete("web", "x")])).succeeded
    assert (await a.transact([Expect("web", "x", not_created=created)], [])).succeeded
    assert (await a.transact([Expect("web", "x", created=0)], [Put("web", "x", third)])).succeeded
    assert (await a.transact([Expect("web", "x", not_created=created)], [])).succeeded
    await eventually(lambda: a.state.get("web", "x") is not None)
    inst = a.state.get("web", "x")
    assert inst is not None and inst.spec == third and inst.create_revision > created


async def test_a_put_under_a_lease_that_is_gone_is_refused(
    etcd: EtcdCluster, make_registry: MakeRegistry
) -> None:
    a = await make_registry(etcd, "a")
    lease = await a.grant_lease(5)
    await a.revoke_lease(lease)
    with pytest.raises(Conflict):
        await a.transact([], [Put("web", "x", SPEC, lease)])
    with pytest.raises(ValueError):
        from interknit.registry.model import Check

        ttl = InstanceSpec(address="10.0.0.1", port=80, check=Check(ttl=5.0))
        await a.transact([], [Put("web", "x", ttl)])


async def test_a_relist_does_not_take_over_instances_under_another_lease(
    cluster3: EtcdCluster, make_registry: MakeRegistry
) -> None:
    """A node that re-lists after being cut off registers again what went with its *node*
    lease; an instance it put under a lease of a consumer (or under none) that someone else
    ended meanwhile must stay gone."""
    a = await make_registry(cluster3, "a", endpoints=cluster3.endpoints[:1])
    b = await make_registry(cluster3, "b", endpoints=cluster3.endpoints[1:])
    lease = await a.grant_lease(30)
    await a.transact([], [Put("web", "leased", SPEC, lease), Put("web", "unleased", SPEC)])
    await eventually(lambda: ids(b) == ["leased", "unleased"])
    cluster3.kill(0)
    await eventually(lambda: a.stale)
    await retrying(lambda: b.revoke_lease(lease))
    await retrying(lambda: b.transact([], [Delete("web", "unleased")]))
    _, rev = await retrying(lambda: b.register("web", "new", SPEC))
    client = EtcdClient(cluster3.endpoints[1:])
    await client.compact(rev)  # a must re-list, and sees both vanished
    await client.close()
    cluster3.restart(0)
    await eventually(lambda: not a.stale and ids(a) == ["new"])
    # Two renewals of a's node lease later, nothing came back.
    await asyncio.sleep(2 * a.node_ttl / 3 + 0.3)
    assert ids(b) == ["new"] and ids(a) == ["new"]
