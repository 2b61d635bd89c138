"""Two real ``interknit up`` processes sharing an etcd cluster: one truth, and staying
available from their copies when etcd goes away."""

from __future__ import annotations

from pathlib import Path

import dns.message
import dns.query
import httpx

from tests.backends import Backend
from tests.etcd.cluster import EtcdCluster
from tests.nodeproc import NodeProcess, free_port, wait_for


def etcd_node(tmp_path: Path, cluster: EtcdCluster, name: str, extra: str = "") -> NodeProcess:
    endpoints = ", ".join(f'"{e}"' for e in cluster.endpoints)
    registry = f'backend = "etcd"\netcd = [{endpoints}]\nnode_ttl = "3s"\netcd_timeout = "1s"'
    return NodeProcess(tmp_path, extra, name=name, registry_config=registry).start()


def dns_answers(node: NodeProcess, name: str) -> set[str]:
    query = dns.message.make_query(name, "A")
    reply = dns.query.udp(query, "127.0.0.1", port=node.dns_port, timeout=2)
    return {rr.address for rrset in reply.answer for rr in rrset}


def test_two_nodes_one_truth_and_stale_serving(tmp_path: Path) -> None:
    cluster = EtcdCluster(tmp_path / "etcd", 3).start()
    backend = Backend("app-1")
    port = free_port()
    listener = f"""
[[listeners]]
name = "web"
listen = "127.0.0.1:{port}"

[[listeners.routes]]
service = "app"
"""
    a = etcd_node(tmp_path, cluster, "node-a")
    b = etcd_node(tmp_path, cluster, "node-b", listener)
    try:
        r = a.register("app", "one", address="127.0.0.1", port=backend.port)
        assert r.status_code == 200, r.text
        # Visible through the other node's API, DNS and proxy.
        wait_for(lambda: len(b.client.get("/v1/services/app").json().get("instances", [])) == 1)
        assert dns_answers(b, "app.ik.internal.") == {"127.0.0.1"}
        with httpx.Client(timeout=5) as c:
            assert c.get(f"http://127.0.0.1:{port}/").text == "app-1"
        # The status page's cluster: both nodes, from either, and the instance's owner.
        cluster_view = b.client.get("/v1/status").json()["panels"]["cluster"]
        assert cluster_view["backend"] == "etcd" and not cluster_view["stale"]
        nodes = {n["node"]: n for n in cluster_view["nodes"]}
        assert set(nodes) == {"node-a", "node-b"} and nodes["node-b"]["this_node"]
        assert nodes["node-a"]["instances"] == 1
        acknowledged = ["one"]
        for i in range(5):
            assert b.register("app", f"w{i}", port=backend.port).status_code == 200
            acknowledged.append(f"w{i}")

        cluster.kill_all()
        for node in (a, b):
            wait_for(lambda n=node: n.client.get("/v1/services/app").json()["stale"] is True)  # type: ignore[misc]
            r = node.client.get("/v1/services/app")
            assert r.headers.get("X-Interknit-Stale") == "1"
            assert sorted(i["id"] for i in r.json()["instances"]) == sorted(acknowledged)
            w = node.register("app", "new", address="127.0.0.3", port=1)
            assert w.status_code == 503 and "etcd" in w.json()["error"]
        assert "127.0.0.1" in dns_answers(b, "app.ik.internal.")
        with httpx.Client(timeout=5) as c:
            assert c.get(f"http://127.0.0.1:{port}/").status_code == 200

        cluster.restart_all()
        for node in (a, b):
            wait_for(lambda n=node: n.client.get("/v1/services/app").json()["stale"] is False)  # type: ignore[misc]
        ids = sorted(i["id"] for i in b.client.get("/v1/services/app").json()["instances"])
        assert ids == sorted(acknowledged)
        assert a.register("app", "after", address="127.0.0.4", port=2).status_code == 200
        wait_for(
            lambda: any(
                i["id"] == "after" for i in b.client.get("/v1/services/app").json()["instances"]
            )
        )
    finally:
        a.stop()
        b.stop()
        backend.close()
        cluster.stop()


def test_killed_node_takes_its_instances_with_it(tmp_path: Path) -> None:
    cluster = EtcdCluster(tmp_path / "etcd", 1).start()
    a = etcd_node(tmp_path, cluster, "node-a")
    b = etcd_node(tmp_path, cluster, "node-b")
    try:
        assert a.register("app", "eph", address="127.0.0.1", port=80).status_code == 200
        wait_for(lambda: len(b.client.get("/v1/services/app").json().get("instances", [])) == 1)
        a.kill9()
        # After node-a's lease (3s) runs out, its instance is gone everywhere.
        wait_for(lambda: b.client.get("/v1/services").json()["services"] == {}, timeout=15)
    finally:
        a.stop()
        b.stop()
        cluster.stop()
