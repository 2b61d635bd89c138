"""The Consul-compatible API of a real ``interknit up``: shapes, headers, blocking, writes,
health mapping, tokens."""

from __future__ import annotations

import concurrent.futures
import time
from pathlib import Path
from typing import Any

import dns.message
import dns.query
import httpx
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from interknit.compat.names import instance_label
from tests.nodeproc import NodeProcess


def register(node: NodeProcess, body: dict[str, Any]) -> httpx.Response:
    return node.client.put("/v1/agent/service/register", json=body)


def ok(response: httpx.Response) -> httpx.Response:
    assert response.status_code == 200, response.text
    return response


def index(response: httpx.Response) -> int:
    return int(response.headers["X-Consul-Index"])


def ids(rows: list[dict[str, Any]]) -> list[str]:
    return [r["Service"]["ID"] if "Service" in r else r["ServiceID"] for r in rows]


def test_reads_have_consul_shapes_and_headers(node: NodeProcess) -> None:
    for sid, port, tags in (("shop-2", 9102, ["b"]), ("shop-1", 9101, ["a", "b"])):
        ok(
            register(
                node,
                {"Name": "shop", "ID": sid, "Address": "127.0.0.1", "Port": port, "Tags": tags},
            )
        )
    catalog = ok(node.client.get("/v1/catalog/service/shop"))
    health = ok(node.client.get("/v1/health/service/shop"))
    for r in (catalog, health):
        assert index(r) > 0
        assert r.headers["X-Consul-KnownLeader"] == "true"
        assert r.headers["X-Consul-LastContact"] == "0"
        assert r.headers["Content-Type"].startswith("application/json")
    # Catalog and health list the instances in the same order.
    assert ids(catalog.json()) == ids(health.json()) == ["shop-1", "shop-2"]
    row = catalog.json()[0]
    for key in ("ID", "Node", "Address", "Datacenter", "ServiceID", "ServiceName", "ServiceAddress",
                "ServicePort", "ServiceTags", "ServiceMeta", "ServiceWeights"):  # fmt: skip
        assert key in row, key
    assert (row["ServiceName"], row["ServicePort"], row["ServiceTags"]) == (
        "shop",
        9101,
        ["a", "b"],
    )
    assert row["ServiceWeights"] == {"Passing": 1, "Warning": 1}
    entry = health.json()[0]
    assert set(entry) == {"Node", "Service", "Checks"}
    node_id = entry["Node"]["ID"]
    assert (
        node_id and node_id == row["ID"] == ok(node.client.get("/v1/catalog/nodes")).json()[0]["ID"]
    )
    checks = {c["CheckID"]: c for c in entry["Checks"]}
    assert checks["serfHealth"]["Status"] == "passing"
    assert checks["service:shop-1"]["Status"] == "passing"  # no check: a passing one anyway
    services = ok(node.client.get("/v1/catalog/services")).json()
    assert services["shop"] == ["a", "b"]
    agent = ok(node.client.get("/v1/agent/services")).json()
    assert agent["shop-1"]["Service"] == "shop" and agent["shop-1"]["Port"] == 9101
    me = ok(node.client.get("/v1/agent/self")).json()["Config"]
    assert (me["Datacenter"], me["NodeName"]) == ("dc1", "node-1")
    assert ok(node.client.get("/v1/status/leader")).json() == f"127.0.0.1:{node.api_port}"
    # An unknown service is an empty list, not a 404, with an index that is not 0.
    empty = ok(node.client.get("/v1/health/service/nothing-here"))
    assert empty.json() == [] and index(empty) >= 1
    assert ok(node.client.get("/v1/catalog/service/Not_A_Label!")).json() == []


def test_index_rises_when_the_last_instance_goes(node: NodeProcess) -> None:
    ok(register(node, {"Name": "gone", "Port": 9200}))
    before = index(ok(node.client.get("/v1/health/service/gone")))
    ok(node.client.put("/v1/agent/service/deregister/gone"))
    after_r = ok(node.client.get("/v1/health/service/gone"))
    assert after_r.json() == [] and index(after_r) > before
    # A watcher still at the old index is answered at once with the empty list.
    started = time.monotonic()
    r = ok(node.client.get(f"/v1/health/service/gone?index={before}&wait=30s"))
    assert r.json() == [] and time.monotonic() - started < 5


