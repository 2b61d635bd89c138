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
import sysconfig
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
    return (
        f"{os.cpu_count()} cores, {cpu}, Python {platform.python_version()} ({interpreter()}), "
        f"{platform.system()}"
    )


def interpreter() -> str:
    """Which build of Python runs (the node is started from the same environment): a
    distribution's python3 (Debian's is one static executable) spends less per Python call than
    pyenv's default build (a shared libpython, without ``--enable-optimizations``)."""
    maps = ""
    with contextlib.suppress(OSError):
        maps = Path("/proc/self/maps").read_text()
    build = "shared libpython" if "libpython" in maps else "libpython linked in"
    if "--enable-optimizations" in (sysconfig.get_config_var("CONFIG_ARGS") or ""):
        build += ", --enable-optimizations"
    return f"{os.path.realpath(sys.executable)}, {build}"


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


def free_udp_tcp_port() -> int:
    """A port free for both UDP and TCP right now (a DNS server binds both)."""
    for _ in range(50):
        port = free_port()
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as udp:
            try:
                udp.bind(("127.0.0.1", port))
            except OSError:
                continue
        return port
    raise RuntimeError("no port free for both UDP and TCP")


@contextlib.contextmanager
def interknit_node(
    extra: str = "",
    registry_extra: str = "",
    *,
    dns_port: int | None = None,
    prefix: Sequence[str] = (),
) -> Iterator[str]:
    """A node on free ports in a temporary directory; yields its API URL.

    ``dns_port`` fixes the DNS port (else any free one); ``prefix`` goes before the command,
    e.g. ``["taskset", "-c", "0"]`` to pin the node to a core.
    """
    with interknit_process(extra, registry_extra, dns_port=dns_port, prefix=prefix) as (url, _proc):
        yield url


@contextlib.contextmanager
def interknit_process(
    extra: str = "",
    registry_extra: str = "",
    *,
    dns_port: int | None = None,
    prefix: Sequence[str] = (),
    options: Sequence[str] = (),
) -> Iterator[tuple[str, subprocess.Popen[bytes]]]:
    """``interknit_node``, also yielding the node's process (for its pid and memory).

    ``options`` go after ``up -c FILE``, e.g. ``["--log-level", "warning"]``. With a
    ``prefix`` that execs (``taskset``, ``nice``) the process is the node itself.
    """
    with tempfile.TemporaryDirectory(prefix="ik-bench-") as tmp:
        api = free_port()
        dns = free_port() if dns_port is None else dns_port
        cfg = Path(tmp) / "interknit.toml"
        cfg.write_text(
            f'[node]\ndata_dir = "{tmp}/data"\n[registry]\nlisten = "127.0.0.1:{api}"\n'
            f'{registry_extra}\n[dns]\nlisten = "127.0.0.1:{dns}"\n{extra}\n'
        )
        args = [*prefix, INTERKNIT, "up", "-c", str(cfg), *options]
        with process(args, cwd=Path(tmp), log=Path(tmp) / "log") as proc:
            url = f"http://127.0.0.1:{api}"
            wait_http(url + "/v1/health")
            yield url, proc


def cpu_seconds(pid: int) -> float:
    """User + system time of process ``pid`` (all its threads) so far, in seconds."""
    stat = Path(f"/proc/{pid}/stat").read_text()
    fields = stat[stat.rindex(")") + 2 :].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def rss_kib(pid: int) -> int:
    """Resident memory of a process (VmRSS), in KiB."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise RuntimeError(f"no VmRSS for pid {pid}")


@contextlib.contextmanager
def etcd_member() -> Iterator[str]:
    """A single-member etcd on free ports; yields host:port of its client URL."""
    with etcd_process() as (endpoint, _proc):
        yield endpoint


@contextlib.contextmanager
def etcd_process() -> Iterator[tuple[str, subprocess.Popen[bytes]]]:
    """``etcd_member``, also yielding etcd's process (for its CPU time)."""
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
        with process(args, log=Path(tmp) / "log") as proc:
            wait_http(f"http://127.0.0.1:{client}/health")
            yield f"127.0.0.1:{client}", proc


def wait_port(
    port: int,
    host: str = "127.0.0.1",
    timeout: float = 15.0,
    proc: subprocess.Popen[bytes] | None = None,
) -> None:
    """Wait until something accepts TCP connections on ``host:port`` (and ``proc`` lives)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"{proc.args!r} exited with status {proc.returncode}")
        with contextlib.suppress(OSError), socket.create_connection((host, port), timeout=1):
            return
        time.sleep(0.05)
    raise RuntimeError(f"nothing listens on {host}:{port}")


def require_binary(name: str, hint: str) -> str:
    path = shutil.which(name)
    if path is None:
        raise SystemExit(f"{name} is not installed ({hint})")
    return path


@contextlib.contextmanager
def haproxy(config: str, port: int) -> Iterator[Path]:
    """HAProxy in the foreground on ``config`` (``{dir}`` in it is replaced by a temporary
    directory, for a stats socket); waits for ``port`` and yields the directory."""
    binary = require_binary("haproxy", "apt-get install haproxy")
    with tempfile.TemporaryDirectory(prefix="haproxy-bench-") as tmp:
        cfg = Path(tmp) / "haproxy.cfg"
        cfg.write_text(config.replace("{dir}", tmp))
        log = Path(tmp) / "log"
        with process([binary, "-db", "-f", str(cfg)], log=log) as proc:
            try:
                wait_port(port, proc=proc)
            except RuntimeError as exc:
                raise RuntimeError(f"haproxy did not start: {log.read_text()}") from exc
            yield Path(tmp)


@contextlib.contextmanager
def nginx(http_block: str, port: int) -> Iterator[Path]:
    """nginx in the foreground, one worker, with ``http_block`` as the body of its ``http {}``;
    waits for ``port`` and yields its temporary prefix directory."""
    binary = require_binary("nginx", "apt-get install nginx")
    with tempfile.TemporaryDirectory(prefix="nginx-bench-") as tmp:
        cfg = Path(tmp) / "nginx.conf"
        temps = "".join(
            f"{kind}_temp_path {tmp}/{kind};\n"
            for kind in ("client_body", "proxy", "fastcgi", "uwsgi", "scgi")
        )
        cfg.write_text(
            f"worker_processes 1;\nworker_rlimit_nofile 20000;\npid {tmp}/nginx.pid;\n"
            f"error_log {tmp}/error.log warn;\nevents {{ worker_connections 16384; }}\n"
            f"http {{\naccess_log off;\n{temps}{http_block}\n}}\n"
        )
        args = [binary, "-p", tmp, "-c", str(cfg), "-e", f"{tmp}/error.log", "-g", "daemon off;"]
        with process(args, log=Path(tmp) / "log") as proc:
            try:
                wait_port(port, proc=proc)
            except RuntimeError as exc:
                log = (Path(tmp) / "error.log").read_text()
                raise RuntimeError(f"nginx did not start: {log}") from exc
            yield Path(tmp)
