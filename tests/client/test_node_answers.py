"""How the client treats what a node says: a stale copy, an overloaded node, a refusal.

The other side is a small aiohttp server on an ephemeral port standing in for a registry node
in states a real node reaches only with an unreachable etcd or under overload; the client
under test is the real one.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from aiohttp import web

from interknit.client import AsyncClient, RequestRejected
from tests.nodeproc import NodeProcess

INSTANCE = {"service": "web", "id": "old", "address": "10.0.0.9", "port": 80, "health": "passing"}


async def start(app: web.Application) -> tuple[web.AppRunner, str]:
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = runner.addresses[0][1]
    return runner, f"http://127.0.0.1:{port}"


@pytest.fixture
async def stale_node() -> AsyncIterator[str]:
    async def lookup(request: web.Request) -> web.Response:
        body = {"revision": 3, "stale": True, "instances": [INSTANCE]}
        return web.json_response(body, headers={"X-Interknit-Stale": "1"})

    app = web.Application()
    app.router.add_get("/v1/services/{service}", lookup)
    runner, url = await start(app)
    yield url
    await runner.cleanup()


@pytest.fixture
async def overloaded_node() -> AsyncIterator[str]:
    async def busy(request: web.Request) -> web.Response:
        return web.json_response({"error": "overloaded", "detail": None}, status=503)

    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", busy)
    runner, url = await start(app)
    yield url
    await runner.cleanup()


async def test_a_node_serving_a_stale_copy_is_marked_stale(stale_node: str) -> None:
    async with AsyncClient(stale_node, refresh=False) as client:
        lookup = await client.instances("web")
        assert lookup.stale and [i.id for i in lookup] == ["old"]


async def test_a_fresh_node_is_preferred_to_a_stale_one(stale_node: str, node: NodeProcess) -> None:
    node.register("web", "new", port=9001).raise_for_status()
    async with AsyncClient([stale_node, node.url], refresh=False) as client:
        lookup = await client.instances("web")
        assert not lookup.stale and [i.id for i in lookup] == ["new"]
        assert lookup.node == node.url


async def test_an_overloaded_node_is_skipped(overloaded_node: str, node: NodeProcess) -> None:
    node.register("web", "a", port=9001).raise_for_status()
    async with AsyncClient([overloaded_node, node.url], refresh=False) as client:
        assert [i.id for i in await client.instances("web")] == ["a"]
        assert client.nodes.errors() == {overloaded_node: "HTTP 503"}
        async with client.register("me", "m1", address="127.0.0.1", port=1) as registration:
            assert registration.instance is not None
        assert node.client.get("/v1/services/me/instances/m1").status_code == 404


async def test_a_refusal_is_not_retried_elsewhere(node: NodeProcess) -> None:
    async with AsyncClient(node.url, refresh=False) as client:
        with pytest.raises(RequestRejected) as info:
            await client.register("me", "m1", address="not an address!", port=1).start()
        assert info.value.status == 400 and info.value.message.startswith("address")
        assert client.nodes.errors() == {}


async def test_tokens_are_sent(tmp_path: Path) -> None:
    tokens = 'tokens = { read = ["read-token-123"], write = ["write-token-456"] }'
    secured = NodeProcess(tmp_path, registry_config=tokens).start()
    try:
        async with AsyncClient(secured.url, refresh=False) as anonymous:
            with pytest.raises(RequestRejected) as info:
                await anonymous.instances("web")
            assert info.value.status == 401
        async with AsyncClient(secured.url, token="read-token-123", refresh=False) as reader:
            assert (await reader.instances("web")).instances == ()
            with pytest.raises(RequestRejected) as info:
                await reader.register("web", "a", address="127.0.0.1", port=80).start()
            assert info.value.status == 403
        async with AsyncClient(secured.url, token="write-token-456", refresh=False) as writer:
            async with writer.register("web", "a", address="127.0.0.1", port=80):
                assert [i.id for i in await writer.instances("web")] == ["a"]
            assert (await writer.instances("web", healthy=False)).instances == ()
    finally:
        secured.stop()
