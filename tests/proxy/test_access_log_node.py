"""The access log in the real node: files, stdout, "off", JSON lines, logrotate's SIGUSR1, a
reload that names a file it cannot open, and workers sharing one file."""

from __future__ import annotations

import json
import signal
import socket
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.backends import Backend
from tests.nodeproc import INTERKNIT, NodeProcess, free_port, wait_for


@pytest.fixture
def backend() -> Iterator[Backend]:
    b = Backend("b0")
    yield b
    b.close()


def listeners(ports: dict[str, int], backend: int, log: Path, web_log: Path | str) -> str:
    return f"""
[[listeners]]
name = "web"
listen = "127.0.0.1:{ports["web"]}"
access_log = "{web_log}"

[[listeners.routes]]
match = {{ path_prefix = "/known" }}
servers = ["127.0.0.1:{backend}"]
name = "known"

[[listeners.routes]]
match = {{ path_prefix = "/svc" }}
service = "empty"

[[listeners]]
name = "quiet"
listen = "127.0.0.1:{ports["quiet"]}"
access_log = "off"

[[listeners.routes]]
servers = ["127.0.0.1:{backend}"]

[[listeners]]
name = "stdout"
listen = "127.0.0.1:{ports["stdout"]}"

[[listeners.routes]]
servers = ["127.0.0.1:{backend}"]

[[listeners]]
name = "relay"
listen = "127.0.0.1:{ports["relay"]}"
protocol = "tcp"
access_log = "{log}"

[[listeners.routes]]
servers = ["127.0.0.1:{backend}"]
"""


def records(path: Path) -> list[dict[str, Any]]:
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines()]


def through_relay(port: int) -> bytes:
    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
        sock.sendall(b"GET /relayed HTTP/1.1\r\nHost: a\r\nConnection: close\r\n\r\n")
        data = b""
        while chunk := sock.recv(65536):
            data += chunk
    return data


def test_access_logs_of_a_node(tmp_path: Path, backend: Backend) -> None:
    ports = {name: free_port() for name in ("web", "quiet", "stdout", "relay")}
    log = tmp_path / "access.log"
    extra = listeners(ports, backend.port, log, log)
    node = NodeProcess(tmp_path, extra_config=extra).start(args=("--log-json",))
    assert node.proc is not None
    try:
        sizes = {}
        with httpx.Client(timeout=10) as client:
            for target in ("/known/a?b=c", "/svc/x", "/nope"):
                r = client.get(f"http://127.0.0.1:{ports['web']}{target}")
                sizes[target] = (r.status_code, len(r.content))
            assert client.get(f"http://127.0.0.1:{ports['quiet']}/quiet").status_code == 200
            assert client.get(f"http://127.0.0.1:{ports['stdout']}/out").status_code == 200
        relayed = through_relay(ports["relay"])
        assert relayed.startswith(b"HTTP/1.1 200")
        # Written within a second (the batch's age limit), though far from 64 KiB.
        wait_for(lambda: len(records(log)) == 4)
        got = {r.get("target", "<tcp>"): r for r in records(log)}
        for target, (status, size) in sizes.items():
            line = got[target]
            assert (line["listener"], line["method"]) == ("web", "GET"), line
            assert line["status"] == status and line["bytes_out"] == size > 0, line
            assert line["client"] == "127.0.0.1" and isinstance(line["duration_ms"], float)
            assert line["retries"] == 0 and line["bytes_in"] == 0
        known = got["/known/a?b=c"]
        assert known["route"] == "known" and known["endpoint"] == f"127.0.0.1:{backend.port}"
        assert known["reason"] is None and known["request_id"]  # the id sent upstream
        assert (got["/svc/x"]["status"], got["/svc/x"]["reason"]) == (503, "no-endpoint")
        assert (got["/nope"]["route"], got["/nope"]["reason"]) == (None, "no-route")
        tcp = got["<tcp>"]
        assert tcp["listener"] == "relay" and tcp["status"] == 200
        assert tcp["bytes_out"] == len(relayed) and tcp["bytes_in"] > 0
        # "-" is stdout (the node's log file here); "off" writes nowhere, not a file "off".
        wait_for(lambda: '"target":"/out"' in node.log())
        assert not (tmp_path / "off").exists()
        assert "/quiet" not in node.log() and "/quiet" not in log.read_text()

        # logrotate: rename, SIGUSR1, and the node writes a new file.
        log.rename(tmp_path / "access.log.1")
        node.proc.send_signal(signal.SIGUSR1)
        wait_for(lambda: "access logs reopened" in node.log())
        httpx.get(f"http://127.0.0.1:{ports['web']}/known/after", timeout=10)
        wait_for(lambda: len(records(log)) == 1)
        assert records(log)[0]["target"] == "/known/after"
        assert len(records(tmp_path / "access.log.1")) == 4

        # A reload naming a file that cannot be opened changes nothing.
        bad = tmp_path / "missing" / "web.log"
        node.config_path.write_text(
            node.config_path.read_text().replace(
                f'access_log = "{log}"', f'access_log = "{bad}"', 1
            )
        )
        node.proc.send_signal(signal.SIGHUP)
        wait_for(lambda: "listeners[0].access_log: cannot open" in node.log())
        httpx.get(f"http://127.0.0.1:{ports['web']}/known/still", timeout=10)
        assert node.terminate() == 0  # the drain writes what waits
        assert [r["target"] for r in records(log)] == ["/known/after", "/known/still"]
    finally:
        node.stop()


