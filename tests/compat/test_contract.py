"""Contract tests: the exact bytes that consul-template, Fabio and Prometheus' Consul discovery
send, replayed against a real node, and their answers read the way those tools read them.

Those tools are not installable here, so their requests are rebuilt from their sources:
hashicorp/consul's api package (``api.go`` ``setQueryOptions``: ``stale=`` and ``consistent=``
with empty values, ``wait`` as ``durToMsec``, ``url.Values.Encode`` sorting the parameters;
``parseQueryMeta`` reading X-Consul-Index and X-Consul-LastContact as unsigned integers) and
Go's net/http (request line, ``Host``, ``User-Agent: Go-http-client/1.1``, ``Content-Length``,
the other headers sorted, then ``Accept-Encoding: gzip``; ``json.Encoder`` ends a body with a
newline):

* Prometheus, discovery/consul/consul.go: ``Agent().Self()`` for ``Config.Datacenter``;
  ``Catalog().Services`` and ``Health().ServiceMultipleTags`` with ``WaitTime: 2m`` and
  ``AllowStale: true`` by default, ``WaitIndex`` once it has one.
* consul-template, dependency/health_service.go and watch/view.go: ``Health().Service`` with
  ``passingOnly`` for the default ``passing`` filter, ``WaitTime: 60s``, stale allowed
  (``max_stale`` 2s by default); the index goes back to 0 when it ever goes down.
* Fabio, registry/consul/{backend,register,service,passing}.go: ``Agent().Self()``,
  ``Agent().Services()``, ``ServiceRegister`` of itself with a TTL and an HTTP check,
  ``UpdateTTL`` through ``check/update``, then ``Health().State("any")`` blocking with
  ``RequireConsistent`` and ``Catalog().Service(name, "", q)``.
"""

from __future__ import annotations

import concurrent.futures
import json
import socket
import time
from typing import Any

from tests.nodeproc import NodeProcess

GO_TAIL = b"Accept-Encoding: gzip\r\n\r\n"


def go_get(node: NodeProcess, target: str) -> bytes:
    return (
        f"GET {target} HTTP/1.1\r\nHost: 127.0.0.1:{node.api_port}\r\n"
        "User-Agent: Go-http-client/1.1\r\n"
    ).encode() + GO_TAIL


def go_put(node: NodeProcess, target: str, body: bytes) -> bytes:
    return (
        (
            f"PUT {target} HTTP/1.1\r\nHost: 127.0.0.1:{node.api_port}\r\n"
            f"User-Agent: Go-http-client/1.1\r\nContent-Length: {len(body)}\r\n"
            "Content-Type: application/json\r\n"
        ).encode()
        + GO_TAIL
        + body
    )


def exchange(
    node: NodeProcess, raw: bytes, timeout: float = 30.0
) -> tuple[int, dict[str, str], Any]:
    """Send ``raw`` as it is and read one answer; the body decoded as the api package does."""
    with socket.create_connection(("127.0.0.1", node.api_port), timeout=timeout) as sock:
        sock.sendall(raw)
        data = b""
        while b"\r\n\r\n" not in data:
            chunk = sock.recv(65536)
            assert chunk, data
            data += chunk
        head, _, rest = data.partition(b"\r\n\r\n")
        lines = head.decode("latin-1").split("\r\n")
        status = int(lines[0].split()[1])
        headers = {k.lower(): v.strip() for k, _, v in (line.partition(":") for line in lines[1:])}
        length = int(headers["content-length"])
        while len(rest) < length:
            chunk = sock.recv(65536)
            assert chunk
            rest += chunk
    body = json.loads(rest) if rest.strip() else None
    return status, headers, body


def query_meta(headers: dict[str, str]) -> int:
    """What api.parseQueryMeta needs: an unsigned X-Consul-Index, an unsigned LastContact."""
    index = int(headers["x-consul-index"])
    assert 0 < index < 2**64
    assert int(headers["x-consul-lastcontact"]) >= 0
    assert headers["x-consul-knownleader"] in ("true", "false")
    return index


def aggregated_status(checks: list[dict[str, Any]]) -> str:
    """api.HealthChecks.AggregatedStatus, as consul-template and Prometheus compute it."""
    seen = set()
    for check in checks:
        if check["CheckID"] == "_node_maintenance" or check["CheckID"].startswith(
            "_service_maintenance:"
        ):
            seen.add("maintenance")
            continue
        if check["Status"] not in ("passing", "warning", "critical"):
            return ""
        seen.add(check["Status"])
    for status in ("maintenance", "critical", "warning"):
        if status in seen:
            return status
    return "passing"


