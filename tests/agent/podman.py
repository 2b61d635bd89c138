"""A private Podman for tests: its own storage, runtime directory, locks, network and API
socket, so that it shares nothing with another run on the same machine, and leaves nothing
behind (containers, the service, the bridge) even when a test fails.

Podman's Docker-compatible API (``podman system service``) is the engine the container agent
is tested against. The image is busybox, imported from the local ``busybox-static`` binary: no
image registry is reachable from these machines.
"""

from __future__ import annotations

import contextlib
import json
import os
import random
import shutil
import signal
import socket
import subprocess
import time
from pathlib import Path

IMAGE = "localhost/ik-bb:1"
PAGES = ("index.html", "web", "compat", "gone", "health", "wide")


def image_tar(workdir: Path, busybox: str) -> Path:
    """The test image's root as a tar for ``import``: busybox, its httpd and a few pages."""
    root = workdir / "image"
    (root / "bin").mkdir(parents=True)
    (root / "www").mkdir()
    (root / "tmp").mkdir()
    shutil.copy(busybox, root / "bin" / "busybox")
    for tool in ("httpd", "sh", "test", "touch", "rm", "sleep", "true"):
        (root / "bin" / tool).symlink_to("busybox")
    for page in PAGES:
        (root / "www" / page).write_text(page)
    tar = workdir / "bb.tar"
    subprocess.run(["tar", "-C", str(root), "-cf", str(tar), "."], check=True)
    return tar


def _used_prefixes() -> set[str]:
    out = subprocess.run(["ip", "-4", "-o", "addr"], capture_output=True, text=True).stdout
    out += subprocess.run(["ip", "-4", "route"], capture_output=True, text=True).stdout
    return {".".join(word.split(".")[:3]) for word in out.split() if word.startswith("10.")}


def free_prefix(rng: random.Random) -> str:
    """A 10.X.Y prefix (a /24) no interface or route of this machine uses."""
    used = _used_prefixes()
    while True:
        prefix = f"10.{rng.randint(64, 250)}.{rng.randint(0, 255)}"
        if prefix not in used:
            return prefix


class EngineService:
    """What an engine's API service is to a test or a benchmark: a process, its socket, its
    log (Podman here, Docker in bench/dockerd.py)."""

    socket: Path
    service: subprocess.Popen[bytes] | None
    service_log: Path
    env: dict[str, str]

    def run_cli(self, argv: list[str], check: bool) -> str:
        """The engine's command line; its output, stripped (a failure raises if ``check``)."""
        res = subprocess.run(argv, capture_output=True, text=True, env=self.env, timeout=60)
        if check and res.returncode != 0:
            raise RuntimeError(f"{' '.join(argv)}: {res.returncode}\n{res.stderr}")
        return res.stdout.strip()

    def wait_ready(self, what: str, timeout: float) -> None:
        assert self.service is not None
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.ping():
                return
            assert self.service.poll() is None, self.service_log.read_text()
            time.sleep(0.05)
        raise RuntimeError(f"{what} did not answer /_ping")

    def ping(self) -> bool:
        try:
            with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
                s.settimeout(2)
                s.connect(str(self.socket))
                s.sendall(b"GET /_ping HTTP/1.1\r\nHost: d\r\nConnection: close\r\n\r\n")
                return s.recv(64).startswith(b"HTTP/1.1 200")
        except OSError:
            return False

    def stop_service(self, sig: int = signal.SIGTERM, timeout: float = 15.0) -> None:
        if self.service is not None and self.service.poll() is None:
            self.service.send_signal(sig)
            try:
                self.service.wait(timeout)
            except subprocess.TimeoutExpired:
                self.service.kill()
                self.service.wait(5)
        self.service = None


class Podman(EngineService):
    def __init__(self, workdir: Path, podman: str, busybox: str) -> None:
        self.dir = workdir
        self.podman = podman
        self.socket = workdir / "pm.sock"
        self.service = None
        self.service_log = workdir / "service.log"
        rng = random.Random()
        prefix = free_prefix(rng)
        self.subnet = prefix
        self.network = f"ik{os.getpid() % 100000}{rng.randint(0, 99)}"
        netdir = workdir / "networks"
        netdir.mkdir(parents=True)
        (netdir / f"{self.network}.json").write_text(
            json.dumps(
                {
                    "name": self.network,
                    "id": os.urandom(32).hex(),
                    "driver": "bridge",
                    "network_interface": self.network,  # at most 15 characters
                    "created": "2026-01-01T00:00:00Z",
                    "subnets": [{"subnet": f"{prefix}.0/24", "gateway": f"{prefix}.1"}],
                    "ipv6_enabled": False,
                    "internal": False,
                    "dns_enabled": False,
                    "ipam_options": {"driver": "host-local"},
                }
            )
        )
        self.conf = workdir / "containers.conf"
        self.conf.write_text(
            f"""
[containers]
default_ulimits = ["nofile=1024:1024", "nproc=1024:1024"]

[engine]
runtime = "runc"
cgroup_manager = "cgroupfs"
events_logger = "file"
lock_type = "file"
tmp_dir = "{workdir}/tmp"

[network]
network_backend = "netavark"
network_config_dir = "{netdir}"
"""
        )
        self.env = {**os.environ, "CONTAINERS_CONF": str(self.conf)}
        self.cmd("import", "-q", str(image_tar(workdir, busybox)), IMAGE)

    def cmd(self, *args: str, check: bool = True) -> str:
        return self.run_cli(
            [
                self.podman,
                "--root",
                str(self.dir / "root"),
                "--runroot",
                str(self.dir / "runroot"),
                "--storage-driver",
                "vfs",
                *args,
            ],
            check,
        )

    # ------------------------------------------------------------------ the API service

    def start_service(self) -> None:
        with contextlib.suppress(FileNotFoundError):
            self.socket.unlink()
        with self.service_log.open("ab") as log:
            self.service = subprocess.Popen(
                [
                    self.podman,
                    "--root",
                    str(self.dir / "root"),
                    "--runroot",
                    str(self.dir / "runroot"),
                    "--storage-driver",
                    "vfs",
                    "system",
                    "service",
                    "--time=0",
                    f"unix://{self.socket}",
                ],
                stdout=log,
                stderr=subprocess.STDOUT,
                env=self.env,
            )
        self.wait_ready("podman system service", 30)

    # ------------------------------------------------------------------ containers

    def run(self, name: str, *args: str, cmd: tuple[str, ...] = ()) -> str:
        command = cmd or ("/bin/httpd", "-f", "-p", "80", "-h", "/www")
        return self.cmd(
            "run", "-d", "--name", name, "--network", self.network, *args, IMAGE, *command
        )

    def close(self) -> None:
        """Leave nothing running: containers (and with them their bridge), the service."""
        with contextlib.suppress(Exception):
            self.cmd("rm", "-f", "-a", "-t", "0", check=False)
        self.stop_service()
        with contextlib.suppress(Exception):
            self.cmd("network", "rm", "-f", self.network, check=False)
        subprocess.run(["ip", "link", "delete", self.network], capture_output=True)
