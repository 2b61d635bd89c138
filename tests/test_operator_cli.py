"""What an operator sees from the ``interknit`` command when something is wrong: one sentence,
the right exit status, no traceback; and the small things a new user trips on."""

from __future__ import annotations

import contextlib
import os
import socket
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import click
import httpx
import pytest

from interknit.cli import main
from tests.backends import Backend
from tests.nodeproc import INTERKNIT, NodeProcess, free_port


def interknit(
    *args: str, env: dict[str, str] | None = None, cwd: Path | None = None
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [INTERKNIT, *args],
        capture_output=True,
        text=True,
        env={**os.environ, **(env or {})},
        timeout=60,
        cwd=cwd,
    )


def one_sentence(result: subprocess.CompletedProcess[str]) -> str:
    """The error, checked to be one line on stderr without a traceback."""
    assert "Traceback" not in result.stderr, result.stderr
    lines = [line for line in result.stderr.splitlines() if not line.startswith("ts=")]
    assert len(lines) == 1, result.stderr
    return lines[0]


@pytest.fixture(scope="module")
def node(tmp_path_factory: pytest.TempPathFactory) -> Iterator[NodeProcess]:
    node = NodeProcess(tmp_path_factory.mktemp("cli")).start()
    yield node
    node.stop()


# ------------------------------------------------------------------ item 4: errors


def test_etcd_backend_without_the_extra(tmp_path: Path) -> None:
    # A Python where aetcd cannot be imported, as after "pip install interknit".
    shim = tmp_path / "shim" / "aetcd"
    shim.mkdir(parents=True)
    (shim / "__init__.py").write_text("raise ImportError('No module named aetcd')\n")
    config = tmp_path / "etcd.toml"
    config.write_text(
        f'[node]\ndata_dir = "{tmp_path / "d"}"\n[registry]\nbackend = "etcd"\n'
        f'listen = "127.0.0.1:{free_port()}"\n[dns]\nenabled = false\n'
    )
    env = {"PYTHONPATH": str(tmp_path / "shim")}
    for args in (("up", "-c", str(config)), ("check", "-c", str(config))):
        result = interknit(*args, env=env)
        assert result.returncode == 2, result.stderr
        assert "interknit[etcd]" in one_sentence(result)


def test_api_that_is_not_a_node(node: NodeProcess) -> None:
    html = Backend("<html>not a node</html>")
    missing = Backend("x")
    missing.status = 404
    other_json = Backend("j", body=b'{"ok": true}')
    try:
        for server in (html, missing, other_json):
            url = f"http://127.0.0.1:{server.port}"
            for args in (("services",), ("instances", "web"), ("drain", "web", "w1")):
                result = interknit("--api", url, *args)
                assert result.returncode == 1, (args, result.stderr)
                line = one_sentence(result)
                assert "is it an interknit node?" in line and url in line, line
    finally:
        for server in (html, missing, other_json):
            server.close()


def test_api_without_scheme_is_taken_as_http(node: NodeProcess) -> None:
    hostport = node.url.removeprefix("http://")
    result = interknit("--api", hostport, "services", "--json")
    assert result.returncode == 0, result.stderr
    bad = interknit("--api", "ftp://127.0.0.1:7470", "services")
    assert bad.returncode == 2 and "such as http://127.0.0.1:7470" in bad.stderr
    bad = interknit("--api", "no port here", "services")
    assert bad.returncode == 2 and "such as http://127.0.0.1:7470" in bad.stderr
    # Commands that do not talk to a node do not care.
    ok = interknit("check", "-c", str(node.config_path), env={"INTERKNIT_API": "garbage"})
    assert ok.returncode == 0, ok.stderr


def test_dns_port_busy(tmp_path: Path) -> None:
    busy = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    busy.bind(("127.0.0.1", 0))
    try:
        node = NodeProcess(tmp_path)
        text = node.config_path.read_text()
        port = busy.getsockname()[1]
        node.config_path.write_text(text.replace(f":{node.dns_port}", f":{port}"))
        result = interknit("up", "-c", str(node.config_path))
        assert result.returncode == 2
        line = one_sentence(result)
        assert f"127.0.0.1:{port} for DNS" in line and "address already in use" in line, line
        assert "None" not in line
    finally:
        busy.close()


