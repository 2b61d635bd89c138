"""A real node reloads a route key by key, and each change shows in what its proxy answers.

One node runs through the whole table; each case writes the route as it was, reloads, sees the
old behaviour, writes it with one key changed, reloads, and sees the new. ``test_reload_keys.py``
checks mechanically that every key of a route reaches the part of the proxy that acts on it.
"""

from __future__ import annotations

import os
import signal
import socket
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest

from tests.backends import Backend
from tests.nodeproc import NodeProcess, free_port

DEADLINE = 30.0


def wait_for(condition: Callable[[], bool], what: str, timeout: float = DEADLINE) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"not reached in {timeout}s: {what}"
        time.sleep(0.03)


def save(path: Path, text: str) -> None:
    """Replace the file at once, as editors save: the node's file watcher never reads half."""
    fresh = path.with_suffix(".new")
    fresh.write_text(text)
    os.replace(fresh, path)


@dataclass
class Lab:
    node: NodeProcess
    proxy: httpx.Client
    port: int
    base: str
    backends: dict[str, Backend]
    dead: int

    def route(self, body: str) -> None:
        """Make ``body`` the listener's one route and wait until the node has reloaded it."""
        text = self.base + f"\n[[listeners.routes]]\n{body}\n"
        reloads = self.node.log().count("config reloaded")
        save(self.node.config_path, text)
        assert self.node.proc is not None
        self.node.proc.send_signal(signal.SIGHUP)
        wait_for(
            lambda: self.node.log().count("config reloaded") > reloads, f"reloaded with {body}"
        )

    def codes(self, n: int, path: str = "/") -> Counter[int]:
        return Counter(self.proxy.get(path).status_code for _ in range(n))

    def bodies(self, n: int, path: str = "/") -> Counter[str]:
        return Counter(self.proxy.get(path).text for _ in range(n))

    def parallel(self, n: int, path: str) -> Counter[int]:
        together = threading.Barrier(n)

        def one(_: int) -> int:
            with httpx.Client(base_url=self.proxy.base_url, timeout=10) as client:
                together.wait(DEADLINE)
                return client.get(path).status_code

        with ThreadPoolExecutor(n) as pool:
            return Counter(pool.map(one, range(n)))


@pytest.fixture(scope="module")
def lab(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Lab]:
    tmp = tmp_path_factory.mktemp("reload")
    backends = {name: Backend(name) for name in ("a", "b", "c")}
    port = free_port()
    listener = f'\n[[listeners]]\nname = "web"\nlisten = "127.0.0.1:{port}"\n'
    node = NodeProcess(tmp, extra_config=listener + '[[listeners.routes]]\nservice = "one"\n')
    node.start()
    base = node.config_path.read_text().split("[[listeners.routes]]")[0]
    with socket.socket() as s:  # a port nothing listens on
        s.bind(("127.0.0.1", 0))
        dead = s.getsockname()[1]
    node.register("one", "a", port=backends["a"].port)
    node.register("two", "b", port=backends["b"].port)
    node.register("both", "a", port=backends["a"].port)
    node.register("both", "b", port=backends["b"].port)
    proxy = httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=10)
    try:
        yield Lab(node, proxy, port, base, backends, dead)
    finally:
        proxy.close()
        node.stop()
        for b in backends.values():
            b.close()


def test_demand_rate(lab: Lab) -> None:
    lab.route('service = "one"\ndemand = { rate = "1/s", burst = 1 }')
    assert lab.codes(6)[429] >= 4
    lab.route('service = "one"\ndemand = { rate = "1000/s", burst = 1000 }')
    assert lab.codes(6) == {200: 6}


def test_demand_burst(lab: Lab) -> None:
    lab.route('service = "one"\ndemand = { rate = "1/m", burst = 1 }')
    assert lab.codes(4)[429] >= 3
    lab.route('service = "one"\ndemand = { rate = "1/m", burst = 50 }')
    assert lab.codes(6) == {200: 6}


def test_demand_concurrency_and_queue(lab: Lab) -> None:
    lab.route('service = "one"\ndemand = { rate = "1000/s", burst = 1000 }')
    assert lab.parallel(6, "/slow") == {200: 6}
    lab.route('service = "one"\ndemand = { concurrency = 1, queue = 0 }')
    assert lab.parallel(6, "/slow")[503] >= 1


def test_demand_client_rate(lab: Lab) -> None:
    lab.route('service = "one"\ndemand = { client_rate = "1/m", client_burst = 1 }')
    assert lab.codes(4)[429] >= 3
    lab.route('service = "one"\ndemand = { client_rate = "1000/s", client_burst = 1000 }')
    assert lab.codes(6) == {200: 6}


def test_demand_client_key(lab: Lab) -> None:
    lab.route('service = "one"\ndemand = { client_rate = "1/m", client_burst = 1 }')
    keyed = [lab.proxy.get("/", headers={"x-api-key": str(n)}).status_code for n in range(4)]
    assert keyed.count(429) >= 3  # one bucket for the one client address
    lab.route(
        'service = "one"\n'
        'demand = { client_rate = "1/m", client_burst = 1, client_key = "header:x-api-key" }'
    )
    keyed = [lab.proxy.get("/", headers={"x-api-key": f"k{n}"}).status_code for n in range(4)]
    assert keyed == [200] * 4  # a bucket per key


def test_match(lab: Lab) -> None:
    lab.route('service = "one"\nmatch = { path_prefix = "/old" }')
    assert lab.proxy.get("/new").status_code == 404
    lab.route('service = "one"\nmatch = { path_prefix = "/new" }')
    assert lab.proxy.get("/new").status_code == 200


