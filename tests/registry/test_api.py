"""The registry's HTTP API through the real ``interknit up`` process."""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.nodeproc import NodeProcess

GOOD = {"address": "127.0.0.1", "port": 9001}


def test_register_lookup_and_revision_header(node: NodeProcess) -> None:
    r = node.register("search", "s1", port=9001, tags=["v1"], zone="z1", meta={"k": "v"})
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["health"] == "passing"
    assert body["revision"] == 1
    for key in (
        "service",
        "id",
        "address",
        "port",
        "zone",
        "region",
        "weight",
        "tags",
        "meta",
        "check",
        "health",
        "ejected_until",
    ):
        assert key in body
    node.register("search", "s2", port=9002, check={"http": "/health"})
    r = node.client.get("/v1/services/search")
    assert r.headers["X-Interknit-Revision"] == "2"
    data = r.json()
    assert data["revision"] == 2 and data["stale"] is False
    assert [i["id"] for i in data["instances"]] == ["s1", "s2"]
    healthy = node.client.get("/v1/services/search?healthy=1").json()["instances"]
    assert [i["id"] for i in healthy] == ["s1"]  # s2 has not passed a check yet
    tagged = node.client.get("/v1/services/search?tag=v1").json()["instances"]
    assert [i["id"] for i in tagged] == ["s1"]
    services = node.client.get("/v1/services").json()
    assert services["services"] == {"search": {"instances": 2, "passing": 1}}


def test_identical_reregistration_is_a_noop(node: NodeProcess) -> None:
    assert node.register("web", "a", **GOOD).json()["revision"] == 1
    assert node.register("web", "a", **GOOD).json()["revision"] == 1
    assert node.register("web", "a", address="127.0.0.1", port=9002).json()["revision"] == 2


def test_deregister_and_404s(node: NodeProcess) -> None:
    node.register("web", "a", **GOOD)
    assert node.client.delete("/v1/services/web/instances/a").status_code == 200
    for method, path in [
        ("DELETE", "/v1/services/web/instances/a"),
        ("GET", "/v1/services/web"),
        ("GET", "/v1/services/nope/instances/x"),
        ("PUT", "/v1/services/web/instances/a/heartbeat"),
        ("GET", "/v1/no-such-endpoint"),
    ]:
        r = node.client.request(method, path)
        assert r.status_code == 404, (method, path, r.text)
        assert "error" in r.json()


def test_405_is_json(node: NodeProcess) -> None:
    r = node.client.post("/v1/services")
    assert r.status_code == 405
    assert "not allowed" in r.json()["error"]


def test_operator_health(node: NodeProcess) -> None:
    node.register("web", "a", **GOOD)
    url = "/v1/services/web/instances/a/health"
    assert node.client.put(url, json={"status": "draining"}).json()["health"] == "draining"
    assert node.client.get("/v1/services/web?healthy=1").json()["instances"] == []
    assert node.client.put(url, json={"status": "maintenance"}).json()["health"] == "maintenance"
    assert node.client.put(url, json={"status": "passing"}).json()["health"] == "passing"
    r = node.client.put(url, json={"status": "critical"})
    assert r.status_code == 400 and "status" in r.json()["error"]


def test_heartbeat_needs_a_ttl_check(node: NodeProcess) -> None:
    node.register("web", "a", **GOOD)
    r = node.client.put("/v1/services/web/instances/a/heartbeat")
    assert r.status_code == 409
    assert "ttl" in r.json()["error"]