@contextlib.contextmanager
def unwritable(path: Path) -> Iterator[None]:
    """A directory its owner cannot write into, even as root (immutable)."""
    path.mkdir()
    if os.geteuid() == 0:
        made = subprocess.run(["chattr", "+i", str(path)], capture_output=True)
        if made.returncode != 0:
            pytest.skip(f"chattr +i is not supported here: {made.stderr!r}")
        try:
            yield
        finally:
            subprocess.run(["chattr", "-i", str(path)], check=True)
    else:
        path.chmod(0o500)
        try:
            yield
        finally:
            path.chmod(0o700)


def test_unwritable_data_dir(tmp_path: Path) -> None:
    locked = tmp_path / "locked"
    with unwritable(locked):
        for data_dir in (locked, locked / "below"):
            config = tmp_path / "c.toml"
            config.write_text(
                f'[node]\ndata_dir = "{data_dir}"\n[registry]\n'
                f'listen = "127.0.0.1:{free_port()}"\n[dns]\nenabled = false\n'
            )
            result = interknit("up", "-c", str(config))
            assert result.returncode == 2
            line = one_sentence(result)
            assert str(data_dir) in line and "node.data_dir" in line, line
            assert "permission denied" in line or "operation not permitted" in line, line
            assert "unable to open database file" not in line


# ------------------------------------------------------------------ item 5: addresses


def test_addresses_that_are_not_addresses(node: NodeProcess) -> None:
    result = node.cli("register", "web", "bad", "--address", "999.1.1.1", "--port", "80")
    assert result.returncode == 1 and "address" in one_sentence(result)
    r = node.client.put("/v1/services/web/instances/bad", json={"address": "999.1.1.1", "port": 80})
    assert r.status_code == 400 and "address" in r.text
    assert node.client.get("/v1/services/web/instances/bad").status_code == 404
    result = node.cli("register", "web", "bad", "--address", "127.0.0.1:8080", "--port", "80")
    assert result.returncode == 2
    assert "--address 127.0.0.1 --port 8080" in result.stderr, result.stderr
    r = node.client.put(
        "/v1/services/web/instances/bad", json={"address": "127.0.0.1:8080", "port": 80}
    )
    assert r.status_code == 400 and "'port'" in r.json()["error"], r.text
    # Host names still are (an all-digit label only at the end is refused).
    ok = node.cli("register", "web", "named", "--address", "db1.example.com", "--port", "80")
    assert ok.returncode == 0, ok.stderr
    node.cli("deregister", "web", "named")


# ------------------------------------------------------------------ item 8: stale at start


def test_etcd_down_at_start_answers_at_once_and_says_stale(tmp_path: Path) -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        dead = s.getsockname()[1]
    node = NodeProcess(
        tmp_path, registry_config=f'backend = "etcd"\netcd = ["http://127.0.0.1:{dead}"]'
    )
    node.start(wait=False)
    try:
        started = time.monotonic()
        answered = None
        while time.monotonic() - started < 4.0:
            with contextlib.suppress(httpx.HTTPError):
                answered = node.client.get("/v1/health")
                break
            time.sleep(0.05)
        assert answered is not None, "the API was silent while etcd was down"
        services = node.cli("services")
        assert services.returncode == 1
        assert "has not reached its store" in one_sentence(services)
        listed = node.client.get("/v1/services").json()
        assert listed["stale"] is True
    finally:
        node.stop()


# ------------------------------------------------------------------ item 10: polish


def test_every_option_has_help() -> None:
    missing = []

    def walk(command: click.Command, path: str) -> None:
        if command.hidden:
            return
        for param in command.params:
            if isinstance(param, click.Option) and not param.help:
                missing.append(f"{path} {param.opts[0]}")
        if isinstance(command, click.Group):
            for name, sub in command.commands.items():
                walk(sub, f"{path} {name}")

    walk(main, "interknit")
    assert missing == []


def test_drain_says_how_to_undo(node: NodeProcess) -> None:
    assert "--undo" in interknit("drain", "--help").stdout.split("Options:")[0]
    node.register("web", "w1")
    result = node.cli("drain", "web", "w1")
    assert result.returncode == 0 and "interknit drain web w1 --undo" in result.stdout
    assert "is now passing" in node.cli("drain", "web", "w1", "--undo").stdout


