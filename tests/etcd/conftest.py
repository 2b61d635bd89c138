from __future__ import annotations

import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from interknit.registry.etcd import EtcdRegistry
from tests.etcd.cluster import EtcdCluster

MakeRegistry = Callable[..., Awaitable[EtcdRegistry]]


@pytest.fixture(scope="session")
def etcd(tmp_path_factory: pytest.TempPathFactory) -> Iterator[EtcdCluster]:
    """One etcd member shared by the tests that do not hurt it; each test uses its own prefix."""
    cluster = EtcdCluster(tmp_path_factory.mktemp("etcd"), 1).start()
    try:
        yield cluster
    finally:
        cluster.stop()


@pytest.fixture
def own_etcd(tmp_path: Path) -> Iterator[EtcdCluster]:
    """A member of this test's own, to kill and bring back."""
    cluster = EtcdCluster(tmp_path / "etcd", 1).start()
    try:
        yield cluster
    finally:
        cluster.stop()


@pytest.fixture
def prefix() -> str:
    return f"/ik-{uuid.uuid4().hex[:8]}/"


@pytest.fixture
async def make_registry(tmp_path: Path, prefix: str) -> AsyncIterator[MakeRegistry]:
    """Start EtcdRegistry nodes (closed at the end of the test); each has its own data_dir."""
    made: list[EtcdRegistry] = []

    async def make(cluster: EtcdCluster, name: str = "node-1", **options: Any) -> EtcdRegistry:
        options.setdefault("prefix", prefix)
        options.setdefault("node_ttl", 2.0)
        options.setdefault("request_timeout", 1.0)
        options.setdefault("start_timeout", 5.0)
        registry = EtcdRegistry(
            options.pop("endpoints", cluster.endpoints),
            node_name=name,
            data_dir=tmp_path / name,
            **options,
        )
        await registry.start()
        made.append(registry)
        return registry

    yield make
    for registry in made:
        await registry.close()
