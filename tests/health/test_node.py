"""Active and passive health checks inside the real node, seen through the registry."""

from __future__ import annotations

import json
import threading
import time
from pathlib import Path
from typing import Any

import httpx

from tests.backends import Backend
from tests.nodeproc import NodeProcess, free_port, wait_for

# The operator lowers the node's floor (1 s) so that checks every 100 ms are taken.
FAST_CHECKS = '[health]\nmin_interval = "100ms"\n'
CHECK = {"http": "/health", "interval": "100ms", "timeout": "300ms", "rise": 2, "fall": 2}


def health(node: NodeProcess, iid: str) -> str:
    inst = node.client.get(f"/v1/services/web/instances/{iid}").json()
    return str(inst["health"])


def test_transitions_reach_the_registry_and_steady_results_write_nothing(tmp_path: Path) -> None:
    backend = Backend("a")
    node = NodeProcess(tmp_path, extra_config=FAST_CHECKS).start()
    events: list[tuple[str, str]] = []
    stop = threading.Event()

    def watch() -> None:
        with (
            httpx.Client(base_url=node.url, timeout=30) as c,
            c.stream("GET", "/v1/watch?service=web&since=0") as r,
        ):
            for line in r.iter_lines():
                if line.startswith("data: "):
                    data: dict[str, Any] = json.loads(line[6:])
                    if "instance" in data:
                        events.append((data["reason"], data["instance"]["health"]))
                if stop.is_set():
                    return

    watcher = threading.Thread(target=watch, daemon=True)
    watcher.start()
    try:
        r = node.register("web", "a", port=backend.port, check=CHECK)
        assert r.json()["health"] == "critical"  # not seen working yet
        wait_for(lambda: health(node, "a") == "passing")
        # Steady passing results: no writes, the revision stands still.
        rev = node.client.get("/v1/services").json()["revision"]
        time.sleep(0.6)
        assert node.client.get("/v1/services").json()["revision"] == rev
        backend.status = 429
        wait_for(lambda: health(node, "a") == "warning")
        backend.status = 500
        wait_for(lambda: health(node, "a") == "critical")
        inst = node.client.get("/v1/services/web/instances/a").json()
        assert "500" in inst["output"]
        backend.status = 200
        wait_for(lambda: health(node, "a") == "passing")
        backend.hang = True  # longer than the timeout
        wait_for(lambda: health(node, "a") == "critical")
        backend.hang = False
        wait_for(lambda: health(node, "a") == "passing")
        time.sleep(0.3)
        assert [h for _, h in events] == [
            "critical",
            "passing",
            "warning",
            "critical",
            "passing",
            "critical",
            "passing",
        ]
        metrics = node.client.get("/metrics").text
        assert "interknit_health_checks_total" in metrics
        assert "interknit_health_transitions_total" in metrics
    finally:
        stop.set()
        node.stop()
        backend.close()


def test_restart_keeps_last_known_health(tmp_path: Path) -> None:
    backend = Backend("a")
    node = NodeProcess(tmp_path, extra_config=FAST_CHECKS).start()
    try:
        node.register("web", "a", port=backend.port, check=CHECK)
        wait_for(lambda: health(node, "a") == "passing")
        node.terminate()
        node.start()
        # Passing from the store at once; no new write while it keeps passing.
        assert health(node, "a") == "passing"
        rev = node.client.get("/v1/services").json()["revision"]
        time.sleep(0.5)
        assert node.client.get("/v1/services").json()["revision"] == rev
    finally:
        node.stop()
        backend.close()


def test_passive_outlier_detection_ejects_and_returns(tmp_path: Path) -> None:
    good, bad = Backend("good"), Backend("bad")
    port = free_port()
    extra = f"""
[[listeners]]
name = "web"
listen = "127.0.0.1:{port}"

[[listeners.routes]]
service = "web"
retries = {{ attempts = 0 }}
outlier = {{ consecutive_failures = 3, base_ejection_time = "1s", max_ejection_percent = 50 }}
"""
    node = NodeProcess(tmp_path, extra_config=extra).start()
    try:
        node.register("web", "good", port=good.port)
        node.register("web", "bad", port=bad.port)
        bad.status = 503
        with httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=10) as proxy:
            codes = [proxy.get("/").status_code for _ in range(12)]
            assert codes.count(503) == 3  # three failures, then bad is out of rotation
            inst = node.client.get("/v1/services/web/instances/bad").json()
            assert inst["ejected_until"] is not None and inst["ejected_until"] > time.time()
            assert {proxy.get("/").text for _ in range(6)} == {"good"}
            bad.status = 200
            wait_for(
                lambda: (
                    node.client.get("/v1/services/web/instances/bad").json()["ejected_until"]
                    is None
                ),
                timeout=5,
            )
            assert {proxy.get("/").text for _ in range(6)} == {"good", "bad"}
        assert "interknit_proxy_ejections_total" in node.client.get("/metrics").text
    finally:
        node.stop()
        good.close()
        bad.close()