BAD_BODIES: list[tuple[Any, str]] = [
    ({"address": "127.0.0.1", "port": 0}, "port"),
    ({"address": "127.0.0.1", "port": 65536}, "port"),
    ({"address": "127.0.0.1", "port": "80"}, "port"),
    ({"address": "127.0.0.1", "port": 80.5}, "port"),
    ({"address": "not an address!", "port": 80}, "address"),
    ({"address": "-bad-.example", "port": 80}, "address"),
    ({"port": 80}, "address"),
    ({"address": "127.0.0.1", "port": 80, "colour": "red"}, "colour"),
    ({"address": "127.0.0.1", "port": 80, "tags": ["Not_A_Label"]}, "tags[0]"),
    ({"address": "127.0.0.1", "port": 80, "tags": "v1"}, "tags"),
    ({"address": "127.0.0.1", "port": 80, "weight": 0}, "weight"),
    ({"address": "127.0.0.1", "port": 80, "zone": "Zone 1"}, "zone"),
    ({"address": "127.0.0.1", "port": 80, "meta": {"k": 1}}, "meta.k"),
    ({"address": "127.0.0.1", "port": 80, "check": {"ttl": "ten seconds"}}, "check.ttl"),
    ({"address": "127.0.0.1", "port": 80, "check": {"http": "/", "tcp": True}}, "check"),
    ({"address": "127.0.0.1", "port": 80, "check": {"http": "no-slash"}}, "check.http"),
    ({"address": "127.0.0.1", "port": 80, "check": {"ttl": "5s", "rise": 0}}, "check.rise"),
    ([1, 2], "body"),
    ("string", "body"),
]


@pytest.mark.parametrize(("body", "field"), BAD_BODIES)
def test_bad_bodies_name_the_field_and_write_nothing(
    node: NodeProcess, body: Any, field: str
) -> None:
    r = node.client.put("/v1/services/web/instances/a", json=body)
    assert r.status_code == 400, r.text
    err = r.json()
    assert err["error"].startswith(field), err
    assert node.client.get("/v1/services").json() == {"revision": 0, "stale": False, "services": {}}


@pytest.mark.parametrize(
    ("path", "field"),
    [
        ("/v1/services/Web/instances/a", "service"),
        ("/v1/services/web/instances/a_b", "id"),
        ("/v1/services/-web/instances/a", "service"),
        ("/v1/services/" + "x" * 64 + "/instances/a", "service"),
    ],
)
def test_bad_names(node: NodeProcess, path: str, field: str) -> None:
    r = node.client.put(path, json=GOOD)
    assert r.status_code == 400
    assert r.json()["error"].startswith(field)


def test_malformed_json_and_empty_body(node: NodeProcess) -> None:
    url = "/v1/services/web/instances/a"
    r = node.client.put(url, content=b'{"address": ')
    assert r.status_code == 400 and "malformed JSON" in r.json()["error"]
    r = node.client.put(url, content=b"")
    assert r.status_code == 400 and r.json()["error"].startswith("body")


def test_oversized_body_is_413(node: NodeProcess) -> None:
    body = {**GOOD, "meta": {"k": "v" * 70000}}
    r = node.client.put("/v1/services/web/instances/a", json=body)
    assert r.status_code == 413

    # Chunked, with no Content-Length up front: still refused by size.
    def gen() -> Any:
        yield b'{"address": "127.0.0.1", "port": 80, "meta": {"k": "'
        for _ in range(70):
            yield b"v" * 1024
        yield b'"}}'

    r = node.client.put("/v1/services/web/instances/a", content=gen())
    assert r.status_code == 413
    assert node.client.get("/v1/services").json()["revision"] == 0


def blocking_queries(node: NodeProcess) -> float:
    for line in node.client.get("/metrics").text.splitlines():
        if line.startswith('interknit_registry_watchers{kind="blocking"}'):
            return float(line.rsplit(" ", 1)[1])
    raise AssertionError("no interknit_registry_watchers{kind=blocking} in /metrics")


def test_blocking_query_wakes_only_for_its_service(node: NodeProcess) -> None:
    node.register("a", "x", **GOOD)
    node.register("b", "x", **GOOD)
    rev = node.client.get("/v1/services/a").json()["revision"]
    result: dict[str, Any] = {}

    def blocking() -> None:
        started = time.monotonic()
        with httpx.Client(base_url=node.url, timeout=30) as c:
            r = c.get(f"/v1/services/a?index={rev}&wait=10s")
        result["elapsed"] = time.monotonic() - started
        result["body"] = r.json()

    t = threading.Thread(target=blocking)
    t.start()
    wait_for(lambda: blocking_queries(node) == 1)  # the query waits in the node now
    for i in range(5):  # churn on another service must not wake the watcher of "a"
        node.register("b", f"y{i}", **GOOD)
    # Each registration was answered after the node had offered it to its waiters; give the
    # loop a moment more, then the query must still be waiting.
    time.sleep(0.2)
    assert blocking_queries(node) == 1 and t.is_alive(), "a change of b woke a query on a"
    node.register("a", "z", **GOOD)
    t.join(5)
    assert not t.is_alive()
    assert result["elapsed"] < 5
    assert [i["id"] for i in result["body"]["instances"]] == ["x", "z"]


