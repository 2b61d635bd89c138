"""The proxy inside the real node: pools follow the registry through its events."""

from __future__ import annotations

import threading
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from tests.backends import Backend
from tests.nodeproc import NodeProcess, free_port


@pytest.fixture
def backends() -> Iterator[list[Backend]]:
    made = [Backend(f"b{i}") for i in range(3)]
    yield made
    for b in made:
        b.close()


def test_routes_follow_the_registry(tmp_path: Path, backends: list[Backend]) -> None:
    port = free_port()
    static = backends[2]
    extra = f"""
[[listeners]]
name = "web"
listen = "127.0.0.1:{port}"

[[listeners.routes]]
match = {{ path_prefix = "/search" }}
service = "search"
balance = "round_robin"

[[listeners.routes]]
match = {{ path_prefix = "/static" }}
servers = ["127.0.0.1:{static.port}"]
"""
    node = NodeProcess(tmp_path, extra_config=extra).start()
    proxy = httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=10)
    try:
        r = proxy.get("/search")
        assert r.status_code == 503
        assert r.headers["x-interknit-reason"] and "retry-after" in r.headers
        node.register("search", "b0", port=backends[0].port)
        node.register("search", "b1", port=backends[1].port)
        seen = Counter(proxy.get("/search").text for _ in range(20))
        assert seen == Counter({"b0": 10, "b1": 10})
        node.client.put("/v1/services/search/instances/b1/health", json={"status": "draining"})
        assert {proxy.get("/search").text for _ in range(6)} == {"b0"}
        assert proxy.get("/static/x").text == "b2"
        r = proxy.get("/elsewhere")
        assert r.status_code == 404
        node.client.delete("/v1/services/search/instances/b0")
        assert proxy.get("/search").status_code == 503
        status = node.client.get("/v1/status").json()
        assert {row["route"] for row in status["panels"]["Proxy"]} >= {"search"}
        assert "proxy web" in status["node"]["listen"]
        assert "interknit_proxy_requests_total" in node.client.get("/metrics").text
    finally:
        proxy.close()
        node.stop()


def test_overloaded_route_sheds_and_health_reports_it(tmp_path: Path) -> None:
    port = free_port()
    extra = f"""
[[listeners]]
name = "web"
listen = "127.0.0.1:{port}"

[[listeners.routes]]
match = {{ path_prefix = "/limited" }}
service = "api"
demand = {{ rate = "5/s", burst = 5 }}

[[listeners.routes]]
service = "api"
demand = {{ concurrency = 1, queue = 0 }}
"""
    b = Backend("api")
    node = NodeProcess(tmp_path, extra_config=extra).start()
    try:
        node.register("api", "a", port=b.port)
        url = f"http://127.0.0.1:{port}"
        with httpx.Client(base_url=url, timeout=10) as proxy:
            answers = [proxy.get("/limited") for _ in range(30)]
            codes = Counter(r.status_code for r in answers)
            assert codes[200] >= 5 and codes[429] >= 10
            # A token may refill between requests on a slow machine; every refusal says when.
            refused = [r for r in answers if r.status_code == 429]
            assert all(int(r.headers["retry-after"]) >= 1 for r in refused)
        assert node.client.get("/v1/health").status_code == 200  # 429s are not overload
        results: list[int] = []

        def hit() -> None:
            with httpx.Client(base_url=url, timeout=10) as c:
                for _ in range(5):
                    results.append(c.get("/slow").status_code)

        threads = [threading.Thread(target=hit) for _ in range(8)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        shed = Counter(results)
        assert shed[503] > shed[200] > 0
        health = node.client.get("/v1/health")
        assert health.status_code == 503 and health.json()["status"] == "overloaded"
        rows = node.client.get("/v1/status").json()["panels"]["Demand"]
        assert any(row["limit"] == 1 for row in rows)
    finally:
        node.stop()
        b.close()


def test_sighup_reloads_routes_without_dropping_connections(tmp_path: Path) -> None:
    import signal

    one, two = Backend("one"), Backend("two")
    port = free_port()

    def listeners(target: Backend, extra_route: str = "") -> str:
        return f"""
[[listeners]]
name = "web"
listen = "127.0.0.1:{port}"

[[listeners.routes]]
servers = ["127.0.0.1:{target.port}"]
{extra_route}
"""

    node = NodeProcess(tmp_path, extra_config=listeners(one)).start()
    text = node.config_path.read_text()
    try:
        with httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=10) as proxy:
            assert proxy.get("/").text == "one"
            # A bad config is refused and changes nothing.
            node.config_path.write_text(text + "\n[[listeners]]\nname = 'x'\n")
            assert node.proc is not None
            node.proc.send_signal(signal.SIGHUP)
            time.sleep(0.5)
            assert proxy.get("/").text == "one"
            assert "config reload refused" in node.log()
            node.config_path.write_text(text.replace(listeners(one), listeners(two)))
            node.proc.send_signal(signal.SIGHUP)
            deadline = time.monotonic() + 5
            while proxy.get("/").text != "two" and time.monotonic() < deadline:
                time.sleep(0.05)
            # The same keep-alive connection, now routed by the new config.
            assert proxy.get("/").text == "two"
            assert proxy.get("/").headers.get("connection") != "close"
        assert "config reloaded" in node.log()
    finally:
        node.stop()
        one.close()
        two.close()


def test_workers_share_the_listener_and_follow_the_registry(tmp_path: Path) -> None:
    import subprocess

    one, two = Backend("one"), Backend("two")
    port = free_port()
    extra = f"""
[[listeners]]
name = "web"
listen = "127.0.0.1:{port}"

[[listeners.routes]]
service = "app"
"""
    node = NodeProcess(tmp_path, extra_config=extra).start(args=("--workers", "2"))
    try:

        def workers() -> list[str]:
            out = subprocess.run(
                ["pgrep", "-f", f"worker -c {node.config_path}"], capture_output=True, text=True
            ).stdout
            return out.split()

        deadline = time.monotonic() + 10
        while not workers() and time.monotonic() < deadline:
            time.sleep(0.05)
        assert len(workers()) == 1  # the node itself is the other worker
        node.register("app", "one", port=one.port)
        node.register("app", "two", port=two.port)
        time.sleep(0.5)  # the worker hears of both through the node's watch stream
        seen: Counter[str] = Counter()
        for _ in range(40):  # a new connection each time: the kernel spreads them
            with httpx.Client(timeout=5) as c:
                r = c.get(f"http://127.0.0.1:{port}/")
                assert r.status_code == 200
                seen[r.text] += 1
        assert set(seen) == {"one", "two"}
        assert node.terminate() == 0
        assert not workers()
    finally:
        node.stop()
        one.close()
        two.close()
