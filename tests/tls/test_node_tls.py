"""TLS through the real ``interknit`` binary: the registry API over https with client
certificates (the CLI, ``interknit.client`` and ``openssl s_client`` as its clients), config
errors naming the key, listener certificates reloaded on change and on SIGHUP without dropping
connections, and services reached over TLS by routes and health checks."""

from __future__ import annotations

import os
import re
import shutil
import signal
import socket
import ssl
import subprocess
import time
from pathlib import Path

import httpx
import pytest

from interknit.client import AsyncClient
from tests.backends import Backend
from tests.conftest import require_tool
from tests.nodeproc import INTERKNIT, NodeProcess, free_port, wait_for
from tests.tlscerts import Issued, TestCA


class Certs:
    def __init__(self, directory: Path) -> None:
        self.ca = TestCA(directory / "ca")
        self.other = TestCA(directory / "other", name="another-ca")
        self.node = self.ca.issue("node")  # IP:127.0.0.1
        self.client = self.ca.issue("cli", ips=(), usage="clientAuth")
        self.stranger = self.other.issue("cli", ips=(), usage="clientAuth")
        self.web = self.ca.issue("web", dns=("web.example.com",))
        self.backend = self.ca.issue("backend", dns=("backend.example.com",))


@pytest.fixture(scope="module")
def certs(tmp_path_factory: pytest.TempPathFactory) -> Certs:
    return Certs(tmp_path_factory.mktemp("node-tls"))


def toml_tls(pair: Issued, **extra: str) -> str:
    items = [f'cert = "{pair.cert}"', f'key = "{pair.key}"']
    items += [f'{k} = "{v}"' for k, v in extra.items()]
    return "{ " + ", ".join(items) + " }"


def secure_node(tmp_path: Path, certs: Certs, extra: str = "") -> NodeProcess:
    registry = "tls = " + toml_tls(
        certs.node, client_ca=str(certs.ca.cert), verify_client="required"
    )
    node = NodeProcess(tmp_path, extra, registry_config=registry)
    node.url = node.url.replace("http://", "https://")
    ctx = certs.ca.client_context(certs.client)
    node.client = httpx.Client(base_url=node.url, verify=ctx, timeout=10)
    return node


def s_client(port: int, *args: str, data: bytes = b"") -> str:
    openssl = require_tool("openssl")
    done = subprocess.run(
        [openssl, "s_client", "-connect", f"127.0.0.1:{port}", *args],
        input=data, capture_output=True, timeout=30,
    )  # fmt: skip
    return (done.stdout + done.stderr).decode(errors="replace")


async def test_registry_api_over_tls_with_client_certificates(tmp_path: Path, certs: Certs) -> None:
    node = secure_node(tmp_path, certs).start()
    try:
        assert node.register("web", "w1", port=8080).status_code == 200
        port = node.api_port
        # The CLI: flags, and the same from the environment.
        tls_flags = ["--cacert", str(certs.ca.cert), "--cert", str(certs.client.cert),
                     "--key", str(certs.client.key)]  # fmt: skip
        done = node.cli(*tls_flags, "instances", "web", "--json")
        assert done.returncode == 0, done.stderr
        assert '"w1"' in done.stdout
        env = {
            "INTERKNIT_CACERT": str(certs.ca.cert),
            "INTERKNIT_CERT": str(certs.client.cert),
            "INTERKNIT_KEY": str(certs.client.key),
        }
        done = node.cli("services", env=env)
        assert done.returncode == 0 and "web" in done.stdout, done.stderr
        # Without a client certificate, or with one from another CA: refused.
        done = node.cli("--cacert", str(certs.ca.cert), "services")
        assert done.returncode == 1 and "cannot reach the node" in done.stderr, done.stderr
        stranger = ["--cert", str(certs.stranger.cert), "--key", str(certs.stranger.key)]
        done = node.cli("--cacert", str(certs.ca.cert), *stranger, "services")
        assert done.returncode == 1, done.stderr
        # Not trusting the node's CA: refused by the CLI itself.
        done = node.cli("--cert", str(certs.client.cert), "--key", str(certs.client.key),
                        "services")  # fmt: skip
        assert done.returncode == 1 and "CERTIFICATE_VERIFY_FAILED" in done.stderr
        # A file that cannot be read is a usage error naming the option.
        done = node.cli("--cacert", str(tmp_path / "nope.pem"), "services")
        assert done.returncode == 2 and done.stderr.startswith("interknit: --cacert: cannot read")
        # interknit.client, with the same three files.
        client = AsyncClient(
            node.url,
            cacert=str(certs.ca.cert),
            cert=str(certs.client.cert),
            key=str(certs.client.key),
        )
        try:
            found = await client.instances("web")
            assert [i.id for i in found] == ["w1"]
        finally:
            await client.close()
        # openssl s_client: a client certificate is required and checked.
        request = b"GET /v1/services HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"
        mine = ["-cert", str(certs.client.cert), "-key", str(certs.client.key)]
        good = s_client(port, "-quiet", "-CAfile", str(certs.ca.cert), *mine, data=request)
        assert "HTTP/1.1 200" in good, good
        bad = s_client(port, "-quiet", "-CAfile", str(certs.ca.cert), data=request)
        assert "HTTP/1.1 200" not in bad, bad
        # Plaintext HTTP to the https port is not answered as HTTP.
        with socket.create_connection(("127.0.0.1", port), timeout=10) as raw:
            raw.sendall(b"GET /v1/services HTTP/1.1\r\nHost: x\r\n\r\n")
            assert not raw.recv(1024).startswith(b"HTTP/1.1 200")
    finally:
        node.stop()


