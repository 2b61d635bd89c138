"""The HTTP API over two etcd-backed nodes: one truth through both, and stale answers with
503 writes while etcd is away."""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable

import httpx
import pytest
from aiohttp import web
from prometheus_client import CollectorRegistry

from interknit.admin.app import build_app
from interknit.registry.api import RegistryApi
from interknit.registry.etcd import EtcdRegistry
from interknit.registry.tokens import Tokens
from tests.etcd.cluster import EtcdCluster
from tests.etcd.conftest import MakeRegistry
from tests.etcd.helpers import eventually

Serve = Callable[[EtcdRegistry], Awaitable[httpx.AsyncClient]]
BODY = {"address": "127.0.0.1", "port": 9001}


@pytest.fixture
async def serve() -> AsyncIterator[Serve]:
    """The node's real HTTP app on 127.0.0.1:0 around a registry."""
    runners: list[web.AppRunner] = []
    clients: list[httpx.AsyncClient] = []

    async def start(registry: EtcdRegistry) -> httpx.AsyncClient:
        # EtcdRegistry has Registry's surface; RegistryApi is annotated with Registry.
        api = RegistryApi(registry)
        app = build_app(
            api, CollectorRegistry(), Tokens([], []), lambda: {}, {}, lambda: (True, "ready")
        )
        runner = web.AppRunner(app)
        await runner.setup()
        site = web.TCPSite(runner, "127.0.0.1", 0)
        await site.start()
        port = runner.addresses[0][1]
        runners.append(runner)
        client = httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}", timeout=10)
        clients.append(client)
        return client

    yield start
    for client in clients:
        await client.aclose()
    for runner in runners:
        await runner.cleanup()


async def test_a_registration_through_one_node_is_served_by_the_other(
    etcd: EtcdCluster, make_registry: MakeRegistry, serve: Serve
) -> None:
    one = await serve(await make_registry(etcd, "one"))
    two = await serve(await make_registry(etcd, "two"))
    r = await one.put("/v1/services/search/instances/s1", json=BODY)
    assert r.status_code == 200, r.text
    revision = r.json()["revision"]
    # A blocking query on the other node wakes when the watch delivers it.
    r = await two.get(f"/v1/services/search?index={revision - 1}&wait=5s")
    body = r.json()
    assert body["revision"] >= revision and body["stale"] is False
    assert [i["id"] for i in body["instances"]] == ["s1"]
    assert "X-Interknit-Stale" not in r.headers
    r = await two.put("/v1/services/search/instances/s1/health", json={"status": "draining"})
    assert r.status_code == 200 and r.json()["health"] == "draining"


async def test_stale_answers_and_refused_writes_while_etcd_is_away(
    own_etcd: EtcdCluster, make_registry: MakeRegistry, serve: Serve
) -> None:
    registry = await make_registry(own_etcd, "one")
    client = await serve(registry)
    assert (await client.put("/v1/services/search/instances/s1", json=BODY)).status_code == 200
    own_etcd.kill_all()
    await eventually(lambda: registry.stale, timeout=5)
    r = await client.get("/v1/services/search")
    assert r.status_code == 200 and r.headers["X-Interknit-Stale"] == "1"
    assert r.json()["stale"] is True and [i["id"] for i in r.json()["instances"]] == ["s1"]
    r = await client.put("/v1/services/search/instances/s2", json=BODY)
    assert r.status_code == 503
    assert r.json()["error"].startswith("etcd cannot be reached: writes are refused")
    own_etcd.restart_all()
    await eventually(lambda: not registry.stale, timeout=10)
    r = await client.put("/v1/services/search/instances/s2", json=BODY)
    assert r.status_code == 200
    r = await client.get("/v1/services/search")
    assert r.json()["stale"] is False and len(r.json()["instances"]) == 2