def test_blocking_query_times_out_with_wait(node: NodeProcess) -> None:
    node.register("a", "x", **GOOD)
    rev = node.client.get("/v1/services/a").json()["revision"]
    started = time.monotonic()
    r = node.client.get(f"/v1/services/a?index={rev}&wait=300ms")
    elapsed = time.monotonic() - started
    assert r.status_code == 200
    assert 0.25 < elapsed < 3
    assert node.client.get("/v1/services/a?index=x").status_code == 400
    assert node.client.get("/v1/services/a?index=1&wait=forever").status_code == 400


def read_sse(
    node: NodeProcess,
    query: str,
    count: int,
    headers: dict[str, str] | None = None,
    timeout: float = 20,
    first: threading.Event | None = None,
) -> list[tuple[str, dict[str, Any]]]:
    """The first ``count`` events of a watch; ``first`` is set once the first has arrived."""
    events: list[tuple[str, dict[str, Any]]] = []
    with (
        httpx.Client(base_url=node.url, timeout=timeout) as c,
        c.stream("GET", f"/v1/watch{query}", headers=headers or {}) as r,
    ):
        assert r.status_code == 200
        assert r.headers["content-type"].startswith("text/event-stream")
        name = ""
        for line in r.iter_lines():
            if line.startswith("event: "):
                name = line[7:]
            elif line.startswith("data: "):
                events.append((name, json.loads(line[6:])))
                if first is not None:
                    first.set()
                if len(events) >= count:
                    break
    return events


def test_watch_starts_with_resync_then_streams_changes(node: NodeProcess) -> None:
    node.register("web", "a", **GOOD)
    got: list[tuple[str, dict[str, Any]]] = []
    watching = threading.Event()
    t = threading.Thread(
        target=lambda: got.extend(read_sse(node, "?service=web", 3, first=watching))
    )
    t.start()
    assert watching.wait(20), "the watch sent no resync"  # changes from now on are streamed
    node.register("other", "x", **GOOD)
    node.register("web", "b", **GOOD)
    node.client.delete("/v1/services/web/instances/a")
    t.join(20)
    kinds = [(name, data.get("id")) for name, data in got]
    assert kinds == [("resync", None), ("put", "b"), ("delete", "a")]
    assert got[0][1]["instances"][0]["id"] == "a"
    assert got[1][1]["revision"] == 3 and got[2][1]["revision"] == 4


def test_watch_resumes_from_since_and_last_event_id(node: NodeProcess) -> None:
    for i in range(5):
        node.register("web", f"i{i}", **GOOD)
    events = read_sse(node, "?since=2", 3)
    assert [(n, d["revision"]) for n, d in events] == [("put", 3), ("put", 4), ("put", 5)]
    events = read_sse(node, "", 2, headers={"Last-Event-ID": "3"})
    assert [d["revision"] for _, d in events] == [4, 5]


def test_watch_older_than_history_gets_resync(tmp_path: Path) -> None:
    node = NodeProcess(tmp_path, registry_config="history = 100").start()
    try:
        for i in range(130):
            node.register("web", f"i{i}", **GOOD)
        [(name, data)] = read_sse(node, "?since=5", 1)
        assert name == "resync"
        assert data["revision"] == 130 and len(data["instances"]) == 130
        events = read_sse(node, "?since=40", 2)  # still in the history
        assert [d["revision"] for _, d in events] == [41, 42]
    finally:
        node.stop()


def health_of(node: NodeProcess) -> dict[str, str]:
    return {i["id"]: i["health"] for i in node.client.get("/v1/services/web").json()["instances"]}


