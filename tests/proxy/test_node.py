"""The proxy inside the real node: pools follow the registry through its events."""

from __future__ import annotations

import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator
from pathlib import Path

import httpx
import pytest

from tests.backends import Backend
from tests.nodeproc import NodeProcess, free_port

# Nothing here sleeps a fixed time for the node (or a worker) to get somewhere: each test waits
# for what it needs to see, with a deadline generous enough for a loaded machine.
DEADLINE = 30.0


def wait_for(condition: Callable[[], bool], what: str, timeout: float = DEADLINE) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"not reached in {timeout}s: {what}"
        time.sleep(0.05)


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
        assert {row["route"] for row in status["panels"]["pools"]} >= {"search"}
        assert "proxy.web" in status["node"]["listen"]
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
            started = time.monotonic()
            answers = [proxy.get("/limited") for _ in range(30)]
            elapsed = time.monotonic() - started
            codes = Counter(r.status_code for r in answers)
            # The burst, then 5/s for as long as the requests took (however slow the machine).
            assert codes[200] + codes[429] == 30
            assert 5 <= codes[200] <= 5 + 5 * elapsed + 1, (codes, elapsed)
            # A token may refill between requests on a slow machine; every refusal says when.
            refused = [r for r in answers if r.status_code == 429]
            assert all(int(r.headers["retry-after"]) >= 1 for r in refused)
        assert node.client.get("/v1/health").status_code == 200  # 429s are not overload
        results: list[int] = []
        together = threading.Barrier(8)

        def hit() -> None:
            with httpx.Client(base_url=url, timeout=10) as c:
                together.wait(DEADLINE)  # all eight at once, however slowly threads start
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
        rows = node.client.get("/v1/status").json()["panels"]["demand"]
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
            wait_for(lambda: "config reload refused" in node.log(), "the bad config refused")
            assert proxy.get("/").text == "one"
            node.config_path.write_text(text.replace(listeners(one), listeners(two)))
            node.proc.send_signal(signal.SIGHUP)
            wait_for(lambda: proxy.get("/").text == "two", "the new route in use")
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

        wait_for(lambda: bool(workers()), "the worker process started")
        assert len(workers()) == 1  # the node itself is the other worker
        node.register("app", "one", port=one.port)
        node.register("app", "two", port=two.port)
        # The worker hears of both through the node's watch stream. New connections are spread
        # by the kernel over both processes: twenty answered in a row means both know.
        streak = 0

        def both_processes_answer() -> bool:
            nonlocal streak
            with httpx.Client(timeout=5) as c:
                ok = c.get(f"http://127.0.0.1:{port}/").status_code == 200
            streak = streak + 1 if ok else 0
            return streak >= 20

        wait_for(both_processes_answer, "twenty new connections answered in a row")
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
