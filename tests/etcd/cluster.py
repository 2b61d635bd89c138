"""Real etcd members on loopback for tests: one member, or a three-member cluster.

Each member gets its own data directory and two free ports (client, peer). Timing is tightened
(50 ms heartbeats, 500 ms elections) so that elections and lease expiry fit in a fast test;
etcd's smallest lease TTL follows the election timeout (1.5x, rounded up to whole seconds: 1 s).
"""

from __future__ import annotations

import contextlib
import json
import signal
import ssl
import subprocess
import time
import urllib.request
from pathlib import Path

from tests.conftest import require_tool
from tests.nodeproc import free_port


class Certificates:
    """A CA, a server certificate for 127.0.0.1 and a client certificate, made with openssl."""

    def __init__(self, directory: Path) -> None:
        openssl = require_tool("openssl")
        directory.mkdir(parents=True, exist_ok=True)
        self.ca, self.ca_key = directory / "ca.pem", directory / "ca.key"
        ec = ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes"]

        def run(*args: str) -> None:
            subprocess.run([openssl, *args], check=True, capture_output=True)

        # Python 3.13 verifies with VERIFY_X509_STRICT: a CA needs its key usage, a leaf the
        # key identifier of the CA that signed it (as real CAs issue them).
        run("req", "-x509", *ec, "-days", "1", "-subj", "/CN=interknit-test-ca",
            "-addext", "basicConstraints=critical,CA:TRUE",
            "-addext", "keyUsage=critical,keyCertSign,cRLSign",
            "-keyout", str(self.ca_key), "-out", str(self.ca))  # fmt: skip

        def issue(name: str, usage: str) -> tuple[Path, Path]:
            key, csr, pem = (directory / f"{name}.{ext}" for ext in ("key", "csr", "pem"))
            ext = directory / f"{name}.ext"
            ext.write_text(
                f"subjectAltName=IP:127.0.0.1\nextendedKeyUsage={usage}\n"
                "basicConstraints=CA:FALSE\nkeyUsage=critical,digitalSignature\n"
                "subjectKeyIdentifier=hash\nauthorityKeyIdentifier=keyid,issuer\n"
            )
            run("req", *ec, "-subj", f"/CN={name}", "-keyout", str(key), "-out", str(csr))
            ca = ["-CA", str(self.ca), "-CAkey", str(self.ca_key), "-CAcreateserial"]
            run("x509", "-req", "-in", str(csr), *ca, "-days", "1", "-extfile", str(ext),
                "-out", str(pem))  # fmt: skip
            return pem, key

        self.server, self.server_key = issue("server", "serverAuth")
        self.client, self.client_key = issue("client", "clientAuth")

    def context(self) -> ssl.SSLContext:
        ctx = ssl.create_default_context(cafile=str(self.ca))
        ctx.load_cert_chain(str(self.client), str(self.client_key))
        return ctx


class Member:
    def __init__(
        self, binary: str, workdir: Path, name: str, tls: Certificates | None = None
    ) -> None:
        self.binary = binary
        self.name = name
        self.tls = tls
        self.data_dir = workdir / f"{name}.etcd"
        self.log_path = workdir / f"{name}.log"
        self.client_port = free_port()
        self.peer_port = free_port()
        scheme = "https" if tls is not None else "http"
        self.client_url = f"{scheme}://127.0.0.1:{self.client_port}"
        self.peer_url = f"http://127.0.0.1:{self.peer_port}"
        self.proc: subprocess.Popen[bytes] | None = None

    def command(self, initial_cluster: str, token: str) -> list[str]:
        return [
            self.binary,
            "--name", self.name,
            "--data-dir", str(self.data_dir),
            "--listen-client-urls", self.client_url,
            "--advertise-client-urls", self.client_url,
            "--listen-peer-urls", self.peer_url,
            "--initial-advertise-peer-urls", self.peer_url,
            "--initial-cluster", initial_cluster,
            "--initial-cluster-state", "new",
            "--initial-cluster-token", token,
            "--heartbeat-interval", "50",
            "--election-timeout", "500",
            "--logger", "zap",
            "--log-level", "error",
        ] + (
            []
            if self.tls is None
            else [
                "--cert-file", str(self.tls.server),
                "--key-file", str(self.tls.server_key),
                "--trusted-ca-file", str(self.tls.ca),
                "--client-cert-auth",
            ]
        )  # fmt: skip

    def start(self, initial_cluster: str, token: str) -> None:
        log = self.log_path.open("ab")
        self.proc = subprocess.Popen(
            self.command(initial_cluster, token), stdout=log, stderr=subprocess.STDOUT
        )

    def kill(self) -> None:
        """SIGKILL: the member vanishes as a crashed process does."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait(10)
        self.proc = None

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def healthy(self) -> bool:
        try:
            context = None if self.tls is None else self.tls.context()
            url = self.client_url + "/health"
            with urllib.request.urlopen(url, timeout=1, context=context) as resp:
                return bool(json.loads(resp.read()).get("health") == "true")
        except (OSError, ValueError):
            return False


class EtcdCluster:
    """``size`` members forming one cluster; members can be killed and brought back."""

    def __init__(self, workdir: Path, size: int = 1, tls: Certificates | None = None) -> None:
        binary = require_tool("etcd")
        workdir.mkdir(parents=True, exist_ok=True)
        self.members = [Member(binary, workdir, f"m{i}", tls) for i in range(size)]
        self.initial_cluster = ",".join(f"{m.name}={m.peer_url}" for m in self.members)
        self.token = f"ik-{workdir.name}-{time.monotonic_ns()}"

    @property
    def endpoints(self) -> list[str]:
        return [m.client_url for m in self.members]

    def start(self) -> EtcdCluster:
        for member in self.members:
            member.start(self.initial_cluster, self.token)
        self.wait_healthy()
        return self

    def kill(self, index: int) -> None:
        self.members[index].kill()

    def kill_all(self) -> None:
        for member in self.members:
            member.kill()

    def restart(self, index: int, wait: bool = True) -> None:
        """Start a killed member again on its data directory (the cluster flags are ignored
        for a member that has data)."""
        member = self.members[index]
        member.start(self.initial_cluster, self.token)
        if wait:
            self.wait_healthy()

    def restart_all(self) -> None:
        for i, member in enumerate(self.members):
            if not member.running:
                self.restart(i, wait=False)
        self.wait_healthy()

    def wait_healthy(self, timeout: float = 20.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            running = [m for m in self.members if m.running]
            if running and all(m.healthy() for m in running):
                return
            time.sleep(0.05)
        logs = "\n".join(m.log_path.read_text()[-2000:] for m in self.members)
        raise RuntimeError(f"etcd did not become healthy in {timeout}s:\n{logs}")

    def stop(self) -> None:
        for member in self.members:
            with contextlib.suppress(Exception):
                member.kill()