def test_blocking_query_waits_for_its_own_service(node: NodeProcess) -> None:
    ok(register(node, {"Name": "watched", "ID": "w1", "Port": 9301}))
    first = ok(node.client.get("/v1/health/service/watched"))
    with (
        concurrent.futures.ThreadPoolExecutor(1) as pool,
        httpx.Client(base_url=node.url, timeout=60) as c,
    ):
        blocked = pool.submit(c.get, f"/v1/health/service/watched?index={index(first)}&wait=30s")
        # Other services change; the watcher is not answered for them.
        ok(register(node, {"Name": "unrelated", "Port": 9399}))
        time.sleep(0.3)
        ok(register(node, {"Name": "watched", "ID": "w2", "Port": 9302}))
        answer = blocked.result(timeout=30)
    assert answer.status_code == 200
    assert index(answer) > index(first)
    assert ids(answer.json()) == ["w1", "w2"]  # answered after w2, not for "unrelated"


@pytest.mark.parametrize("wait", ["300ms", "1s"])
def test_wait_ends_a_blocking_query_with_at_most_a_sixteenth_of_jitter(
    node: NodeProcess, wait: str
) -> None:
    ok(register(node, {"Name": "quiet", "Port": 9400}))
    current = index(ok(node.client.get("/v1/catalog/service/quiet")))
    seconds = 0.3 if wait == "300ms" else 1.0
    started = time.monotonic()
    r = ok(node.client.get(f"/v1/catalog/service/quiet?index={current}&wait={wait}"))
    took = time.monotonic() - started
    assert index(r) == current
    assert seconds <= took < seconds * 17 / 16 + 1.0  # the slack: a loaded machine


def test_tag_passing_node_meta_and_filter(node: NodeProcess) -> None:
    ok(
        register(
            node,
            {
                "Name": "api",
                "ID": "api-1",
                "Port": 9501,
                "Tags": ["v1", "Blue"],
                "Meta": {"track": "stable"},
            },
        )
    )
    ok(
        register(
            node,
            {
                "Name": "api",
                "ID": "api-2",
                "Port": 9502,
                "Tags": ["v2", "blue"],
                "Check": {"TTL": "30s"},
            },
        )
    )
    get = node.client.get
    assert ids(get("/v1/health/service/api?tag=blue").json()) == ["api-1", "api-2"]  # any case
    assert ids(get("/v1/health/service/api?tag=blue&tag=v2").json()) == ["api-2"]  # all must match
    assert ids(get("/v1/health/service/api?passing").json()) == ["api-1"]  # api-2's TTL: critical
    assert ids(get("/v1/catalog/service/api?tag=v1").json()) == ["api-1"]
    assert ids(get("/v1/health/service/api?node-meta=consul-network-segment:").json()) == [
        "api-1",
        "api-2",
    ]
    assert get("/v1/health/service/api?node-meta=rack:r9").json() == []
    assert ids(
        get("/v1/health/service/api", params={"filter": 'Service.Meta.track == "stable"'}).json()
    ) == ["api-1"]
    assert ids(get("/v1/catalog/service/api", params={"filter": "ServicePort == 9502"}).json()) == [
        "api-2"
    ]
    bad = get("/v1/health/service/api", params={"filter": "Checks.Status == passing"})
    assert bad.status_code == 400 and bad.json()["error"].startswith("filter: ")
    wrong_dc = get("/v1/health/service/api?dc=dc9")
    assert wrong_dc.status_code == 400 and wrong_dc.json()["error"].startswith("dc: ")
    assert ok(get("/v1/health/service/api?dc=dc1&ns=default&partition=default&stale")).json()


def _statuses(node: NodeProcess, name: str) -> dict[str, str]:
    [entry] = ok(node.client.get(f"/v1/health/service/{name}")).json()
    return {c["CheckID"]: c["Status"] for c in entry["Checks"] if c["CheckID"] != "serfHealth"}