def test_service(lab: Lab) -> None:
    lab.route('service = "one"')
    assert lab.bodies(3) == {"a": 3}
    lab.route('service = "two"')
    assert lab.bodies(3) == {"b": 3}


def test_servers(lab: Lab) -> None:
    lab.route(f'servers = ["127.0.0.1:{lab.backends["a"].port}"]')
    assert lab.bodies(3) == {"a": 3}
    lab.route(f'servers = ["127.0.0.1:{lab.backends["c"].port}"]')
    assert lab.bodies(3) == {"c": 3}


def test_name(lab: Lab) -> None:
    lab.route('service = "one"\nname = "first-name"')
    lab.proxy.get("/")
    lab.route('service = "one"\nname = "second-name"')
    lab.proxy.get("/")
    metrics = lab.node.client.get("/metrics").text
    assert 'route="second-name"' in metrics


def test_balance(lab: Lab) -> None:
    lab.route('service = "both"\nbalance = "round_robin"')
    assert set(lab.bodies(6)) == {"a", "b"}
    lab.route('service = "both"\nbalance = "ring_hash"')
    assert len(lab.bodies(6)) == 1  # one client address, one endpoint


def test_hash_on(lab: Lab) -> None:
    lab.route('service = "both"\nbalance = "ring_hash"')
    seen = {lab.proxy.get("/", headers={"x-user": f"u{n}"}).text for n in range(20)}
    assert len(seen) == 1
    lab.route('service = "both"\nbalance = "ring_hash"\nhash_on = "header:x-user"')
    seen = {lab.proxy.get("/", headers={"x-user": f"u{n}"}).text for n in range(20)}
    assert seen == {"a", "b"}


def test_sticky(lab: Lab) -> None:
    lab.route('service = "both"')
    assert "set-cookie" not in lab.proxy.get("/").headers
    lab.route('service = "both"\nsticky = { cookie = "ik_route" }')
    assert lab.proxy.get("/").headers["set-cookie"].startswith("ik_route=")
    lab.proxy.cookies.clear()


def test_retries(lab: Lab) -> None:
    servers = f'servers = ["127.0.0.1:{lab.dead}", "127.0.0.1:{lab.backends["a"].port}"]'
    lab.route(f"{servers}\nretries = {{ attempts = 0 }}\noutlier = {{ enabled = false }}")
    assert lab.codes(6)[502] >= 2
    lab.route(f"{servers}\nretries = {{ attempts = 2 }}\noutlier = {{ enabled = false }}")
    assert lab.codes(6) == {200: 6}


def test_retry_budget(lab: Lab) -> None:
    servers = f'servers = ["127.0.0.1:{lab.dead}", "127.0.0.1:{lab.backends["a"].port}"]'
    off = "outlier = { enabled = false }"
    lab.route(f"{servers}\nretries = {{ attempts = 2, budget = 0.0, min = 0 }}\n{off}")
    assert lab.codes(6)[502] >= 2
    lab.route(f"{servers}\nretries = {{ attempts = 2, budget = 0.0, min = 100 }}\n{off}")
    assert lab.codes(6) == {200: 6}


def test_timeout(lab: Lab) -> None:
    lab.route('service = "one"\ntimeout = "5s"')
    assert lab.proxy.get("/slow").status_code == 200
    lab.route('service = "one"\ntimeout = "20ms"')
    r = lab.proxy.get("/slow")
    assert r.status_code == 504 and r.headers["x-interknit-reason"] == "timeout"


def test_response_timeout(lab: Lab) -> None:
    lab.route('service = "one"\nresponse_timeout = "5s"')
    assert lab.proxy.get("/slow").status_code == 200
    lab.route('service = "one"\nresponse_timeout = "20ms"')
    r = lab.proxy.get("/slow")
    assert r.status_code == 504 and r.headers["x-interknit-reason"] == "response-timeout"


def test_outlier(lab: Lab) -> None:
    servers = f'servers = ["127.0.0.1:{lab.dead}", "127.0.0.1:{lab.backends["a"].port}"]'
    lab.route(f"{servers}\nretries = {{ attempts = 0 }}\noutlier = {{ enabled = false }}")
    lab.codes(4)
    assert lab.codes(6)[502] >= 2  # never ejected
    lab.route(f"{servers}\nretries = {{ attempts = 0 }}\noutlier = {{ consecutive_failures = 1 }}")
    lab.codes(4)  # the dead server fails once and is ejected
    assert lab.codes(6) == {200: 6}


def test_panic_threshold(lab: Lab) -> None:
    # "three": a passing instance and one whose TTL ran out (critical, yet it answers).
    lab.node.register("three", "a", port=lab.backends["a"].port)
    lab.node.register("three", "c", port=lab.backends["c"].port, check={"ttl": "1s"})
    wait_for(
        lambda: any(
            i["health"] == "critical"
            for i in lab.node.client.get("/v1/services/three").json()["instances"]
        ),
        "c critical",
    )
    lab.route('service = "three"\npanic_threshold = 0.5')
    assert lab.bodies(6) == {"a": 6}  # one of two usable: not below half
    lab.route('service = "three"\npanic_threshold = 1.0')
    assert set(lab.bodies(6)) == {"a", "c"}  # in panic: over every endpoint


def test_saving_the_file_reloads_too(lab: Lab) -> None:
    lab.route('service = "one"')
    reloads = lab.node.log().count("config reloaded")
    save(
        lab.node.config_path,
        lab.base + '\n[[listeners.routes]]\nservice = "one"\ndemand = { rate = "1/m" }\n',
    )
    wait_for(lambda: lab.node.log().count("config reloaded") > reloads, "reloaded on save")
    assert lab.codes(4)[429] >= 3
