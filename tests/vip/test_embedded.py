"""One node on the embedded store, in a namespace: it holds every VIP, shows them in its
registry, and takes them down when it stops, or through its guard when it is killed."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import pytest

from tests.conftest import STRICT, require_tool
from tests.nodeproc import INTERKNIT
from tests.vip.lab import VIPS, AddressLog, Lab, Traffic, VipNode, http_get


def wait(what: object, timeout: float = 15.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if what():  # type: ignore[operator]
            return
        time.sleep(0.05)
    raise AssertionError("not reached in time")


def test_one_embedded_node_holds_everything(tmp_path: Path) -> None:
    require_tool("ip")
    if os.geteuid() != 0:
        if STRICT:
            pytest.fail("network namespaces need root")
        pytest.skip("network namespaces need root")
    lab = Lab(nodes=1).open()
    log = traffic = None
    try:
        log = AddressLog(lab).start()
        traffic = Traffic(lab).start()
        addresses = ", ".join(f'"{v}"' for v in VIPS)
        config = f"""
[node]
name = "n1"
data_dir = "{tmp_path / "n1-data"}"

[dns]
enabled = false

[vip]
addresses = [{addresses}]
interface = "eth0"
"""
        node = VipNode(lab, "n1", tmp_path, config, INTERKNIT).start()

        def all_here() -> bool:
            owners = traffic.owners(time.monotonic() - 0.1)  # type: ignore[union-attr]
            return all(owners[v] == "n1" for v in VIPS)

        wait(all_here)
        assert log.holders() == {v: {"n1"} for v in VIPS}
        _, body = http_get(lab.ns("n1"), 7470, "/v1/services/vip-addresses")
        assert sorted(i["address"] for i in json.loads(body)["instances"]) == sorted(VIPS)
        # Killed: the guard takes the addresses down.
        node.kill9()
        wait(lambda: all(not h for h in log.holders().values()), timeout=5)  # type: ignore[union-attr]
        # Back: it holds them all again (its records were still there).
        node.start()
        wait(all_here)
        # Stopped: it removes them itself and says so to the guard.
        assert node.terminate() == 0
        assert all(not h for h in log.holders().values())
        assert "vip.released" in node.log() and not log.violations
    finally:
        for part in (traffic, log):
            if part is not None:
                part.stop()
        lab.close()