def test_ttl_checks_and_maintenance_map_to_consul_health(node: NodeProcess) -> None:
    ok(register(node, {"Name": "ttl", "ID": "ttl-1", "Port": 9601, "Check": {"TTL": "30s"}}))
    assert _statuses(node, "ttl") == {"service:ttl-1": "critical"}  # as Consul starts them
    ok(node.client.put("/v1/agent/check/pass/service:ttl-1"))
    assert _statuses(node, "ttl") == {"service:ttl-1": "passing"}
    ok(node.client.put("/v1/agent/check/warn/service:ttl-1?note=slow"))
    assert _statuses(node, "ttl") == {"service:ttl-1": "warning"}
    assert node.client.get("/v1/health/service/ttl?passing").json() == []  # warning is not passing
    ok(
        node.client.put(
            "/v1/agent/check/update/service:ttl-1", json={"Status": "critical", "Output": "down"}
        )
    )
    [entry] = node.client.get("/v1/health/service/ttl").json()
    assert [c["Output"] for c in entry["Checks"] if c["CheckID"] == "service:ttl-1"] == ["down"]
    ok(node.client.put("/v1/agent/check/update/service:ttl-1", json={"status": "passing"}))
    # Maintenance through Consul's endpoint, draining through interknit's: both a critical
    # _service_maintenance check (never "warning", which Traefik would still route to).
    ok(node.client.put("/v1/agent/service/maintenance/ttl-1?enable=true&reason=upgrade"))
    assert _statuses(node, "ttl") == {
        "service:ttl-1": "passing",
        "_service_maintenance:ttl-1": "critical",
    }
    assert node.client.get("/v1/health/service/ttl?passing").json() == []
    ok(node.client.put("/v1/agent/service/maintenance/ttl-1?enable=false"))
    assert _statuses(node, "ttl") == {"service:ttl-1": "passing"}
    ok(node.client.put("/v1/services/ttl/instances/ttl-1/health", json={"status": "draining"}))
    assert _statuses(node, "ttl")["_service_maintenance:ttl-1"] == "critical"
    critical = node.client.get("/v1/health/state/critical").json()
    assert "_service_maintenance:ttl-1" in {c["CheckID"] for c in critical}
    assert all(c["Status"] == "critical" for c in critical)
    # Errors: unknown IDs are 404s; a check interknit runs itself takes no TTL updates.
    assert node.client.put("/v1/agent/check/pass/service:nope").status_code == 404
    assert node.client.put("/v1/agent/service/deregister/nope").status_code == 404
    assert node.client.put("/v1/agent/service/maintenance/ttl-1").status_code == 400
    ok(
        register(
            node,
            {"Name": "active", "Port": 9602, "Check": {"TCP": "127.0.0.1:9602", "Interval": "10s"}},
        )
    )
    assert node.client.put("/v1/agent/check/pass/service:active").status_code == 409
    assert node.client.get("/v1/health/state/bogus").status_code == 400


def test_names_and_ids_are_translated_and_read_back(node: NodeProcess) -> None:
    body = {
        "Name": "Legacy_App",
        "ID": "host1:legacy:8080",
        "Port": 9701,
        "Check": {"TTL": "30s", "CheckID": "legacy-ttl"},
    }
    ok(register(node, body))
    [row] = ok(node.client.get("/v1/catalog/service/Legacy_App")).json()
    assert (row["ServiceName"], row["ServiceID"]) == ("Legacy_App", "host1:legacy:8080")
    assert row["ServiceMeta"] == {}  # the kept originals are not the client's meta
    assert ok(node.client.get("/v1/catalog/service/legacy_app")).json()  # names: any case
    assert node.client.get("/v1/catalog/service/legacy-app").json() == []  # not another name
    assert "Legacy_App" in ok(node.client.get("/v1/catalog/services")).json()
    # Under interknit's own API it is a label, with the originals in its meta.
    native = ok(node.client.get("/v1/services/legacy-app")).json()["instances"][0]
    assert native["id"] == instance_label("host1:legacy:8080")
    assert native["meta"]["consul.id"] == "host1:legacy:8080"
    ok(node.client.put("/v1/agent/check/pass/legacy-ttl"))  # its own CheckID
    ok(node.client.put("/v1/agent/check/pass/service:host1:legacy:8080"))
    # Another Consul name that would share the label is refused.
    clash = register(node, {"Name": "legacy.app", "Port": 9702})
    assert clash.status_code == 409 and clash.json()["error"].startswith("Name: ")
    # The same ID under another name is refused: interknit IDs are per service, and the
    # other instance may not be Consul's to move.
    moved = register(node, {"Name": "moved", "ID": "host1:legacy:8080", "Port": 9701})
    assert moved.status_code == 409 and moved.json()["error"].startswith("ID: ")
    ok(node.client.put("/v1/agent/service/deregister/host1:legacy:8080"))
    assert node.client.get("/v1/catalog/service/Legacy_App").json() == []
    ok(register(node, {"Name": "moved", "ID": "host1:legacy:8080", "Port": 9701}))
    assert ids(node.client.get("/v1/catalog/service/moved").json()) == ["host1:legacy:8080"]
    # Instances of two services registered through interknit's API with one ID: Consul's
    # agent endpoints cannot tell them apart.
    for service in ("twin-a", "twin-b"):
        assert node.register(service, "twin", port=9703).status_code == 200
    ambiguous = node.client.put("/v1/agent/service/deregister/twin")
    assert ambiguous.status_code == 409 and "twin-a" in ambiguous.json()["error"]
    bad = register(
        node, {"Name": "w", "Port": 1, "Check": {"GRPC": "127.0.0.1:1", "Interval": "1s"}}
    )
    assert bad.status_code == 400 and bad.json()["error"].startswith("Check.GRPC: ")


