"""Static instances belong to the config that lists them: marked so, and removed (no longer
registered, no longer checked) when the config stops listing them, by reload or restart."""

from __future__ import annotations

import signal
import time
from pathlib import Path

import httpx

from tests.backends import Backend
from tests.nodeproc import NodeProcess


def services(*ports: int) -> str:
    listed = ", ".join(f'"127.0.0.1:{p}"' for p in ports)
    # The operator lowers the floor on check intervals (1 s) for checks every 200 ms.
    return (
        '\n[health]\nmin_interval = "100ms"\n'
        f'\n[[services]]\nname = "search"\ninstances = [{listed}]\n'
        'check = { http = "/health", interval = "200ms" }\n'
    )


def ids(node: NodeProcess) -> set[str]:
    return {i["id"] for i in node.client.get("/v1/services/search").json()["instances"]}


def wait_ids(node: NodeProcess, expected: set[str], timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while ids(node) != expected:
        assert time.monotonic() < deadline, f"{ids(node)} != {expected}\n{node.log()}"
        time.sleep(0.05)


def test_config_owned_instances_follow_the_config(tmp_path: Path) -> None:
    a, b = Backend("a"), Backend("b")
    ida, idb = f"127-0-0-1-{a.port}", f"127-0-0-1-{b.port}"
    node = NodeProcess(tmp_path, extra_config=services(a.port, b.port)).start()
    try:
        wait_ids(node, {ida, idb})
        instance = node.client.get(f"/v1/services/search/instances/{ida}").json()
        assert instance["meta"] == {"owner": "config"}
        # One registered by hand in the same service is not the config's.
        node.register("search", "by-hand", port=a.port)
        text = node.config_path.read_text()
        node.config_path.write_text(text.replace(services(a.port, b.port), services(a.port)))
        assert node.proc is not None
        node.proc.send_signal(signal.SIGHUP)
        wait_ids(node, {ida, "by-hand"})
        deadline = time.monotonic() + 10
        while "static instance removed" not in node.log():
            assert time.monotonic() < deadline, node.log()
            time.sleep(0.05)
        # No longer checked: b's hits stop growing.
        before = b.hits
        time.sleep(0.6)
        assert b.hits == before
        # Through a restart too: the config lists none now.
        node.stop()
        node.config_path.write_text(text.replace(services(a.port, b.port), ""))
        node.client = httpx.Client(base_url=node.url, timeout=10)
        node.start()
        wait_ids(node, {"by-hand"})
    finally:
        node.stop()
        a.close()
        b.close()