def wait_for(condition: Callable[[], bool], timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "condition not reached in time"
        time.sleep(0.02)


def test_ttl_expiry_and_removal(node: NodeProcess) -> None:
    # The lease rules are RegistryState's (tests/registry/test_state.py, with an injected
    # clock); this is the node's wiring. b is registered before a with the same TTL, so the
    # tick that makes a critical would have taken b too, had b's heartbeats not renewed it:
    # no margin between a heartbeat period and a TTL decides the outcome.
    node.register("web", "b", address="127.0.0.1", port=9002, check={"ttl": "1s"})
    node.register("web", "a", **GOOD, check={"ttl": "1s", "deregister_after": "500ms"})
    beats = 0

    def a_is_critical_while_b_beats() -> bool:
        nonlocal beats
        assert node.client.put("/v1/services/web/instances/b/heartbeat").status_code == 200
        beats += 1
        return health_of(node).get("a") == "critical"

    wait_for(a_is_critical_while_b_beats)
    assert health_of(node)["b"] == "passing" and beats > 1
    wait_for(lambda: list(health_of(node)) == ["b"])  # a removed after deregister_after
    wait_for(lambda: health_of(node)["b"] == "critical")  # b's lease runs out without beats
    metrics = node.client.get("/metrics").text
    assert "interknit_registry_lease_expiries_total 2.0" in metrics
    assert 'interknit_registry_deregistrations_total{reason="expire"} 1.0' in metrics


def test_kill9_loses_no_acknowledged_write(tmp_path: Path) -> None:
    node = NodeProcess(tmp_path).start()
    acked: list[str] = []
    try:
        with httpx.Client(base_url=node.url, timeout=10) as c:
            for i in range(50):
                r = c.put(f"/v1/services/web/instances/i{i}", json={**GOOD, "port": 1000 + i})
                assert r.status_code == 200
                acked.append(f"i{i}")
        node.kill9()  # right after the last 200
        node.start()
        data = node.client.get("/v1/services/web").json()
        assert [i["id"] for i in data["instances"]] == sorted(acked)
        assert data["revision"] == 50
        assert node.register("web", "new", **GOOD).json()["revision"] == 51
    finally:
        node.stop()


def test_restart_keeps_revision_health_and_grants_lease_grace(tmp_path: Path) -> None:
    node = NodeProcess(tmp_path).start()
    try:
        ttl = 3.0  # also the grace after a restart: the first lookup must come within it
        node.register("web", "a", **GOOD, check={"ttl": "3s"})
        registered = time.time()  # the lease was granted before this, on the same clock
        node.register("web", "b", address="127.0.0.1", port=9002)
        node.client.put("/v1/services/web/instances/b/health", json={"status": "draining"})
        assert node.terminate() == 0
        # Down until a's lease has surely run out: without the grace it starts critical.
        time.sleep(max(0.0, registered + ttl + 0.05 - time.time()))
        node.start()
        insts = {i["id"]: i for i in node.client.get("/v1/services/web").json()["instances"]}
        assert insts["a"]["health"] == "passing"  # grace: a full TTL to renew
        assert insts["b"]["health"] == "draining"
        assert node.client.put("/v1/services/web/instances/a/heartbeat").status_code == 200
        assert node.client.get("/v1/services").json()["revision"] == 3
    finally:
        node.stop()


def test_metrics_pass_promtool(node: NodeProcess) -> None:
    from tests.conftest import require_tool

    promtool = require_tool("promtool")
    import subprocess

    node.register("web", "a", **GOOD)
    node.client.get("/v1/services/web")
    text = node.client.get("/metrics").text
    for name in (
        "interknit_registry_registrations_total",
        "interknit_registry_deregistrations_total",
        "interknit_registry_lease_expiries_total",
        "interknit_registry_watchers",
        "interknit_registry_revision",
        "interknit_http_requests_total",
        "interknit_http_request_duration_seconds_bucket",
    ):
        assert name in text
    res = subprocess.run(
        [promtool, "check", "metrics"], input=text, capture_output=True, text=True, timeout=30
    )
    assert res.returncode == 0, res.stdout + res.stderr


def test_status_page_and_health(node: NodeProcess) -> None:
    r = node.client.get("/")
    assert r.status_code == 200 and "text/html" in r.headers["content-type"]
    assert "EventSource" in r.text
    assert node.client.get("/v1/health").json()["status"] == "ready"
    status = node.client.get("/v1/status").json()
    assert status["node"]["listen"]["api"] == node.url
