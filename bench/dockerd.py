"""A private Docker Engine for ``bench/agent.py --engine docker``: its own data root, runtime
directory, socket and bridge, the same busybox image and the same methods as the tests'
Podman (``tests/agent/podman.py``), so that the container benchmark can measure the agent
against an engine that sends its events at once.

The binaries are Debian's ``docker.io`` and ``containerd`` packages; they need not be
installed: ``apt-get download docker.io containerd`` and ``dpkg-deb -x`` of both into a
folder give ``usr/bin/dockerd``, ``containerd``, ``containerd-shim-runc-v2`` and
``docker-proxy`` (``--docker-bin`` names that ``usr/bin``). runc and the docker CLI come from
the machine. dockerd runs with ``--iptables=false`` (published ports go through its userland
proxy) on a bridge of its own, and leaves nothing behind.
"""

from __future__ import annotations

import contextlib
import os
import random
import shutil
import subprocess
from pathlib import Path

from tests.agent.podman import IMAGE, EngineService, free_prefix, image_tar


class Docker(EngineService):
    def __init__(self, workdir: Path, bindir: Path, docker: str, busybox: str) -> None:
        self.dir = workdir
        self.bindir = bindir
        self.docker = docker
        self.socket = workdir / "docker.sock"
        self.service = None
        self.service_log = workdir / "dockerd.log"
        prefix = free_prefix(random.Random())
        self.bridge = f"ikdk{os.getpid() % 100000}"
        for args in (
            ["link", "add", self.bridge, "type", "bridge"],
            ["addr", "add", f"{prefix}.1/24", "dev", self.bridge],
            ["link", "set", self.bridge, "up"],
        ):
            subprocess.run(["ip", *args], check=True)
        self.env = {**os.environ, "PATH": f"{bindir}:{os.environ.get('PATH', '')}"}
        self.start_service()
        self.cmd("import", str(image_tar(workdir, busybox)), IMAGE)

    def cmd(self, *args: str, check: bool = True) -> str:
        return self.run_cli([self.docker, "-H", f"unix://{self.socket}", *args], check)

    def start_service(self) -> None:
        if self.service is not None:
            return
        with contextlib.suppress(FileNotFoundError):
            self.socket.unlink()
        with self.service_log.open("ab") as log:
            self.service = subprocess.Popen(
                [
                    str(self.bindir / "dockerd"),
                    "--data-root",
                    str(self.dir / "root"),
                    "--exec-root",
                    str(self.dir / "exec"),
                    "--pidfile",
                    str(self.dir / "dockerd.pid"),
                    "-H",
                    f"unix://{self.socket}",
                    "--bridge",
                    self.bridge,
                    "--iptables=false",
                    "--ip6tables=false",
                    "--ip-masq=false",
                    "--storage-driver",
                    "vfs",
                    "--exec-opt",
                    "native.cgroupdriver=cgroupfs",
                    "--userland-proxy-path",
                    str(self.bindir / "docker-proxy"),
                ],
                stdout=log,
                stderr=subprocess.STDOUT,
                env=self.env,
            )
        self.wait_ready("dockerd", 60)

    def run(self, name: str, *args: str, cmd: tuple[str, ...] = ()) -> str:
        command = cmd or ("/bin/httpd", "-f", "-p", "80", "-h", "/www")
        return self.cmd("run", "-d", "--name", name, *args, IMAGE, *command)

    def close(self) -> None:
        with contextlib.suppress(Exception):
            ids = self.cmd("ps", "-aq", check=False).split()
            if ids:
                self.cmd("rm", "-f", *ids, check=False)
        self.stop_service(timeout=30)
        subprocess.run(["ip", "link", "delete", self.bridge], capture_output=True)
        # vfs layers and containerd's state are plain files: nothing is mounted once it stops.
        shutil.rmtree(self.dir / "root", ignore_errors=True)
