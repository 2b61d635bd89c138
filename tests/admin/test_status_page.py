"""The status page as a person looks at it: a real node, real traffic, headless Chromium.

The node proxies three routes: ``search`` (two healthy backends, one slow path), ``limited``
(a rate limit that answers 429) and ``broken`` (every instance's check fails, so every request
fails). The page must show per route the request rate, 2xx/4xx/5xx, what was shed and why,
retries and latency with their charts; per instance the last check's result, duration and age
and how long it has been in its state; that ``broken`` cannot serve (not just "panic"); the
429s; a demand limit that reads "none" rather than the internal no-limit number; the nodes;
and a filter box that narrows every table. Screenshots go to the test output.
"""

from __future__ import annotations

import asyncio
import json
import socket
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.backends import Backend
from tests.browser import Browser, output_dir
from tests.conftest import require_tool
from tests.nodeproc import NodeProcess, free_port


def keys_with_spaces(value: Any, path: str = "") -> list[str]:
    found = []
    if isinstance(value, dict):
        for key, inner in value.items():
            if " " in str(key):
                found.append(f"{path}.{key}")
            found += keys_with_spaces(inner, f"{path}.{key}")
    elif isinstance(value, list):
        for index, inner in enumerate(value):
            found += keys_with_spaces(inner, f"{path}[{index}]")
    return found


@pytest.fixture
def system(tmp_path: Path) -> Iterator[tuple[NodeProcess, str, dict[str, Backend]]]:
    backends = {name: Backend(name) for name in ("search-1", "search-2", "limited-1")}
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        dead = s.getsockname()[1]
    port = free_port()
    # The operator lowers the floor on check intervals (1 s) for checks every 500 ms.
    extra = f"""
[health]
min_interval = "100ms"

[[listeners]]
name = "web"
listen = "127.0.0.1:{port}"

[[listeners.routes]]
match = {{ path_prefix = "/search" }}
service = "search"
retries = {{ attempts = 2 }}

[[listeners.routes]]
match = {{ path_prefix = "/limited" }}
service = "limited"
demand = {{ rate = "2/m", burst = 2 }}

[[listeners.routes]]
match = {{ path_prefix = "/broken" }}
service = "broken"
"""
    node = NodeProcess(tmp_path, extra_config=extra).start()
    check = {"http": "/health", "interval": "500ms", "timeout": "300ms"}
    for name in ("search-1", "search-2"):
        node.register("search", name, port=backends[name].port, check=check)
    node.register("limited", "limited-1", port=backends["limited-1"].port, check=check)
    node.register("broken", "broken-1", port=dead, check=check)
    node.register("broken", "broken-2", port=dead + 0, address="127.0.0.2", check=check)
    try:
        yield node, f"http://127.0.0.1:{port}", backends
    finally:
        node.stop()
        for b in backends.values():
            b.close()


async def traffic(proxy: str) -> None:
    async with httpx.AsyncClient(base_url=proxy, timeout=10) as client:
        for _ in range(20):
            await client.get("/search/q")
        for _ in range(4):
            await client.get("/search/slow")
        for _ in range(6):
            await client.get("/limited")
        for _ in range(5):
            await client.get("/broken")


async def test_status_page_in_chromium(
    system: tuple[NodeProcess, str, dict[str, Backend]],
) -> None:
    chromium = require_tool("chromium")
    node, proxy, _ = system
    shots = output_dir("status-page")
    async with Browser(chromium) as page:
        await page.goto(node.url + "/")
        # The checks have run: search passing, broken critical with its failure as the output.
        await page.wait_for(
            "document.querySelectorAll('#services-table .badge.passing').length >= 3"
        )
        await traffic(proxy)
        # The traffic sampler runs every 2 s and the page polls every 2 s.
        await page.wait_for(
            "[...document.querySelectorAll('#routes-table tr')].some("
            "r => r.innerText.includes('limited') && r.innerText.includes('rate 4'))",
            timeout=20,
        )
        await page.wait_for(
            "[...document.querySelectorAll('#routes-table tr')].some("
            "r => r.innerText.startsWith('broken') && /\\b5\\b/.test(r.cells[5].innerText))",
            timeout=20,
        )
        await page.screenshot(shots / "1-overview.png")
        body = await page.text()
        routes = await page.text("#routes-table")

        # Per route: rate, 2xx/4xx/5xx, shed by reason, latency, charts.
        rows = {
            line.split("\t")[0].split(" ")[0]: line.split("\t")
            for line in routes.splitlines()[1:]
            if not line.startswith("\u00a0")
        }
        search = rows["search"]
        assert search[3] == "24", search  # 2xx in the last minute
        assert search[9].endswith("ms") and search[10].endswith("ms"), search  # p50, p99
        limited = rows["limited"]
        assert (limited[3], limited[4]) == ("2", "4"), limited  # 2 admitted, 4 refused (429)
        assert "rate 4" in limited[6], limited  # shed by reason
        broken = rows["broken"]
        assert broken[5] == "5", broken  # 5xx
        assert await page.evaluate("document.querySelectorAll('#routes-table svg.spark').length")
        # Endpoints under their route.
        assert "search/search-1" in routes and "search/search-2" in routes

        # A pool whose every endpoint is down is said in words, at the top.
        alerts = await page.text("#alerts")
        assert "every endpoint of broken is down" in alerts, alerts
        assert "down" in broken[1], broken

        # Instances: the last check's result, duration and age; time in state; the failure.
        services = await page.text("#services-table")
        broken_rows = [r for r in services.splitlines() if "broken-1" in r]
        assert broken_rows and "critical" in broken_rows[0], services
        assert "refused" in broken_rows[0].lower(), broken_rows
        search_rows = [r for r in services.splitlines() if "search-1" in r]
        assert " ms, " in search_rows[0] and " ago" in search_rows[0], search_rows

        # Demand: a rate-only route has no concurrency limit, said so.
        demand = await page.text("#demand-table")
        assert "4611686018427388" not in body
        assert "limited\tnone\tnone" in demand, demand
        assert "2/m" in demand

        # The nodes of the cluster (here one, on the embedded store).
        cluster = await page.text("#cluster-table")
        assert "node-1 (this node)" in cluster

        # The filter box narrows every table.
        await page.type_into("#filter", "broken")
        await asyncio.sleep(0.2)
        visible = await page.evaluate(
            "[...document.querySelectorAll('tr[data-f]')].filter(r => !r.hidden)"
            ".map(r => r.innerText.split('\\t')[0])"
        )
        assert visible and all("search" not in v and "limited" not in v for v in visible), visible
        await page.screenshot(shots / "2-filtered.png")
        assert not [c for c in page.console if "Error" in c], page.console

    # The same data as JSON, with no key that has a space.
    status = node.client.get("/v1/status").json()
    assert keys_with_spaces(status) == []
    assert {"traffic", "pools", "demand", "checks", "cluster"} <= set(status["panels"])
    json.dumps(status)
