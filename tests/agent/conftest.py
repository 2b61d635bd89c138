"""Plumbing for the agents' tests: one real node with a proxy in front of every service the
tests use, DNS questions, and supervised processes that are always cleaned up."""

from __future__ import annotations

import contextlib
import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import dns.message
import dns.query
import dns.rcode
import httpx
import pytest

from tests.nodeproc import INTERKNIT, NodeProcess, free_port

CHILD = str(Path(__file__).with_name("child.py"))
# Services the tests register; each gets a proxy route /NAME with retries off, so that a
# request sent to an instance on its way out fails instead of being hidden by a retry.
SERVICES = (
    "late",
    "drain",
    "crash",
    "orphan",
    "notify",
    "away",
    "sig",
    "roll",
    "web",
    "compat",
    "gone",
    "health",
    "wide",
)


class Node:
    """The node and its proxy, as the tests use them."""

    def __init__(self, proc: NodeProcess, proxy_port: int) -> None:
        self.proc = proc
        self.url = proc.url
        self.api = proc.client
        self.dns_port = proc.dns_port
        self.proxy = f"http://127.0.0.1:{proxy_port}"

    def instances(self, service: str) -> list[dict[str, object]]:
        r = self.api.get(f"/v1/services/{service}")
        if r.status_code == 404:
            return []
        r.raise_for_status()
        return list(r.json()["instances"])

    def instance(self, service: str, iid: str) -> dict[str, object] | None:
        r = self.api.get(f"/v1/services/{service}/instances/{iid}")
        return None if r.status_code == 404 else dict(r.json())

    def revision(self) -> int:
        return int(self.api.get("/v1/services").json()["revision"])

    def srv(self, service: str) -> dns.message.Message:
        query = dns.message.make_query(f"_{service}._tcp.ik.internal.", "SRV")
        return dns.query.udp(query, "127.0.0.1", port=self.dns_port, timeout=2)

    def dns_ports(self, service: str) -> list[int]:
        answer = self.srv(service)
        return sorted(rr.port for rrset in answer.answer for rr in rrset if hasattr(rr, "port"))

    def dns_addresses(self, service: str) -> set[str]:
        query = dns.message.make_query(f"{service}.ik.internal.", "A")
        answer = dns.query.udp(query, "127.0.0.1", port=self.dns_port, timeout=2)
        return {rr.address for rrset in answer.answer for rr in rrset if hasattr(rr, "address")}

    def nxdomain(self, service: str) -> bool:
        return self.srv(service).rcode() == dns.rcode.NXDOMAIN

    def get(self, service: str, timeout: float = 5.0) -> httpx.Response:
        return httpx.get(f"{self.proxy}/{service}", timeout=timeout)


def proxy_config(port: int) -> str:
    routes = "".join(
        f"""
[[listeners.routes]]
match = {{ path_prefix = "/{name}" }}
service = "{name}"
retries = {{ attempts = 0 }}
"""
        for name in SERVICES
    )
    return f"""
[[listeners]]
name = "web"
listen = "127.0.0.1:{port}"
{routes}
"""


@pytest.fixture(scope="package")
def node(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Node]:
    workdir = tmp_path_factory.mktemp("agent-node")
    port = free_port()
    proc = NodeProcess(workdir, extra_config=proxy_config(port)).start()
    try:
        yield Node(proc, port)
    finally:
        proc.stop()


def wait_until(fn: object, timeout: float = 10.0, every: float = 0.01) -> float:
    """Poll ``fn`` until it is true; the seconds it took."""
    assert callable(fn)
    start = time.monotonic()
    while time.monotonic() - start < timeout:
        with contextlib.suppress(httpx.HTTPError):
            if fn():
                return time.monotonic() - start
        time.sleep(every)
    raise AssertionError(f"condition not reached within {timeout}s")


class Supervised:
    """One real ``interknit run`` process."""

    count = 0

    def __init__(
        self,
        node: Node | str,
        workdir: Path,
        service: str,
        command: list[str],
        *args: str,
        env: dict[str, str] | None = None,
    ) -> None:
        Supervised.count += 1
        self.service = service
        self.log_path = workdir / f"run-{service}-{Supervised.count}.log"
        url = node if isinstance(node, str) else node.url
        full_env = {**os.environ, "INTERKNIT_API": url, **(env or {})}
        with self.log_path.open("ab") as log:
            self.proc = subprocess.Popen(
                [INTERKNIT, "run", "--service", service, *args, "--", *command],
                stdout=log,
                stderr=subprocess.STDOUT,
                env=full_env,
                cwd=workdir,
            )

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def child_pid(self, timeout: float = 10.0) -> int:
        found: list[int] = []

        def started() -> bool:
            m = re.search(r"event=run.started pid=(\d+)", self.log())
            if m:
                found.append(int(m.group(1)))
            return bool(m)

        wait_until(started, timeout)
        return found[0]

    def instance_id(self, timeout: float = 10.0) -> str:
        found: list[str] = []

        def registered() -> bool:
            m = re.search(r"msg=\"register: [a-z0-9-]+/([a-z0-9-]+)\"", self.log())
            if m:
                found.append(m.group(1))
            return bool(m)

        wait_until(registered, timeout)
        return found[0]

    def signal(self, sig: int) -> None:
        self.proc.send_signal(sig)

    def wait(self, timeout: float = 20.0) -> int:
        return self.proc.wait(timeout)

    def cleanup(self) -> None:
        """Leave nothing running: the supervisor and its child's process group."""
        pid = None
        with contextlib.suppress(AssertionError, OSError):
            m = re.search(r"event=run.started pid=(\d+)", self.log())
            pid = int(m.group(1)) if m else None
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)
        if pid is not None:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(pid, signal.SIGKILL)


@pytest.fixture
def supervise(tmp_path: Path) -> Iterator[object]:
    made: list[Supervised] = []

    def start(
        node: Node | str, service: str, command: list[str], *args: str, **kw: object
    ) -> Supervised:
        s = Supervised(node, tmp_path, service, command, *args, **kw)  # type: ignore[arg-type]
        made.append(s)
        return s

    yield start
    for s in made:
        s.cleanup()


def child(name: str, *args: str) -> list[str]:
    return [sys.executable, CHILD, name, *args]