def test_prometheus_http_sd_targets(node: NodeProcess) -> None:
    ok(
        register(
            node,
            {
                "Name": "metrics",
                "ID": "m1",
                "Address": "127.0.0.1",
                "Port": 9801,
                "Tags": ["x"],
                "Meta": {"team-name": "a"},
            },
        )
    )
    groups = ok(node.client.get("/v1/prometheus/targets?service=metrics")).json()
    assert groups == [
        {
            "targets": ["127.0.0.1:9801"],
            "labels": {
                "__meta_interknit_service": "metrics",
                "__meta_interknit_id": "m1",
                "__meta_interknit_tags": ",x,",
                "__meta_interknit_zone": "",
                "__meta_interknit_region": "",
                "__meta_interknit_health": "passing",
                "__meta_interknit_node": "node-1",
                "__meta_interknit_meta_team_name": "a",
            },
        }
    ]
    assert ok(node.client.get("/v1/prometheus/targets?service=none")).json() == []


def test_consul_tokens(tmp_path: Path) -> None:
    tokens = '[registry.tokens]\nread = ["read-token-1"]\nwrite = ["write-token-1"]'
    proc = NodeProcess(tmp_path, extra_config=tokens).start()
    try:
        client = proc.client
        body = {"Name": "tok", "Port": 9901}
        assert client.get("/v1/catalog/services").status_code == 401
        assert (
            client.get(
                "/v1/catalog/services", headers={"X-Consul-Token": "read-token-1"}
            ).status_code
            == 200
        )
        assert client.get("/v1/catalog/services?token=read-token-1").status_code == 200
        assert client.get("/v1/catalog/services?token=wrong-token").status_code == 401
        read_only = {"X-Consul-Token": "read-token-1"}
        assert (
            client.put("/v1/agent/service/register", json=body, headers=read_only).status_code
            == 403
        )
        assert (
            client.put("/v1/agent/service/register?token=write-token-1", json=body).status_code
            == 200
        )
        r = client.get("/v1/catalog/services", headers={"Authorization": "Bearer read-token-1"})
        assert r.json() == {"tok": []}
    finally:
        proc.stop()


def test_dns_srv_targets_resolve_for_dns_sd(node: NodeProcess) -> None:
    """What Prometheus' dns_sd_configs (type SRV) does: SRV, then an A look-up of each target."""
    for sid, port in (("d-1", 9951), ("Host:D:2", 9952)):
        body = {"Name": "dnssd", "ID": sid, "Address": "127.0.0.2", "Port": port}
        ok(register(node, body))

    def ask(name: str, kind: str) -> dns.message.Message:
        query = dns.message.make_query(name, kind)
        return dns.query.udp(query, "127.0.0.1", port=node.dns_port, timeout=2)

    srv = ask("_dnssd._tcp.ik.internal.", "SRV")
    targets = {(str(rr.target), rr.port) for rrset in srv.answer for rr in rrset}
    label = instance_label("Host:D:2")
    assert targets == {("d-1.dnssd.ik.internal.", 9951), (f"{label}.dnssd.ik.internal.", 9952)}
    for target, _ in targets:
        # Prometheus strips the final dot and resolves the name as it is.
        reply = ask(target.rstrip("."), "A")
        assert {rr.address for rrset in reply.answer for rr in rrset} == {"127.0.0.2"}


_PATHS = st.sampled_from(
    [
        "/v1/agent/service/register",
        "/v1/agent/service/deregister/x",
        "/v1/agent/check/update/service:x",
        "/v1/agent/check/pass/%00",
        "/v1/agent/service/maintenance/x",
        "/v1/health/service/x",
        "/v1/health/state/any",
        "/v1/catalog/service/x",
        "/v1/catalog/services",
        "/v1/agent/services",
        "/v1/prometheus/targets",
    ]
)
_PARAMS = st.lists(
    st.tuples(
        st.sampled_from(
            ["index", "wait", "filter", "tag", "passing", "dc", "node-meta", "enable", "note", "x"]
        ),
        st.text(max_size=20),
    ),
    max_size=4,
)


@settings(
    max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(
    path=_PATHS, params=_PARAMS, body=st.binary(max_size=64) | st.text(max_size=64).map(str.encode)
)
def test_garbage_requests_never_500(
    node: NodeProcess, path: str, params: list[tuple[str, str]], body: bytes
) -> None:
    params = [(k, v) for k, v in params if k not in ("index", "wait")] + [("wait", "1ms")]
    method = "PUT" if "/agent/service/" in path or "/agent/check/" in path else "GET"
    r = node.client.request(method, path, params=params, content=body)
    assert r.status_code < 500, (r.status_code, r.text)
    if r.status_code >= 400:
        assert r.json()["error"]
