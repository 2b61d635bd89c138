"""DNS served by the real node, following registrations through the registry's events."""

from __future__ import annotations

import subprocess
import time
from pathlib import Path

import dns.message
import dns.query
import dns.rcode
import dns.rdatatype

from tests.conftest import require_tool
from tests.nodeproc import NodeProcess


def ask(node: NodeProcess, name: str, rdtype: str = "A") -> dns.message.Message:
    query = dns.message.make_query(name, rdtype)
    return dns.query.udp(query, "127.0.0.1", port=node.dns_port, timeout=2)


def addresses(msg: dns.message.Message) -> set[str]:
    return {rr.address for rrset in msg.answer for rr in rrset if hasattr(rr, "address")}


def test_node_answers_dns_from_the_registry(tmp_path: Path) -> None:
    node = NodeProcess(tmp_path).start()
    try:
        assert ask(node, "web.ik.internal.").rcode() == dns.rcode.NXDOMAIN
        node.register("web", "a", address="10.0.0.1", port=80, tags=["eu"])
        node.register("web", "b", address="10.0.0.2", port=81)
        assert addresses(ask(node, "web.ik.internal.")) == {"10.0.0.1", "10.0.0.2"}
        assert addresses(ask(node, "eu.web.ik.internal.")) == {"10.0.0.1"}
        srv = ask(node, "_web._tcp.ik.internal.", "SRV")
        assert sorted(rr.port for rrset in srv.answer for rr in rrset) == [80, 81]
        # A drained instance leaves the answers within one event.
        node.client.put("/v1/services/web/instances/b/health", json={"status": "draining"})
        assert addresses(ask(node, "web.ik.internal.")) == {"10.0.0.1"}
        node.client.delete("/v1/services/web/instances/a")
        empty = ask(node, "web.ik.internal.")
        assert empty.rcode() == dns.rcode.NOERROR and not empty.answer
        assert ask(node, "example.com.").rcode() == dns.rcode.REFUSED
        dig = require_tool("dig")
        out = subprocess.run(
            [dig, "+short", "-p", str(node.dns_port), "@127.0.0.1", "ik.internal.", "SOA"],
            capture_output=True,
            text=True,
            timeout=10,
        ).stdout
        assert out.split()[2] == str(node.client.get("/v1/services").json()["revision"])
        status = node.client.get("/v1/status").json()
        assert "dns" in status["panels"]
        assert "dns" in status["node"]["listen"]
        metrics = node.client.get("/metrics").text
        assert "interknit_dns_queries_total" in metrics
    finally:
        node.stop()


def test_restart_serves_dns_from_the_store(tmp_path: Path) -> None:
    node = NodeProcess(tmp_path).start()
    try:
        node.register("api", "a", address="10.0.0.9", port=80)
        node.terminate()
        node.start()
        deadline = time.monotonic() + 5
        while time.monotonic() < deadline:
            if addresses(ask(node, "api.ik.internal.")) == {"10.0.0.9"}:
                break
            time.sleep(0.05)
        assert addresses(ask(node, "api.ik.internal.")) == {"10.0.0.9"}
    finally:
        node.stop()


def test_node_answers_global_names_with_declared_gateways(tmp_path: Path) -> None:
    config = """
[dns.regions]
"127.0.0.0/8" = "eu"
[dns.gslb]
fallback = { eu = ["us"] }
[dns.gateways.web]
eu = ["192.0.2.10"]
us = ["198.51.100.10"]
"""
    node = NodeProcess(tmp_path, extra_config=config).start()
    try:
        node.register("web", "e1", address="10.1.0.1", port=80, region="eu")
        node.register("web", "u1", address="10.2.0.1", port=80, region="us")
        # The client (loopback) is in eu, and eu has a healthy instance: eu's VIP.
        assert addresses(ask(node, "web.global.ik.internal.")) == {"192.0.2.10"}
        assert addresses(ask(node, "web.ik.internal.")) == {"10.1.0.1", "10.2.0.1"}
        node.client.put("/v1/services/web/instances/e1/health", json={"status": "draining"})
        assert addresses(ask(node, "web.global.ik.internal.")) == {"198.51.100.10"}
    finally:
        node.stop()