def register_web(node: NodeProcess, name: str, *ids: str) -> None:
    for i, sid in enumerate(ids):
        body = {"Name": name, "ID": sid, "Address": "127.0.0.1", "Port": 9000 + i, "Tags": ["a"]}
        assert node.client.put("/v1/agent/service/register", json=body).status_code == 200


def test_prometheus_consul_sd(node: NodeProcess) -> None:
    register_web(node, "prom-web", "pw-1", "pw-2")
    status, headers, me = exchange(node, go_get(node, "/v1/agent/self"))
    assert status == 200 and isinstance(me["Config"]["Datacenter"], str)
    status, headers, services = exchange(
        node, go_get(node, "/v1/catalog/services?stale=&wait=120000ms")
    )
    assert status == 200 and services["prom-web"] == ["a"]
    catalog_index = query_meta(headers)
    target = "/v1/health/service/prom-web?stale=&tag=a&wait=120000ms"
    status, headers, entries = exchange(node, go_get(node, target))
    assert status == 200
    service_index = query_meta(headers)
    # consul.go's labels: Service.Address (else Node.Address), Service.Port, Node.Node,
    # Node.Meta, Service.Meta, Node.TaggedAddresses, Service.ID, AggregatedStatus.
    for entry in entries:
        assert entry["Service"]["Address"] and entry["Service"]["Port"]
        assert isinstance(entry["Node"]["Meta"], dict) and isinstance(
            entry["Service"]["Meta"], dict
        )
        assert isinstance(entry["Node"]["TaggedAddresses"], dict) and entry["Node"]["Node"]
        assert aggregated_status(entry["Checks"]) == "passing"
    assert [e["Service"]["ID"] for e in entries] == ["pw-1", "pw-2"]
    # With health_filter and node_meta set: QueryEscape turns spaces into '+', ':' into %3A.
    filtered = (
        "/v1/health/service/prom-web?filter=Service.ID+%3D%3D+%22pw-2%22"
        "&node-meta=consul-network-segment%3A&stale=&wait=120000ms"
    )
    status, _, entries = exchange(node, go_get(node, filtered))
    assert status == 200 and [e["Service"]["ID"] for e in entries] == ["pw-2"]
    # The next round blocks at the index it was given, until the service changes.
    with concurrent.futures.ThreadPoolExecutor(2) as pool:
        blocked_service = pool.submit(
            exchange,
            node,
            go_get(
                node,
                f"/v1/health/service/prom-web?index={service_index}&stale=&tag=a&wait=120000ms",
            ),
        )
        blocked_catalog = pool.submit(
            exchange,
            node,
            go_get(node, f"/v1/catalog/services?index={catalog_index}&stale=&wait=120000ms"),
        )
        time.sleep(0.2)
        assert not blocked_service.done() and not blocked_catalog.done()
        assert node.client.put("/v1/agent/service/deregister/pw-2").status_code == 200
        status, headers, entries = blocked_service.result(timeout=30)
        assert status == 200 and query_meta(headers) > service_index
        assert [e["Service"]["ID"] for e in entries] == ["pw-1"]
        status, headers, _ = blocked_catalog.result(timeout=30)
        assert status == 200 and query_meta(headers) > catalog_index


def test_consul_template_service_and_services(node: NodeProcess) -> None:
    body = {
        "Name": "ct-web",
        "ID": "ct-1",
        "Address": "127.0.0.1",
        "Port": 9100,
        "Check": {"TTL": "30s"},
    }
    assert node.client.put("/v1/agent/service/register", json=body).status_code == 200
    status, headers, entries = exchange(
        node, go_get(node, "/v1/health/service/ct-web?passing=1&stale=&wait=60000ms")
    )
    assert status == 200 and entries == []  # a TTL check starts critical
    first = query_meta(headers)
    status, headers, services = exchange(
        node, go_get(node, "/v1/catalog/services?stale=&wait=60000ms")
    )
    assert status == 200 and "ct-web" in services
    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        blocked = pool.submit(
            exchange,
            node,
            go_get(node, f"/v1/health/service/ct-web?index={first}&passing=1&stale=&wait=60000ms"),
        )
        time.sleep(0.2)
        assert not blocked.done()
        assert node.client.put("/v1/agent/check/pass/service:ct-1").status_code == 200
        status, headers, entries = blocked.result(timeout=30)
    assert status == 200 and query_meta(headers) > first
    [entry] = entries
    # What HealthService takes from an entry.
    assert entry["Node"]["Node"] and entry["Node"]["ID"] and entry["Node"]["Address"]
    assert entry["Service"]["Service"] == "ct-web" and entry["Service"]["ID"] == "ct-1"
    assert entry["Service"]["Weights"] == {"Passing": 1, "Warning": 1}
    assert aggregated_status(entry["Checks"]) == "passing"