def test_config_errors_name_the_key(tmp_path: Path, certs: Certs) -> None:
    expired = certs.ca.issue("old", start="20200101000000Z", end="20200102000000Z")
    cases = {
        toml_tls(certs.web): None,
        f'{{ cert = "{certs.web.cert}", key = "{certs.backend.key}" }}': (
            "listeners[0].tls.key: ",
            "is not the key of the certificate",
        ),
        f'{{ cert = "{tmp_path / "missing.pem"}", key = "{certs.web.key}" }}': (
            "listeners[0].tls.cert: cannot read",
            "No such file or directory",
        ),
        f'{{ cert = "{tmp_path}", key = "{certs.web.key}" }}': (
            "listeners[0].tls.cert: cannot read",
            "Is a directory",
        ),
        toml_tls(expired): ("listeners[0].tls.cert: ", "expired on 2020-01-02 00:00 UTC"),
    }
    for index, (table, expected) in enumerate(cases.items()):
        config = tmp_path / f"c{index}.toml"
        config.write_text(
            f'[registry]\nlisten = "127.0.0.1:{free_port()}"\n[dns]\nenabled = false\n'
            f'[[listeners]]\nname = "web"\nlisten = "127.0.0.1:0"\ntls = {table}\n'
            '[[listeners.routes]]\nservers = ["127.0.0.1:1"]\n'
        )
        if expected is None:
            continue
        done = subprocess.run(
            [INTERKNIT, "up", "-c", str(config)], capture_output=True, text=True, timeout=30
        )
        assert done.returncode == 2, done.stderr
        lines = done.stderr.strip().splitlines()
        assert len(lines) == 1, done.stderr
        assert expected[0] in lines[0] and expected[1] in lines[0], lines[0]


def peer_cn(port: int) -> str:
    out = s_client(port, "-servername", "web.example.com")
    for line in out.splitlines():
        if line.startswith("subject="):
            return line.split("CN = ", 1)[1].strip()
    raise AssertionError(out)


def same_size_renewal(certs: Certs, like: Path, name: str) -> Issued:
    """A new certificate whose file has the size of ``like``'s, so that only its mtime could
    tell them apart: a shorter name, padded with blank lines after the PEM block (which PEM
    readers skip)."""
    for _ in range(20):
        issued = certs.ca.issue(name, dns=("web.example.com",))
        missing = like.stat().st_size - issued.cert.stat().st_size
        if missing >= 0:
            with issued.cert.open("ab") as f:
                f.write(b"\n" * missing)
            return issued
    raise AssertionError("no renewal short enough")


def read_answer(sock: socket.socket) -> bytes:
    """One whole answer with a Content-Length (its head and body may come in two records)."""
    data = b""
    while b"\r\n\r\n" not in data:
        data += sock.recv(4096)
    head, _, body = data.partition(b"\r\n\r\n")
    length = int(re.search(rb"(?i)content-length: *(\d+)", head).group(1))  # type: ignore[union-attr]
    while len(body) < length:
        body += sock.recv(4096)
    return data


def test_listener_certificates_reload_on_change_and_on_sighup(tmp_path: Path, certs: Certs) -> None:
    backend = Backend("b")
    cert, key = tmp_path / "live.pem", tmp_path / "live.key"
    shutil.copy(certs.web.cert, cert)
    shutil.copy(certs.web.key, key)
    port = free_port()
    node = NodeProcess(
        tmp_path,
        f'[[listeners]]\nname = "web"\nlisten = "127.0.0.1:{port}"\n'
        f'tls = {{ cert = "{cert}", key = "{key}" }}\n'
        f'[[listeners.routes]]\nservers = ["127.0.0.1:{backend.port}"]\n',
    ).start()
    try:
        ctx = certs.ca.client_context()
        ctx.check_hostname = False
        raw = socket.create_connection(("127.0.0.1", port), timeout=10)
        kept = ctx.wrap_socket(raw, server_hostname="web.example.com")
        request = b"GET / HTTP/1.1\r\nHost: web.example.com\r\n\r\n"
        kept.sendall(request)
        assert read_answer(kept).startswith(b"HTTP/1.1 200")
        assert peer_cn(port) == "web"
        # Saved over the old files: the node sees the change within a second or two.
        renewed = certs.ca.issue("web-renewed", dns=("web.example.com",))
        shutil.copy(renewed.key, key)
        shutil.copy(renewed.cert, cert)
        wait_for(lambda: peer_cn(port) == "web-renewed", timeout=20)
        # Rewritten in place with the same size and mtime: only SIGHUP can tell.
        again = same_size_renewal(certs, cert, "web-hup")
        stat, key_stat = cert.stat(), key.stat()
        key.write_bytes(again.key.read_bytes())
        cert.write_bytes(again.cert.read_bytes())
        os.utime(cert, ns=(stat.st_atime_ns, stat.st_mtime_ns))
        os.utime(key, ns=(key_stat.st_atime_ns, key_stat.st_mtime_ns))
        assert key.stat().st_size == key_stat.st_size
        time.sleep(2.5)  # two looks of the file watch: it sees nothing
        assert peer_cn(port) == "web-renewed"
        assert node.proc is not None
        node.proc.send_signal(signal.SIGHUP)
        wait_for(lambda: peer_cn(port) == "web-hup", timeout=20)
        # The connection from before both reloads still carries requests.
        kept.sendall(request)
        assert read_answer(kept).startswith(b"HTTP/1.1 200")
        kept.close()
    finally:
        node.stop()
        backend.close()