def test_instances_with_none_healthy_fails_and_says_so(node: NodeProcess) -> None:
    node.register("quiet", "q1", check={"ttl": "10s"})
    node.client.put("/v1/services/quiet/instances/q1/health", json={"status": "maintenance"})
    result = node.cli("instances", "quiet", "--healthy")
    assert result.returncode == 1
    assert one_sentence(result) == "interknit: quiet has no passing instance"
    result = node.cli("instances", "nothing-here")
    assert result.returncode == 1 and "'nothing-here' is not registered" in result.stderr
    assert node.cli("instances", "quiet").returncode == 0


def test_check_validates_a_config_without_starting(tmp_path: Path) -> None:
    good = tmp_path / "good.toml"
    port = free_port()
    good.write_text(
        f'[registry]\nlisten = "127.0.0.1:{port}"\n\n[[listeners]]\nname = "web"\n'
        'listen = "127.0.0.1:7480"\n[[listeners.routes]]\nservice = "search"\n'
    )
    result = interknit("check", "-c", str(good), cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert "ok" in result.stdout and "1 listener(s) with 1 route(s)" in result.stdout
    assert not (tmp_path / ".interknit").exists()  # nothing was started or written
    with socket.socket() as probe:  # and nothing listens
        assert probe.connect_ex(("127.0.0.1", port)) != 0
    bad = tmp_path / "bad.toml"
    bad.write_text(good.read_text().replace('service = "search"', 'service = "search"\nbalnce = 1'))
    result = interknit("check", "-c", str(bad))
    assert result.returncode == 2
    assert "listeners[0].routes[0].balnce: unknown key" in one_sentence(result)
    clash = tmp_path / "clash.toml"
    clash.write_text(good.read_text().replace("127.0.0.1:7480", f"127.0.0.1:{port}"))
    result = interknit("check", "-c", str(clash))
    assert result.returncode == 2 and "listeners[0].listen" in one_sentence(result)


# ------------------------------------------------------------------ item 9: logs


def test_registrations_are_logged_at_info(node: NodeProcess) -> None:
    node.register("logged", "l1", port=9100)
    node.client.delete("/v1/services/logged/instances/l1")
    deadline = time.monotonic() + 10
    while "logged/l1 deregistered" not in node.log():
        assert time.monotonic() < deadline, node.log()
        time.sleep(0.05)
    assert "logged/l1 registered (127.0.0.1:9100)" in node.log()


def test_scale_out_tells_each_node_to_change_its_dns_listen() -> None:
    page = (Path(__file__).parent.parent / "docs" / "scale-out.md").read_text()
    assert "`[dns] listen`" in page and "DNS 7455" in page


# ------------------------------------------------------------------ item 7: --workers


def test_workers_warn_that_demand_limits_are_per_process(tmp_path: Path) -> None:
    port = free_port()
    extra = f"""
[[listeners]]
name = "web"
listen = "127.0.0.1:{port}"

[[listeners.routes]]
service = "api"
demand = {{ rate = "100/s" }}
"""
    node = NodeProcess(tmp_path, extra_config=extra).start(args=("--workers", "2"))
    try:
        assert "demand limits are per process: with --workers 2" in node.log()
        assert "listeners[0].routes[0]" in node.log()
    finally:
        node.stop()


# ------------------------------------------------------------------ item 10: refusal bodies


def test_demand_docs_show_the_refusal_the_proxy_sends() -> None:
    from interknit.proxy.wire import error_response

    page = (Path(__file__).parent.parent / "docs" / "demand.md").read_text()
    block = page.split("```text\n", 1)[1].split("```", 1)[0]
    head, body = block.split("\n\n", 1)
    sent = error_response(429, "rate", retry_after=1).decode()
    sent_head, sent_body = sent.split("\r\n\r\n", 1)
    assert body == sent_body
    sent_lines = sent_head.split("\r\n")
    lines = head.split("\n")
    assert lines[0] == sent_lines[0]
    assert set(lines[1:]) <= set(sent_lines[1:])


def test_license_is_an_spdx_expression() -> None:
    """setuptools warns on every install about license = { text = ... } (deprecated)."""
    import tomllib

    project = tomllib.loads((Path(__file__).parent.parent / "pyproject.toml").read_text())
    assert project["project"]["license"] == "Apache-2.0"
    assert "setuptools>=77" in project["build-system"]["requires"]
