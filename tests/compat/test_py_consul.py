"""py-consul (the maintained Python Consul client, from PyPI) against a real node."""

from __future__ import annotations

import concurrent.futures
import time

import consul

from tests.nodeproc import NodeProcess


def test_register_ttl_pass_and_blocking_health(node: NodeProcess) -> None:
    c = consul.Consul(host="127.0.0.1", port=node.api_port)
    assert c.agent.self()["Config"]["Datacenter"] == "dc1"
    for sid, port, tags in (("py-1", 9601, ["blue", "v1"]), ("py-2", 9602, ["green", "v1"])):
        assert c.agent.service.register(
            "pyapp", service_id=sid, address="127.0.0.1", port=port, tags=tags,
            check=consul.Check.ttl("30s"),
        )  # fmt: skip
    # TTL checks start critical, as in Consul.
    index, nodes = c.health.service("pyapp", passing=True)
    assert nodes == [] and int(index) > 0
    assert c.agent.check.ttl_pass("service:py-1")
    index, nodes = c.health.service("pyapp", passing=True)
    assert [n["Service"]["ID"] for n in nodes] == ["py-1"]
    index, nodes = c.health.service("pyapp", tag=["v1", "green"])
    assert [n["Service"]["ID"] for n in nodes] == ["py-2"]

    # A blocking query at that index returns when py-2 passes, with a higher index.
    _, nodes = c.health.service("pyapp", passing=True)
    index, _ = c.health.service("pyapp", passing=True)
    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        started = time.monotonic()
        blocked = pool.submit(c.health.service, "pyapp", index=index, wait="30s", passing=True)
        time.sleep(0.3)
        assert not blocked.done()
        assert c.agent.check.ttl_pass("service:py-2")
        new_index, nodes = blocked.result(timeout=30)
    assert int(new_index) > int(index) and time.monotonic() - started < 25
    assert sorted(n["Service"]["ID"] for n in nodes) == ["py-1", "py-2"]

    assert c.agent.check.ttl_fail("service:py-2", notes="broken")
    _, nodes = c.health.service("pyapp", passing=True)
    assert [n["Service"]["ID"] for n in nodes] == ["py-1"]
    assert set(c.agent.services()) >= {"py-1", "py-2"}
    assert c.catalog.services()[1]["pyapp"] == ["blue", "green", "v1"]
    assert c.agent.service.deregister("py-2")
    _, rows = c.catalog.service("pyapp")
    assert [r["ServiceID"] for r in rows] == ["py-1"]