def test_services_over_tls_for_routes_and_health_checks(tmp_path: Path, certs: Certs) -> None:
    server_ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    server_ctx.load_cert_chain(str(certs.backend.cert), str(certs.backend.key))
    secure = Backend("secure", tls=server_ctx)
    untrusted = Backend("untrusted", tls=server_ctx)
    port = free_port()
    tls = f'upstream_tls = {{ ca = "{certs.ca.cert}", sni = "backend.example.com" }}'
    wrong = f'upstream_tls = {{ ca = "{certs.other.cert}", sni = "backend.example.com" }}'
    node = NodeProcess(
        tmp_path,
        # The operator lowers the floor on check intervals (1 s) for checks every 200 ms.
        '[health]\nmin_interval = "100ms"\n'
        f'[[services]]\nname = "secure"\ninstances = ["127.0.0.1:{secure.port}"]\n'
        f'check = {{ http = "/health", interval = "200ms", rise = 1, fall = 1 }}\n{tls}\n'
        f'[[services]]\nname = "wrongca"\ninstances = ["127.0.0.1:{untrusted.port}"]\n'
        f'check = {{ http = "/health", interval = "200ms", rise = 1, fall = 1 }}\n{wrong}\n'
        f'[[listeners]]\nname = "web"\nlisten = "127.0.0.1:{port}"\n'
        '[[listeners.routes]]\nservice = "secure"\n',
    ).start()
    try:

        def health(service: str) -> tuple[str, str]:
            (inst,) = node.client.get(f"/v1/services/{service}").json()["instances"]
            return inst["health"], inst.get("check_output") or inst.get("output") or ""

        wait_for(lambda: health("secure")[0] == "passing", timeout=20)
        wait_for(lambda: health("wrongca")[0] == "critical", timeout=20)
        assert secure.hits >= 1
        # The route to the service speaks TLS to it, with the service's settings.
        answer = httpx.get(f"http://127.0.0.1:{port}/", timeout=10)
        assert answer.status_code == 200 and answer.text == "secure"
    finally:
        node.stop()
        secure.close()
        untrusted.close()


def test_workers_follow_a_registry_api_that_requires_client_certificates(
    tmp_path: Path, certs: Certs
) -> None:
    """--workers reach their node's https API with [registry] client_tls."""
    app = Backend("app")
    port = free_port()
    client = toml_tls(certs.client, ca=str(certs.ca.cert))
    node = secure_node(
        tmp_path,
        certs,
        f'[[listeners]]\nname = "web"\nlisten = "127.0.0.1:{port}"\n'
        f'[[listeners.routes]]\nservice = "app"\n',
    )
    node.config_path.write_text(
        node.config_path.read_text().replace("[dns]", f"client_tls = {client}\n[dns]", 1)
    )
    node.start(args=("--workers", "2"))
    ss = require_tool("ss")

    def listening() -> int:
        out = subprocess.run(
            [ss, "-Hltn", f"sport = :{port}"], capture_output=True, text=True, check=True
        ).stdout
        return len(out.splitlines())

    try:
        node.register("app", "a", port=app.port)
        # The worker binds once it has the registry (or gave up waiting for it, 10 s).
        try:
            wait_for(lambda: listening() == 2, timeout=30)
        except AssertionError:
            raise AssertionError(f"the worker did not bind:\n{node.log()}") from None
        # New connections are spread by the kernel over the node and its worker: twenty
        # answered in a row means the worker follows the registry too.
        streak = 0

        def both_answer() -> bool:
            nonlocal streak
            with httpx.Client(timeout=5) as c:
                ok = c.get(f"http://127.0.0.1:{port}/").status_code == 200
            streak = streak + 1 if ok else 0
            return streak >= 20

        try:
            wait_for(both_answer, timeout=30)
        except AssertionError:
            answer = httpx.get(f"http://127.0.0.1:{port}/", timeout=5)
            raise AssertionError(f"{answer.status_code} {answer.headers}\n{node.log()}") from None
        assert "lost the registry's watch stream" not in node.log()
    finally:
        node.stop()
        app.close()