def test_workers_append_whole_lines_to_one_file(tmp_path: Path, backend: Backend) -> None:
    port = free_port()
    log = tmp_path / "access.log"
    extra = f"""
[[listeners]]
name = "web"
listen = "127.0.0.1:{port}"
access_log = "{log}"

[[listeners.routes]]
servers = ["127.0.0.1:{backend.port}"]
"""
    node = NodeProcess(tmp_path, extra_config=extra).start(args=("--workers", "2"))
    assert node.proc is not None
    sent = 0

    def served_by_node() -> float:
        return sum(
            float(line.rsplit(" ", 1)[1])
            for line in node.client.get("/metrics").text.splitlines()
            if line.startswith("interknit_proxy_requests_total{") and 'listener="web"' in line
        )

    def until_the_worker_served_some(at_least: int) -> list[str]:
        """Requests (a connection each, so that the kernel spreads them over both processes'
        sockets) until the worker has served some of them; their targets."""
        nonlocal sent
        first, by_node = sent, served_by_node()
        while sent - first < at_least or served_by_node() - by_node == sent - first:
            assert sent - first < 5000, "the worker never took a connection"
            for _ in range(50):
                with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
                    sock.sendall(
                        b"GET /r%d HTTP/1.1\r\nHost: a\r\nConnection: close\r\n\r\n" % sent
                    )
                    answer = b""
                    while chunk := sock.recv(65536):
                        answer += chunk
                assert answer.startswith(b"HTTP/1.1 200"), answer
                sent += 1
        return [f"target=/r{i}" for i in range(first, sent)]

    try:
        before = until_the_worker_served_some(200)
        # logrotate: both processes write what waits to the renamed file, then open a new one.
        log.rename(tmp_path / "access.log.1")
        node.proc.send_signal(signal.SIGUSR1)
        wait_for(lambda: node.log().count("access logs reopened") == 2)
        after = until_the_worker_served_some(50)
        assert node.terminate() == 0
    finally:
        node.stop()
    # Every request once, whichever process served it, each line whole, in its file.
    old = (tmp_path / "access.log.1").read_text().splitlines()
    new = log.read_text().splitlines()
    assert sorted(line.split()[5] for line in old) == sorted(before)
    assert sorted(line.split()[5] for line in new) == sorted(after)
    keys = [[pair.partition("=")[0] for pair in line.split(" ")] for line in old + new]
    assert all(k == keys[0] and len(k) == 14 for k in keys)


def test_an_access_log_that_cannot_be_opened_stops_the_start(tmp_path: Path) -> None:
    config = tmp_path / "interknit.toml"
    config.write_text(
        f"""
[node]
data_dir = "{tmp_path}/data"
[registry]
listen = "127.0.0.1:{free_port()}"
[dns]
enabled = false

[[listeners]]
name = "web"
listen = "127.0.0.1:{free_port()}"
access_log = "{tmp_path}/no/such/dir/web.log"

[[listeners.routes]]
servers = ["127.0.0.1:9"]
"""
    )
    result = subprocess.run(
        [INTERKNIT, "up", "-c", str(config)], capture_output=True, text=True, timeout=30
    )
    assert result.returncode == 2, result.stderr
    assert "listeners[0].access_log: cannot open" in result.stderr
    assert "no such file or directory" in result.stderr
