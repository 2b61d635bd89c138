"""An instance that has never passed shows why at its first check, through the real node."""

from __future__ import annotations

import socket
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from interknit.registry.model import Check, InstanceSpec
from interknit.registry.state import NEVER_CHECKED_OUTPUT, RegistryState
from tests.backends import Backend
from tests.nodeproc import NodeProcess


def test_the_first_failure_replaces_the_never_checked_output() -> None:
    state = RegistryState()
    spec = InstanceSpec(address="127.0.0.1", port=1, check=Check(http="/health"))
    state.register("web", "a", spec, now=0.0)
    assert state.get("web", "a").output == NEVER_CHECKED_OUTPUT  # type: ignore[union-attr]
    events = state.set_check_status("web", "a", "critical", "connection refused", 1.0)
    assert [e.instance.output for e in events] == ["connection refused"]
    # Later failures with the status unchanged write nothing (a failing fleet stays quiet).
    assert state.set_check_status("web", "a", "critical", "HTTP 500", 2.0) == []


@pytest.fixture
def node(tmp_path: Path) -> Iterator[NodeProcess]:
    # The operator lowers the floor on check intervals (1 s) for checks every 200 ms.
    node = NodeProcess(tmp_path, extra_config='[health]\nmin_interval = "100ms"\n').start()
    yield node
    node.stop()


def output_of(node: NodeProcess, iid: str) -> str:
    instance = node.client.get(f"/v1/services/web/instances/{iid}").json()
    return str(instance["output"])


def wait_output(node: NodeProcess, iid: str, timeout: float = 20.0) -> str:
    """The output once it is no longer the never-checked one (checks run every 200 ms)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        output = output_of(node, iid)
        if output != NEVER_CHECKED_OUTPUT:
            return output
        time.sleep(0.05)
    raise AssertionError(f"{iid}: still {NEVER_CHECKED_OUTPUT!r} after {timeout}s")


def test_never_passed_instances_show_their_failure(node: NodeProcess) -> None:
    with socket.socket() as closed:
        closed.bind(("127.0.0.1", 0))
        refused_port = closed.getsockname()[1]
    failing = Backend("failing")
    failing.status = 500
    silent = socket.socket()  # accepts, never answers: the check times out
    silent.bind(("127.0.0.1", 0))
    silent.listen(16)
    try:
        check = {"http": "/health", "interval": "200ms", "timeout": "300ms"}
        node.register("web", "refused", port=refused_port, check=check)
        node.register("web", "http500", port=failing.port, check=check)
        node.register("web", "silent", port=silent.getsockname()[1], check=check)
        assert "refused" in wait_output(node, "refused").lower()
        assert ": 500" in wait_output(node, "http500")
        assert "timed out after 0.3s" in wait_output(node, "silent")
        health = {
            i["id"]: i["health"] for i in node.client.get("/v1/services/web").json()["instances"]
        }
        assert health == {"refused": "critical", "http500": "critical", "silent": "critical"}
    finally:
        silent.close()
        failing.close()
