"""``interknit agent containers`` against a real engine (Podman's Docker-compatible API) and a
real node: containers start, die, get healthy and unhealthy; the engine and the agent restart;
each time the registry, DNS and the proxy are checked. Registrator's known failures are here:
stale registrations after a restart of the engine or of the agent, missed ``die`` events, the
event stream closing, wrong addresses."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from tests.agent.conftest import Node, wait_until
from tests.agent.podman import Podman
from tests.conftest import require_tool
from tests.nodeproc import INTERKNIT, free_port


@pytest.fixture(scope="module")
def podman(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Podman]:
    binary = require_tool("podman")
    require_tool("runc")
    busybox = require_tool("busybox")
    engine = Podman(tmp_path_factory.mktemp("podman"), binary, busybox)
    try:
        engine.start_service()
        yield engine
    finally:
        engine.close()


class Agent:
    """One real ``interknit agent containers`` process."""

    count = 0

    def __init__(self, node: Node, podman: Podman, workdir: Path, *args: str) -> None:
        Agent.count += 1
        self.log_path = workdir / f"agent-{Agent.count}.log"
        env = {**os.environ, "INTERKNIT_API": node.url}
        env.pop("DOCKER_HOST", None)
        with self.log_path.open("ab") as log:
            self.proc = subprocess.Popen(
                [INTERKNIT, "agent", "containers", "--socket", str(podman.socket), *args],
                stdout=log,
                stderr=subprocess.STDOUT,
                env=env,
            )
        wait_until(lambda: "event=agent.listed" in self.log() or self.proc.poll() is not None)
        assert self.proc.poll() is None, self.log()

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def stop(self, sig: int = signal.SIGTERM) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
        return self.proc.wait(15)


@pytest.fixture
def agents(node: Node, podman: Podman, tmp_path: Path) -> Iterator[object]:
    made: list[Agent] = []

    def start(*args: str) -> Agent:
        agent = Agent(node, podman, tmp_path, "--address", "127.0.0.1", *args)
        made.append(agent)
        return agent

    yield start
    for agent in made:
        with contextlib.suppress(Exception):
            agent.stop(signal.SIGKILL)


@pytest.fixture
def containers(podman: Podman) -> Iterator[list[str]]:
    names: list[str] = []
    yield names
    for name in names:
        podman.cmd("rm", "-f", "-t", "0", name, check=False)


def published(
    podman: Podman, names: list[str], name: str, *args: str, ip: str = "127.0.0.1"
) -> int:
    port = free_port()
    names.append(name)
    podman.run(name, "-p", f"{ip}:{port}:80", *args)
    return port


def ids(node: Node, service: str) -> list[str]:
    return sorted(str(i["id"]) for i in node.instances(service))


def test_containers_are_registered_as_they_start_and_removed_as_they_die(
    node: Node, podman: Podman, agents: object, containers: list[str]
) -> None:
    assert callable(agents)
    metrics = free_port()
    agent = agents("--resync", "500ms", "--host", "h1", "--metrics-listen", f"127.0.0.1:{metrics}")
    port = published(podman, containers, "c-web", "--label", "interknit.service=web")
    wait_until(lambda: node.dns_ports("web") == [port], 10)
    [inst] = node.instances("web")
    assert (inst["address"], inst["port"], inst["id"]) == ("127.0.0.1", port, "h1-c-web-80")
    meta = inst["meta"]
    assert isinstance(meta, dict) and meta["owner"] == "agent:h1"
    assert meta["container_name"] == "c-web"
    assert node.dns_addresses("web") == {"127.0.0.1"}
    r = node.get("web")
    assert (r.status_code, r.text) == (200, "web")
    # Registrator's variables, and its ignore switch.
    compat = published(
        podman, containers, "c-compat", "-e", "SERVICE_NAME=compat", "-e", "SERVICE_TAGS=v1,eu"
    )
    published(
        podman,
        containers,
        "c-ignored",
        "--label",
        "SERVICE_NAME=compat",
        "--label",
        "SERVICE_IGNORE=true",
    )
    wait_until(lambda: node.dns_ports("compat") == [compat], 10)
    [inst] = node.instances("compat")
    assert inst["tags"] == ["v1", "eu"]
    assert node.get("compat").text == "compat"
    # A quiet system: the periodic resyncs write nothing.
    revision = node.revision()
    wait_until(lambda: agent.log().count("event=agent.listed") >= 4, 10)
    assert node.revision() == revision
    # Death: out of the registry, DNS and the proxy at once.
    podman.cmd("kill", "c-web")
    took = wait_until(lambda: not node.instances("web"), 5, every=0.005)
    assert took < 1.0, f"removed {took:.3f}s after podman kill returned"
    wait_until(lambda: node.nxdomain("web"), 2)
    assert node.get("web").status_code == 503
    assert node.dns_ports("compat") == [compat]
    assert agent.proc.poll() is None
    text = httpx.get(f"http://127.0.0.1:{metrics}/metrics", timeout=5).text
    assert 'interknit_agent_writes_total{result="ok",write="register"} 2.0' in text
    assert 'interknit_agent_writes_total{result="ok",write="deregister"} 1.0' in text
    assert 'interknit_agent_engine_events_total{action="die"}' in text
    assert "interknit_agent_engine_connected 1.0" in text
    assert "interknit_agent_registrations_owned 1.0" in text


def test_a_restarted_agent_removes_what_died_meanwhile_and_adds_what_started(
    node: Node, podman: Podman, agents: object, containers: list[str]
) -> None:
    assert callable(agents)
    first = agents("--host", "h2")
    old = published(podman, containers, "c-old", "--label", "interknit.service=gone")
    wait_until(lambda: node.dns_ports("gone") == [old], 10)
    # Someone else's instance of the same service is never the agent's business.
    node.proc.register("gone", "manual", port=1, meta={"owner": "someone"})
    first.stop(signal.SIGKILL)
    podman.cmd("kill", "c-old")
    new = published(podman, containers, "c-new", "--label", "interknit.service=gone")
    assert sorted(int(str(i["port"])) for i in node.instances("gone")) == [1, old]
    agents("--host", "h2")
    wait_until(lambda: ids(node, "gone") == ["h2-c-new-80", "manual"], 10)
    assert sorted(int(str(i["port"])) for i in node.instances("gone")) == [1, new]
    node.api.delete("/v1/services/gone/instances/manual")


def test_the_engine_restarting_closes_the_stream_and_a_die_is_missed(
    node: Node, podman: Podman, agents: object, containers: list[str]
) -> None:
    assert callable(agents)
    agent = agents("--host", "h3")
    port = published(podman, containers, "c-x", "--label", "interknit.service=wide")
    wait_until(lambda: node.dns_ports("wide") == [port], 10)
    podman.stop_service(signal.SIGKILL)  # the engine dies: the event stream breaks
    podman.cmd("kill", "c-x")  # a die nobody streams
    wait_until(lambda: "event=agent.engine_unreachable" in agent.log(), 10)
    assert node.dns_ports("wide") == [port]  # nobody could know yet
    podman.start_service()
    wait_until(lambda: node.nxdomain("wide"), 15)
    assert "event=agent.engine_ok" in agent.log()
    # The new stream carries events again.
    again = published(podman, containers, "c-y", "--label", "interknit.service=wide")
    wait_until(lambda: node.dns_ports("wide") == [again], 10)
    assert node.get("wide").text == "wide"
    assert agent.proc.poll() is None


def test_addresses_are_the_published_ones_or_the_containers_own(
    node: Node, podman: Podman, agents: object, containers: list[str]
) -> None:
    assert callable(agents)
    agents("--host", "h4")
    port = published(
        podman, containers, "c-two", "--label", "interknit.service=health", ip="127.0.0.2"
    )
    wait_until(lambda: node.instances("health"), 10)
    [inst] = node.instances("health")
    assert (inst["address"], inst["port"]) == ("127.0.0.2", port)
    inner = agents("--host", "h4i", "--internal")
    wait_until(lambda: len(node.instances("health")) == 2, 10)
    mine = [i for i in node.instances("health") if str(i["id"]).startswith("h4i-")]
    [inst] = mine
    assert str(inst["address"]).startswith(podman.subnet + ".") and inst["port"] == 80
    inner.stop()
    node.api.delete(f"/v1/services/health/instances/{inst['id']}")


def test_container_health_decides_registration(
    node: Node, podman: Podman, agents: object, containers: list[str]
) -> None:
    assert callable(agents)
    agents("--host", "h5")
    published(
        podman,
        containers,
        "c-h",
        "--label",
        "interknit.service=health",
        "--health-cmd",
        "test -f /tmp/ok",
        "--health-retries",
        "1",
        "--health-interval",
        "1h",  # runs only when the test says (no systemd timers here)
    )
    podman.cmd("healthcheck", "run", "c-h", check=False)  # unhealthy from the start
    wait_until(
        lambda: (
            '"unhealthy"'
            in podman.cmd("inspect", "c-h", "--format", "{{json .State.Health.Status}}")
        )
    )
    assert not [i for i in node.instances("health") if str(i["id"]).startswith("h5-")]
    podman.cmd("exec", "c-h", "touch", "/tmp/ok")
    podman.cmd("healthcheck", "run", "c-h")
    wait_until(lambda: [i for i in node.instances("health") if str(i["id"]) == "h5-c-h-80"], 10)
    podman.cmd("exec", "c-h", "rm", "/tmp/ok")
    podman.cmd("healthcheck", "run", "c-h", check=False)
    wait_until(lambda: not [i for i in node.instances("health") if str(i["id"]) == "h5-c-h-80"], 10)


def test_a_dead_agents_registrations_end_with_their_lease(
    node: Node, podman: Podman, agents: object, containers: list[str]
) -> None:
    assert callable(agents)
    agent = agents("--host", "h6", "--ttl", "500ms", "--deregister-after", "0s")
    port = published(podman, containers, "c-lease", "--label", "interknit.service=compat")
    wait_until(lambda: port in node.dns_ports("compat"), 10)
    # Alive, it renews the lease: still there after three TTLs.
    time.sleep(1.5)
    assert port in node.dns_ports("compat")
    agent.stop(signal.SIGKILL)
    wait_until(lambda: port not in [int(str(i["port"])) for i in node.instances("compat")], 6)


def test_usage_errors_and_an_engine_that_is_not_there(node: Node, tmp_path: Path) -> None:
    env = {**os.environ, "INTERKNIT_API": node.url}
    for args in (
        ("--socket", "ssh://somewhere"),
        ("--network", "front"),  # only with --internal
        ("--address", "0.0.0.0"),
    ):
        res = subprocess.run(
            [INTERKNIT, "agent", "containers", *args],
            capture_output=True,
            text=True,
            env=env,
            timeout=30,
        )
        assert res.returncode == 2, (args, res.stderr)
        assert res.stderr.strip() and "Traceback" not in res.stderr
    # No engine at the socket: the agent says so and waits for one, it does not exit.
    log = tmp_path / "agent.log"
    with log.open("wb") as out:
        proc = subprocess.Popen(
            [INTERKNIT, "agent", "containers", "--socket", str(tmp_path / "none.sock")],
            stdout=out,
            stderr=subprocess.STDOUT,
            env=env,
        )
    try:
        wait_until(lambda: "event=agent.engine_unreachable" in log.read_text(), 10)
        assert proc.poll() is None
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(10) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
