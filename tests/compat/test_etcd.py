"""The Consul API of a node on etcd: owners as Consul nodes, and what a client is told when the
node serves from its copy because etcd is away."""

from __future__ import annotations

from pathlib import Path

from tests.etcd.cluster import EtcdCluster
from tests.nodeproc import NodeProcess, wait_for


def test_stale_copy_is_served_and_said_so(tmp_path: Path) -> None:
    cluster = EtcdCluster(tmp_path / "etcd", 1).start()
    node = None
    try:
        endpoints = ", ".join(f'"{e}"' for e in cluster.endpoints)
        registry = f'backend = "etcd"\netcd = [{endpoints}]\nnode_ttl = "3s"\netcd_timeout = "1s"'
        node = NodeProcess(tmp_path, name="edge-1", registry_config=registry).start()
        body = {"Name": "kv", "ID": "kv-1", "Port": 9100, "Check": {"TTL": "30s"}}
        assert node.client.put("/v1/agent/service/register", json=body).status_code == 200
        [entry] = node.client.get("/v1/health/service/kv").json()
        assert entry["Node"]["Node"] == "edge-1"  # the owning node
        statuses = {c["CheckID"]: c["Status"] for c in entry["Checks"]}
        assert statuses["service:kv-1"] == "critical"  # as Consul starts a TTL check
        assert node.client.put("/v1/agent/check/pass/service:kv-1").status_code == 200
        assert "kv-1" in node.client.get("/v1/agent/services").json()
        live = node.client.get("/v1/health/service/kv?passing")
        assert live.headers["X-Consul-KnownLeader"] == "true" and len(live.json()) == 1

        cluster.kill_all()

        def stale() -> bool:
            r = node.client.get("/v1/health/service/kv")
            return r.headers["X-Consul-KnownLeader"] == "false"

        wait_for(stale, timeout=20)
        wait_for(
            lambda: int(node.client.get("/v1/catalog/services").headers["X-Consul-LastContact"]) > 0
        )
        r = node.client.get("/v1/health/service/kv?stale")
        assert r.status_code == 200 and r.json()[0]["Service"]["ID"] == "kv-1"
        assert r.headers["X-Consul-Effective-Consistency"] == "stale"
        assert node.client.get("/v1/health/service/kv?consistent").status_code == 503
        assert node.client.get("/v1/status/leader").json() == ""

        cluster.restart_all()
        wait_for(lambda: not stale(), timeout=30)
    finally:
        if node is not None:
            node.stop()
        cluster.stop()
