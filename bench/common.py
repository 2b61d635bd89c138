"""Shared plumbing for the side-by-side benchmarks: free ports, processes, percentiles."""

from __future__ import annotations

import contextlib
import os
import platform
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Iterator, Sequence
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
INTERKNIT = str(Path(sys.executable).with_name("interknit"))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def percentile(values: Sequence[float], q: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    index = min(len(ordered) - 1, max(0, round(q / 100 * (len(ordered) - 1))))
    return ordered[index]


def median(values: Sequence[float]) -> float:
    return percentile(values, 50)


def machine() -> str:
    cpu = "unknown cpu"
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    return f"{os.cpu_count()} cores, {cpu}, Python {platform.python_version()}, {platform.system()}"


def wait_http(url: str, timeout: float = 15.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with contextlib.suppress(OSError), urllib.request.urlopen(url, timeout=1) as r:
            if r.status < 500:
                return
        time.sleep(0.05)
    raise RuntimeError(f"{url} did not come up")


@contextlib.contextmanager
def process(
    args: list[str], cwd: Path | None = None, log: Path | None = None
) -> Iterator[subprocess.Popen[bytes]]:
    out = open(log, "wb") if log else subprocess.DEVNULL  # noqa: SIM115
    proc = subprocess.Popen(args, cwd=cwd, stdout=out, stderr=subprocess.STDOUT)
    try:
        yield proc
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


@contextlib.contextmanager
def interknit_node(extra: str = "", registry_extra: str = "") -> Iterator[str]:
    """A node on free ports in a temporary directory; yields its API URL."""
    with tempfile.TemporaryDirectory(prefix="ik-bench-") as tmp:
        api = free_port()
        cfg = Path(tmp) / "interknit.toml"
        cfg.write_text(
            f'[node]\ndata_dir = "{tmp}/data"\n[registry]\nlisten = "127.0.0.1:{api}"\n'
            f'{registry_extra}\n[dns]\nlisten = "127.0.0.1:{free_port()}"\n{extra}\n'
        )
        with process([INTERKNIT, "up", "-c", str(cfg)], cwd=Path(tmp), log=Path(tmp) / "log"):
            url = f"http://127.0.0.1:{api}"
            wait_http(url + "/v1/health")
            yield url


@contextlib.contextmanager
def etcd_member() -> Iterator[str]:
    """A single-member etcd on free ports; yields host:port of its client URL."""
    etcd = shutil.which("etcd")
    if etcd is None:
        raise SystemExit("etcd is not installed (apt-get install etcd-server)")
    with tempfile.TemporaryDirectory(prefix="etcd-bench-") as tmp:
        client, peer = free_port(), free_port()
        args = [
            etcd,
            "--name",
            "bench",
            "--data-dir",
            f"{tmp}/data",
            "--listen-client-urls",
            f"http://127.0.0.1:{client}",
            "--advertise-client-urls",
            f"http://127.0.0.1:{client}",
            "--listen-peer-urls",
            f"http://127.0.0.1:{peer}",
            "--initial-advertise-peer-urls",
            f"http://127.0.0.1:{peer}",
            "--initial-cluster",
            f"bench=http://127.0.0.1:{peer}",
        ]
        with process(args, log=Path(tmp) / "log"):
            wait_http(f"http://127.0.0.1:{client}/health")
            yield f"127.0.0.1:{client}"
