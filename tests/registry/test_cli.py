"""The ``interknit`` command against a real node."""

from __future__ import annotations

import json
import socket
import subprocess
import time
from pathlib import Path

from tests.nodeproc import INTERKNIT, NodeProcess


def test_register_list_drain_deregister(node: NodeProcess) -> None:
    res = node.cli(
        "register",
        "search",
        "s1",
        "--address",
        "127.0.0.1",
        "--port",
        "9001",
        "--ttl",
        "10s",
        "--tag",
        "v1",
        "--zone",
        "z1",
        "--weight",
        "3",
        "--meta",
        "version=1.2",
    )
    assert res.returncode == 0, res.stderr
    assert "registered search/s1" in res.stdout
    res = node.cli(
        "register",
        "search",
        "s2",
        "--address",
        "127.0.0.1",
        "--port",
        "9002",
        "--http-check",
        "/health",
        "--interval",
        "1s",
        "--json",
    )
    assert json.loads(res.stdout)["check"]["http"] == "/health"
    res = node.cli("services")
    assert res.returncode == 0 and "search" in res.stdout
    data = json.loads(node.cli("services", "--json").stdout)
    assert data["services"]["search"] == {"instances": 2, "passing": 1}
    data = json.loads(node.cli("instances", "search", "--json").stdout)
    s1 = data["instances"][0]
    assert (s1["zone"], s1["weight"], s1["meta"], s1["tags"]) == (
        "z1",
        3,
        {"version": "1.2"},
        ["v1"],
    )
    res = node.cli("instances", "search", "--healthy")
    assert "s1" in res.stdout and "s2" not in res.stdout
    assert node.cli("heartbeat", "search", "s1").returncode == 0
    res = node.cli("drain", "search", "s1")
    assert res.returncode == 0 and "draining" in res.stdout
    res = node.cli("drain", "search", "s1", "--undo")
    assert "passing" in res.stdout
    assert node.cli("deregister", "search", "s1").returncode == 0
    data = json.loads(node.cli("instances", "search", "--json").stdout)
    assert [i["id"] for i in data["instances"]] == ["s2"]


def test_failed_operations_exit_1_with_one_sentence(node: NodeProcess) -> None:
    res = node.cli("deregister", "search", "nope")
    assert res.returncode == 1
    assert res.stderr.startswith("interknit: ") and res.stderr.count("\n") == 1
    assert "not registered" in res.stderr
    res = node.cli("register", "Bad_Name", "x", "--address", "127.0.0.1", "--port", "80")
    assert res.returncode == 1 and "service" in res.stderr


def test_bad_usage_exits_2(node: NodeProcess) -> None:
    res = node.cli("register", "web", "a", "--address", "127.0.0.1", "--port", "99999")
    assert res.returncode == 2
    res = node.cli(
        "register",
        "web",
        "a",
        "--address",
        "127.0.0.1",
        "--port",
        "80",
        "--ttl",
        "5s",
        "--tcp-check",
    )
    assert res.returncode == 2
    assert node.cli("no-such-command").returncode == 2


def test_unreachable_node_exits_1() -> None:
    res = subprocess.run(
        [INTERKNIT, "--api", "http://127.0.0.1:9", "services"],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert res.returncode == 1
    assert "cannot reach the node" in res.stderr


def run_up(tmp_path: Path, config: str) -> subprocess.CompletedProcess[str]:
    path = tmp_path / "bad.toml"
    path.write_text(config)
    return subprocess.run(
        [INTERKNIT, "up", "-c", str(path)], capture_output=True, text=True, timeout=30, cwd=tmp_path
    )


def test_bad_config_exits_2_naming_the_key(tmp_path: Path) -> None:
    res = run_up(
        tmp_path,
        '[[listeners]]\nname = "w"\nlisten = "127.0.0.1:1"\n'
        '[[listeners.routes]]\nservice = "a"\n[[listeners.routes]]\nservice = "b"\n'
        'balance = "fastest"\n',
    )
    assert res.returncode == 2
    assert "listeners[0].routes[1].balance" in res.stderr
    res = run_up(tmp_path, "[registry]\nlisten = 7470\n")
    assert res.returncode == 2 and "registry.listen" in res.stderr
    res = run_up(tmp_path, "[node\n")
    assert res.returncode == 2 and "not valid TOML" in res.stderr
    res = run_up(tmp_path, "[nodes]\nname = 'x'\n")
    assert res.returncode == 2 and "nodes: unknown key" in res.stderr


def test_busy_port_exits_2(tmp_path: Path) -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        port = s.getsockname()[1]
        res = run_up(
            tmp_path,
            f'[registry]\nlisten = "127.0.0.1:{port}"\n[node]\ndata_dir = "{tmp_path}/d"\n',
        )
    assert res.returncode == 2
    assert f"127.0.0.1:{port}" in res.stderr and "already in use" in res.stderr


def test_sigterm_finishes_in_flight_requests(tmp_path: Path) -> None:
    node = NodeProcess(tmp_path).start()
    node.register("web", "a")
    rev = node.client.get("/v1/services").json()["revision"]
    import threading

    import httpx

    result: dict[str, int] = {}

    def blocking() -> None:
        with httpx.Client(base_url=node.url, timeout=20) as c:
            result["status"] = c.get(f"/v1/services/web?index={rev}&wait=30s").status_code

    t = threading.Thread(target=blocking)
    t.start()
    time.sleep(0.3)
    started = time.monotonic()
    assert node.terminate() == 0
    t.join(10)
    assert result.get("status") == 200  # the in-flight blocking query got its answer
    assert time.monotonic() - started < 5  # not the 30s wait
    assert "node stopped" in node.log()
    node.client.close()


def test_static_services_from_config(tmp_path: Path) -> None:
    extra = (
        '[[services]]\nname = "search"\ninstances = ["127.0.0.1:9001", "127.0.0.1:9002"]\n'
        'tags = ["static"]\n'
    )
    node = NodeProcess(tmp_path, extra_config=extra).start()
    try:
        data = node.client.get("/v1/services/search").json()
        assert [(i["id"], i["port"]) for i in data["instances"]] == [
            ("127-0-0-1-9001", 9001),
            ("127-0-0-1-9002", 9002),
        ]
    finally:
        node.stop()