def fabio_passing(checks: list[dict[str, Any]]) -> set[str]:
    """Fabio's passingServices (status "passing", checks required "one"), over the checks
    that checksWithTagPrefix keeps for the tag prefix "urlprefix-"."""
    kept = [
        c
        for c in checks
        if c["CheckID"] in ("serfHealth", "_node_maintenance")
        or c["CheckID"].startswith("_service_maintenance")
        or any(t.startswith("urlprefix-") for t in c["ServiceTags"])
    ]
    out = set()
    for svc in kept:
        if not svc["ServiceID"] or svc["CheckID"] in ("serfHealth", "_node_maintenance"):
            continue
        if svc["CheckID"].startswith("_service_maintenance:"):
            continue
        passing = 0
        skip = False
        for c in kept:
            if c["Node"] != svc["Node"]:
                continue
            if c["ServiceID"] == svc["ServiceID"] and c["Status"] == "passing":
                passing += 1
            if c["CheckID"] == "serfHealth" and c["Status"] == "critical":
                skip = True
            if (
                c["CheckID"] == "_service_maintenance:" + svc["ServiceID"]
                and c["Status"] == "critical"
            ):
                skip = True
        if passing and not skip:
            out.add(f"{svc['Node']}.{svc['ServiceID']}")
    return out


def test_fabio_registers_itself_and_watches_health(node: NodeProcess) -> None:
    status, _, me = exchange(node, go_get(node, "/v1/agent/self"))
    assert status == 200 and me["Config"]["Datacenter"] == "dc1"
    registration = (
        b'{"ID":"fabio-host-9998","Name":"fabio","Port":9998,"Address":"127.0.0.1","Check":null,'
        b'"Checks":[{"CheckID":"fabio-host-9998-ttl","TTL":"15s","DeregisterCriticalServiceAfter":"1m0s"},'
        b'{"Interval":"1s","Timeout":"3s","HTTP":"http://127.0.0.1:9998/health"}]}\n'
    )
    status, _, _ = exchange(node, go_put(node, "/v1/agent/service/register", registration))
    assert status == 200
    status, _, services = exchange(node, go_get(node, "/v1/agent/services"))
    assert status == 200 and services["fabio-host-9998"]["Service"] == "fabio"
    update = b'{"Status":"passing","Output":""}\n'
    status, _, _ = exchange(
        node, go_put(node, "/v1/agent/check/update/fabio-host-9998-ttl", update)
    )
    assert status == 200

    # A routed service, with urlprefix- tags, and Fabio's watch over every check.
    body = {
        "Name": "fb-app",
        "ID": "fb-1",
        "Address": "127.0.0.1",
        "Port": 9201,
        "Tags": ["urlprefix-/app"],
    }
    assert node.client.put("/v1/agent/service/register", json=body).status_code == 200
    status, headers, checks = exchange(node, go_get(node, "/v1/health/state/any?consistent="))
    assert status == 200
    index = query_meta(headers)
    passing = fabio_passing(checks)
    assert passing == {"node-1.fb-1"}
    status, _, rows = exchange(node, go_get(node, "/v1/catalog/service/fb-app?consistent="))
    assert status == 200 and {f"{r['Node']}.{r['ServiceID']}" for r in rows} == passing
    assert rows[0]["ServiceTags"] == ["urlprefix-/app"] and rows[0]["ServicePort"] == 9201
    # Maintenance wakes the watch, and Fabio then leaves the instance out.
    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        blocked = pool.submit(
            exchange, node, go_get(node, f"/v1/health/state/any?consistent=&index={index}")
        )
        time.sleep(0.2)
        assert not blocked.done()
        assert node.client.put("/v1/agent/service/maintenance/fb-1?enable=true").status_code == 200
        status, headers, checks = blocked.result(timeout=30)
    assert status == 200 and query_meta(headers) > index
    assert fabio_passing(checks) == set()
