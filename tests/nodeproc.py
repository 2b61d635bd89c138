"""Run the real ``interknit up`` process for integration tests."""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx

INTERKNIT = str(Path(sys.executable).with_name("interknit"))


def wait_for(fn: Callable[[], bool], timeout: float = 15.0) -> None:
    """Poll ``fn`` until it is true; a node that is restarting (an HTTP error) counts as no."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with contextlib.suppress(httpx.HTTPError):
            if fn():
                return
        time.sleep(0.03)
    raise AssertionError("condition not reached")


def free_port(kind: int = socket.SOCK_STREAM) -> int:
    """A port that is free for both TCP and UDP right now."""
    for _ in range(50):
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as tcp:
            tcp.bind(("127.0.0.1", 0))
            port = int(tcp.getsockname()[1])
            try:
                with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as udp:
                    udp.bind(("127.0.0.1", port))
            except OSError:
                continue
            return port
    raise RuntimeError("no free port")


class NodeProcess:
    """One ``interknit up`` with its own data directory and ports."""

    def __init__(
        self,
        workdir: Path,
        extra_config: str = "",
        name: str = "node-1",
        registry_config: str = "",
    ) -> None:
        self.workdir = workdir
        self.api_port = free_port()
        self.dns_port = free_port()
        self.url = f"http://127.0.0.1:{self.api_port}"
        self.config_path = workdir / f"{name}.toml"
        self.data_dir = workdir / f"{name}-data"
        self.log_path = workdir / f"{name}.log"
        self.config_path.write_text(
            f"""
[node]
name = "{name}"
data_dir = "{self.data_dir}"

[registry]
listen = "127.0.0.1:{self.api_port}"
{registry_config}

[dns]
listen = "127.0.0.1:{self.dns_port}"
{extra_config}
"""
        )
        self.proc: subprocess.Popen[bytes] | None = None
        self.client = httpx.Client(base_url=self.url, timeout=10)

    def start(self, wait: bool = True, args: tuple[str, ...] = ()) -> NodeProcess:
        log = self.log_path.open("ab")
        self.proc = subprocess.Popen(
            [INTERKNIT, "up", "-c", str(self.config_path), *args],
            stdout=log,
            stderr=subprocess.STDOUT,
            cwd=self.workdir,
        )
        if wait:
            self.wait_ready()
        return self

    def wait_ready(self, timeout: float = 15.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            assert self.proc is not None
            if self.proc.poll() is not None:
                raise RuntimeError(f"node exited with {self.proc.returncode}:\n{self.log()}")
            with contextlib.suppress(httpx.HTTPError):
                if self.client.get("/v1/health").status_code == 200:
                    return
            time.sleep(0.05)
        raise RuntimeError(f"node did not become ready:\n{self.log()}")

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def kill9(self) -> None:
        assert self.proc is not None
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(10)

    def terminate(self, timeout: float = 15.0) -> int:
        assert self.proc is not None
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        return self.proc.wait(timeout)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)
        self.client.close()

    def cli(
        self, *args: str, env: dict[str, str] | None = None
    ) -> subprocess.CompletedProcess[str]:
        full_env = {**os.environ, "INTERKNIT_API": self.url, **(env or {})}
        return subprocess.run(
            [INTERKNIT, *args], capture_output=True, text=True, env=full_env, timeout=30
        )

    def register(self, service: str, iid: str, **body: Any) -> httpx.Response:
        body.setdefault("address", "127.0.0.1")
        body.setdefault("port", 8080)
        return self.client.put(f"/v1/services/{service}/instances/{iid}", json=body)


@contextlib.contextmanager
def running_node(
    workdir: Path, extra_config: str = "", name: str = "node-1"
) -> Iterator[NodeProcess]:
    node = NodeProcess(workdir, extra_config, name).start()
    try:
        yield node
    finally:
        node.stop()
