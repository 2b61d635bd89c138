"""TLS at the edge: an HTTP listener terminates TLS, checked with real clients (curl,
``openssl s_client``, Python's ssl) against certificates made with openssl."""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
import socket
import ssl
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from prometheus_client import CollectorRegistry

from interknit.proxy import RouteSpec
from interknit.tls.server import CertSpec, ServerTlsSpec
from tests.conftest import require_tool
from tests.proxy.conftest import Backend, ProxyFactory, read_response, seen_headers, until
from tests.tlscerts import Issued, TestCA


class Certs:
    def __init__(self, directory: Path) -> None:
        self.ca = TestCA(directory / "ca")
        self.other_ca = TestCA(directory / "other", name="another-ca")
        self.web = self.ca.issue("web", dns=("web.example.com",))
        self.web_rsa = self.ca.issue("web-rsa", dns=("web.example.com",), kind="rsa")
        self.wild = self.ca.issue("wild", dns=("*.api.example.com",))
        self.client = self.ca.issue("client-1", ips=(), usage="clientAuth")
        self.stranger = self.other_ca.issue("stranger", ips=(), usage="clientAuth")
        self.ocsp = self.ca.ocsp(self.web.cert, directory / "web.ocsp")


@pytest.fixture(scope="module")
def certs(tmp_path_factory: pytest.TempPathFactory) -> Certs:
    return Certs(tmp_path_factory.mktemp("tls-edge"))


def tls(*pairs: Issued, **kw: Any) -> ServerTlsSpec:
    return ServerTlsSpec(certs=tuple(CertSpec(str(p.cert), str(p.key)) for p in pairs), **kw)


async def run(*args: str, timeout: float = 20.0) -> tuple[int, str]:
    proc = await asyncio.create_subprocess_exec(
        *args,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
    )
    out, _ = await asyncio.wait_for(proc.communicate(), timeout)
    assert proc.returncode is not None
    return proc.returncode, out.decode(errors="replace")


async def s_client(port: int, *args: str) -> tuple[int, str]:
    openssl = require_tool("openssl")
    return await run(openssl, "s_client", "-connect", f"127.0.0.1:{port}", *args)


async def curl(port: int, certs: Certs, path: str = "/", *args: str) -> tuple[int, str]:
    binary = require_tool("curl")
    return await run(
        binary, "-sS", "-i", "--cacert", str(certs.ca.cert),
        "--resolve", f"web.example.com:{port}:127.0.0.1",
        *args, f"https://web.example.com:{port}{path}",
    )  # fmt: skip


def peer_cn(output: str) -> str:
    for line in output.splitlines():
        if line.startswith("subject=") or line.startswith("subject ="):
            return line.split("CN", 1)[1].strip(" =")
    raise AssertionError(output)


async def test_curl_over_https_reaches_the_backend_as_https(
    backends: Any, proxy: ProxyFactory, certs: Certs
) -> None:
    b: Backend = await backends("a")
    listener = await proxy(RouteSpec(servers=(b.server,)), tls=tls(certs.web))
    code, out = await curl(listener.port, certs, "/x?y=1", "-w", "\n%{http_version}\n")
    assert code == 0, out
    assert out.startswith("HTTP/1.1 200"), out
    assert out.rstrip().endswith("1.1")
    seen = seen_headers(b.seen[-1])
    assert seen["x-forwarded-proto"] == "https"
    assert seen["x-forwarded-for"] == "127.0.0.1"
    assert b.seen[-1]["path"] == "/x?y=1"


async def test_sni_chooses_the_certificate_wildcards_too(
    backends: Any, proxy: ProxyFactory, certs: Certs
) -> None:
    b = await backends("a")
    listener = await proxy(RouteSpec(servers=(b.server,)), tls=tls(certs.web, certs.wild))
    port = listener.port
    cases = {
        "web.example.com": "web",
        "x.api.example.com": "wild",  # the wildcard, one label deep
        "a.b.api.example.com": "web",  # two labels deep: not the wildcard; the default
        "unknown.test": "web",
    }
    for name, cn in cases.items():
        code, out = await s_client(port, "-servername", name, "-CAfile", str(certs.ca.cert))
        assert code == 0, out
        assert peer_cn(out) == cn, (name, out)
    code, out = await s_client(port, "-noservername")
    assert peer_cn(out) == "web"


async def test_strict_sni_refuses_unknown_names(
    backends: Any, proxy: ProxyFactory, certs: Certs
) -> None:
    b = await backends("a")
    listener = await proxy(
        RouteSpec(servers=(b.server,)), tls=tls(certs.web, certs.wild, strict_sni=True)
    )
    code, out = await s_client(listener.port, "-servername", "unknown.test")
    # Refused in the handshake (uvloop drops the connection without flushing the alert).
    assert code != 0 and "no peer certificate available" in out, out
    code, out = await s_client(listener.port, "-servername", "web.example.com")
    assert code == 0, out


async def test_ecdsa_and_rsa_for_the_same_name(
    backends: Any, proxy: ProxyFactory, certs: Certs
) -> None:
    """Both in one context: OpenSSL gives each client the certificate it can verify."""
    b = await backends("a")
    listener = await proxy(RouteSpec(servers=(b.server,)), tls=tls(certs.web, certs.web_rsa))
    sni = ("-servername", "web.example.com")
    _, out = await s_client(listener.port, *sni, "-sigalgs", "RSA-PSS+SHA256:RSA+SHA256")
    assert peer_cn(out) == "web-rsa", out
    _, out = await s_client(listener.port, *sni, "-sigalgs", "ECDSA+SHA256")
    assert peer_cn(out) == "web", out


async def test_alpn_offers_http11_only(backends: Any, proxy: ProxyFactory, certs: Certs) -> None:
    b = await backends("a")
    listener = await proxy(RouteSpec(servers=(b.server,)), tls=tls(certs.web))
    _, out = await s_client(listener.port, "-alpn", "h2,http/1.1")
    assert "ALPN protocol: http/1.1" in out, out
    _, out = await s_client(listener.port, "-alpn", "h2")
    assert "No ALPN negotiated" in out, out


@pytest.mark.filterwarnings("ignore:ssl.TLSVersion.TLSv1:DeprecationWarning")
@pytest.mark.parametrize("flag", ["-tls1", "-tls1_1"])
async def test_tls_10_and_11_are_refused(
    backends: Any, proxy: ProxyFactory, certs: Certs, flag: str
) -> None:
    """The client is told it may (SECLEVEL 0), so the refusal is the server's."""
    b = await backends("a")
    listener = await proxy(RouteSpec(servers=(b.server,)), tls=tls(certs.web))
    code, out = await s_client(listener.port, flag, "-cipher", "DEFAULT@SECLEVEL=0")
    # The client sent its hello; the server answered with OpenSSL's protocol_version alert
    # (as HAProxy and nginx do: the client is told why) and closed.
    assert code != 0, out
    assert "alert protocol version" in out, out
    # Python's ssl, likewise told it may.
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    ctx.set_ciphers("DEFAULT@SECLEVEL=0")
    ctx.minimum_version = ctx.maximum_version = (
        ssl.TLSVersion.TLSv1 if flag == "-tls1" else ssl.TLSVersion.TLSv1_1
    )
    with pytest.raises((ssl.SSLError, ConnectionError)):
        await asyncio.open_connection("127.0.0.1", listener.port, ssl=ctx)


async def test_min_version_13_refuses_tls12(
    backends: Any, proxy: ProxyFactory, certs: Certs
) -> None:
    b = await backends("a")
    listener = await proxy(RouteSpec(servers=(b.server,)), tls=tls(certs.web, min_version="1.3"))
    code, out = await s_client(listener.port, "-tls1_2")
    assert code != 0, out
    code, out = await s_client(listener.port, "-tls1_3")
    assert code == 0 and "TLSv1.3" in out, out


async def test_server_prefers_its_own_cipher_order(
    backends: Any, proxy: ProxyFactory, certs: Certs
) -> None:
    b = await backends("a")
    listener = await proxy(RouteSpec(servers=(b.server,)), tls=tls(certs.web))
    offer = (
        "ECDHE-ECDSA-CHACHA20-POLY1305:ECDHE-ECDSA-AES256-GCM-SHA384:ECDHE-ECDSA-AES128-GCM-SHA256"
    )
    _, out = await s_client(listener.port, "-tls1_2", "-cipher", offer)
    assert "Cipher is ECDHE-ECDSA-AES128-GCM-SHA256" in out, out


async def test_a_client_certificate_required_and_checked(
    backends: Any, proxy: ProxyFactory, certs: Certs
) -> None:
    b = await backends("a")
    spec = tls(certs.web, client_ca=str(certs.ca.cert), verify_client="required")
    listener = await proxy(RouteSpec(servers=(b.server,)), tls=spec)
    # s_client -quiet ignores the end of its input: the proxy closes after the answer.
    request = "GET / HTTP/1.1\r\nHost: web.example.com\r\nConnection: close\r\n\r\n"
    good = ("-cert", str(certs.client.cert), "-key", str(certs.client.key))
    bad = ("-cert", str(certs.stranger.cert), "-key", str(certs.stranger.key))
    for args, ok in (((), False), (good, True), (bad, False)):
        openssl = require_tool("openssl")
        proc = await asyncio.create_subprocess_exec(
            openssl, "s_client", "-connect", f"127.0.0.1:{listener.port}", "-quiet",
            "-tls1_3", *args,
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
        )  # fmt: skip
        out, _ = await asyncio.wait_for(proc.communicate(request.encode()), 20)
        text = out.decode(errors="replace")
        assert ("HTTP/1.1 200" in text) == ok, (args, text)
    # Python's ssl with the client certificate.
    ctx = certs.ca.client_context(certs.client)
    reader, writer = await asyncio.open_connection(
        "127.0.0.1", listener.port, ssl=ctx, server_hostname="web.example.com"
    )
    writer.write(request.encode())
    status, _, _ = await read_response(reader)
    assert status == 200
    writer.close()


async def test_the_handshake_counts_against_header_timeout(
    backends: Any, proxy: ProxyFactory, certs: Certs
) -> None:
    """A client that dawdles before its handshake has only what is left of header_timeout
    for its head; one that never completes the handshake is cut at header_timeout."""
    b = await backends("a")
    timeout = 1.5
    listener = await proxy(
        RouteSpec(servers=(b.server,)), tls=tls(certs.web), header_timeout=timeout
    )
    loop = asyncio.get_running_loop()
    # A handshake that begins 1 s late; then no head at all.
    raw_reader, raw_writer = await asyncio.open_connection("127.0.0.1", listener.port)
    opened = loop.time()
    await asyncio.sleep(1.0)
    ctx = certs.ca.client_context()
    ctx.check_hostname = False
    await raw_writer.start_tls(ctx)
    status, headers, _ = await asyncio.wait_for(read_response(raw_reader), 10)
    closed = loop.time() - opened
    assert status == 408 and headers["x-interknit-reason"] == "header-timeout"
    # From the accept: about 1.5 s, well before the 2.5 s a timer from the handshake gives.
    assert timeout - 0.05 <= closed < timeout + 0.7, closed
    raw_writer.close()
    # No handshake at all: closed by the same bound.
    reader, writer = await asyncio.open_connection("127.0.0.1", listener.port)
    opened = loop.time()
    assert await asyncio.wait_for(reader.read(), 10) == b""
    assert timeout - 0.05 <= loop.time() - opened < timeout + 0.7
    writer.close()


async def test_hsts_on_tls_and_the_308_from_plaintext(
    backends: Any, proxy: ProxyFactory, certs: Certs
) -> None:
    b = await backends("a")
    hsts = "max-age=31536000; includeSubDomains"
    secure = await proxy(RouteSpec(servers=(b.server,), hsts=hsts), tls=tls(certs.web))
    plain = await proxy(RouteSpec(redirect_https=True, https_port=secure.port), name="plain")
    _, out = await curl(secure.port, certs)
    assert f"strict-transport-security: {hsts}".lower() in out.lower(), out
    reader, writer = await asyncio.open_connection("127.0.0.1", plain.port)
    for target in (b"/a/b?c=d", b"/"):
        writer.write(
            b"POST %s HTTP/1.1\r\nHost: Web.Example.com:80\r\ncontent-length: 0\r\n\r\n" % target
        )
        status, headers, _ = await read_response(reader)
        assert status == 308
        assert headers["location"] == f"https://web.example.com:{secure.port}{target.decode()}"
        assert "strict-transport-security" not in headers  # never over plaintext
    writer.close()
    # curl follows it to the TLS listener (same method, RFC 7538).
    binary = require_tool("curl")
    code, out = await run(
        binary, "-sS", "-i", "-L", "--cacert", str(certs.ca.cert),
        "--resolve", f"web.example.com:{plain.port}:127.0.0.1",
        "--resolve", f"web.example.com:{secure.port}:127.0.0.1",
        f"http://web.example.com:{plain.port}/hello",
    )  # fmt: skip
    assert code == 0, out
    assert "HTTP/1.1 308" in out and "HTTP/1.1 200" in out, out
    assert b.seen[-1]["path"] == "/hello"
    assert seen_headers(b.seen[-1])["x-forwarded-proto"] == "https"


async def test_sessions_resume_and_ticket_keys_rotate(
    backends: Any, proxy: ProxyFactory, certs: Certs
) -> None:
    b = await backends("a")
    registry = CollectorRegistry()
    listener = await proxy(RouteSpec(servers=(b.server,)), tls=tls(certs.web), metrics=registry)
    assert listener.tls is not None and listener.tls.tickets is not None
    tickets = listener.tls.tickets

    def handshakes(resumed: str) -> float | None:
        labels = {"listener": listener.spec.name, "resumed": resumed}
        return registry.get_sample_value("interknit_proxy_tls_handshakes_total", labels)

    def connect(ctx: ssl.SSLContext, session: ssl.SSLSession | None) -> tuple[Any, bool]:
        with (
            socket.create_connection(("127.0.0.1", listener.port)) as raw,
            ctx.wrap_socket(raw, server_hostname="web.example.com", session=session) as s,
        ):
            s.sendall(b"GET / HTTP/1.1\r\nHost: web.example.com\r\n\r\n")
            s.recv(65536)  # the answer (and, over TLS 1.3, the tickets before it)
            return s.session, s.session_reused

    for version in (ssl.TLSVersion.TLSv1_2, ssl.TLSVersion.TLSv1_3):
        ctx = certs.ca.client_context()
        ctx.maximum_version = version
        session, reused = await asyncio.to_thread(connect, ctx, None)
        assert not reused
        session2, reused = await asyncio.to_thread(connect, ctx, session)
        assert reused, version
        # After one rotation the ticket still opens (and is re-issued); after the kept keys
        # have all rotated away it does not: a full handshake.
        tickets.rotate()
        _, reused = await asyncio.to_thread(connect, ctx, session2)
        assert reused, version
        for _ in range(tickets.keep):
            tickets.rotate()
        _, reused = await asyncio.to_thread(connect, ctx, session2)
        assert not reused, version
    assert tickets.sealed > 0 and tickets.opened > 0 and tickets.unknown > 0
    # A TLS 1.3 client uses each ticket once (RFC 8446 C.4; wrk's OpenSSL, browsers): every
    # resumption must hand it a fresh ticket, or every other connection is a full handshake.
    ctx = certs.ca.client_context()
    ctx.minimum_version = ssl.TLSVersion.TLSv1_3
    session, _ = await asyncio.to_thread(connect, ctx, None)
    for _ in range(3):
        fresh, reused = await asyncio.to_thread(connect, ctx, session)
        assert reused and fresh.id != session.id
        session = fresh
    # Each handshake counted once, as it went: per version above 2 full (the first, and the
    # one whose key had rotated away) and 2 resumed; then 1 full and 3 resumed.
    assert (handshakes("no"), handshakes("yes")) == (5.0, 7.0)
    # Tickets off: TLS 1.2 still resumes by session id; the cache off too: never.
    for cache in (True, False):
        spec = tls(certs.web, session_tickets=False, session_cache=cache)
        other = await proxy(RouteSpec(servers=(b.server,)), tls=spec, name=f"cache-{cache}")
        ctx = certs.ca.client_context()
        ctx.maximum_version = ssl.TLSVersion.TLSv1_2

        def connect_to(
            port: int, session: ssl.SSLSession | None, ctx: ssl.SSLContext = ctx
        ) -> tuple[Any, bool]:
            with (
                socket.create_connection(("127.0.0.1", port)) as raw,
                ctx.wrap_socket(raw, server_hostname="web.example.com", session=session) as s,
            ):
                # A request and its answer, then a clean close (close_notify): OpenSSL drops
                # from its cache the session of a connection that ended without one.
                s.sendall(b"GET / HTTP/1.1\r\nHost: web.example.com\r\nConnection: close\r\n\r\n")
                while s.recv(65536):
                    pass
                return s.session, s.session_reused

        session, _ = await asyncio.to_thread(connect_to, other.port, None)
        _, reused = await asyncio.to_thread(connect_to, other.port, session)
        assert reused == cache


async def test_ocsp_response_is_stapled(backends: Any, proxy: ProxyFactory, certs: Certs) -> None:
    b = await backends("a")
    spec = ServerTlsSpec(
        certs=(
            CertSpec(str(certs.web.cert), str(certs.web.key), ocsp=str(certs.ocsp)),
            CertSpec(str(certs.wild.cert), str(certs.wild.key)),
        )
    )
    listener = await proxy(RouteSpec(servers=(b.server,)), tls=spec)
    _, out = await s_client(
        listener.port, "-status", "-servername", "web.example.com", "-CAfile", str(certs.ca.cert)
    )
    assert "OCSP Response Status: successful" in out, out
    assert "Cert Status: good" in out, out
    # A certificate without a response staples nothing.
    _, out = await s_client(listener.port, "-status", "-servername", "x.api.example.com")
    assert "OCSP response: no response sent" in out, out


@pytest.fixture
def files(tmp_path: Path, certs: Certs) -> Iterator[tuple[Path, Path]]:
    cert, key = tmp_path / "live.pem", tmp_path / "live.key"
    shutil.copy(certs.web.cert, cert)
    shutil.copy(certs.web.key, key)
    yield cert, key


async def test_certificates_reload_on_change_without_dropping_connections(
    backends: Any, proxy: ProxyFactory, certs: Certs, files: tuple[Path, Path], tmp_path: Path
) -> None:
    b = await backends("a")
    cert, key = files
    listener = await proxy(
        RouteSpec(servers=(b.server,)), tls=ServerTlsSpec(certs=(CertSpec(str(cert), str(key)),))
    )
    ctx = certs.ca.client_context()
    ctx.check_hostname = False
    reader, writer = await asyncio.open_connection("127.0.0.1", listener.port, ssl=ctx)
    request = b"GET / HTTP/1.1\r\nHost: web.example.com\r\n\r\n"
    writer.write(request)
    assert (await read_response(reader))[0] == 200
    assert listener.check_tls_files() is None  # nothing changed
    # A half-done replacement (new certificate, old key) is refused and changes nothing...
    renewed = certs.ca.issue("web-renewed", dns=("web.example.com",))
    shutil.copy(renewed.cert, cert)
    refused = listener.check_tls_files()
    assert refused is not None and "is not the key of the certificate" in refused
    _, out = await s_client(listener.port)
    assert peer_cn(out) == "web"
    # ...until the key follows: then new handshakes get the new certificate.
    shutil.copy(renewed.key, key)
    assert listener.check_tls_files() == "certificates"
    _, out = await s_client(listener.port)
    assert peer_cn(out) == "web-renewed"
    # The connection from before carries on.
    writer.write(request)
    assert (await read_response(reader))[0] == 200
    writer.close()
    await until(lambda: len(listener.connections) == 0)


class BioClient:
    """A TLS client of memory BIOs over a blocking socket, so that a test decides what is
    sent when: ``outgoing`` holds what it wrote and has not sent (after the handshake, the
    client's Finished)."""

    def __init__(self, raw: socket.socket, ctx: ssl.SSLContext) -> None:
        self.raw = raw
        self.incoming, self.outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
        self.obj = ctx.wrap_bio(self.incoming, self.outgoing, server_hostname="web.example.com")
        while True:
            try:
                self.obj.do_handshake()
                break
            except ssl.SSLWantReadError:
                raw.sendall(self.outgoing.read())
                data = raw.recv(65536)
                assert data, "closed during the handshake"
                self.incoming.write(data)

    def read_to_close(self) -> tuple[bytes, bool]:
        """What comes until the server closes, and whether it closed with close_notify."""
        received = b""
        while True:
            try:
                chunk = self.obj.read(65536)
            except ssl.SSLZeroReturnError:
                return received, True
            except ssl.SSLWantReadError:
                data = self.raw.recv(65536)
                if not data:
                    return received, False
                self.incoming.write(data)
                continue
            if not chunk:
                return received, True
            received += chunk


def records_exchange(port: int, ctx: ssl.SSLContext, payloads: list[bytes]) -> tuple[bytes, bool]:
    """The handshake, then each payload sealed as a record of its own and all of them sent in
    one write with the client's Finished. Returns ``BioClient.read_to_close``."""
    with socket.create_connection(("127.0.0.1", port)) as raw:
        raw.settimeout(10)
        client = BioClient(raw, ctx)
        records = client.outgoing.read()
        for payload in payloads:
            client.obj.write(payload)
            records += client.outgoing.read()
        raw.sendall(records)
        return client.read_to_close()


async def test_records_after_a_pipelined_request_wait_for_their_turn(
    backends: Any, proxy: ProxyFactory, certs: Certs
) -> None:
    """Three requests, a record each, in one TCP segment with the client's Finished: the
    listener stops reading at the second (it answers in order) and must still decrypt the
    third, which waits in OpenSSL's buffer, when it reads on; then it ends with close_notify."""
    b = await backends("a")
    listener = await proxy(RouteSpec(servers=(b.server,)), tls=tls(certs.web))
    requests = [
        f"GET /{i} HTTP/1.1\r\nHost: web.example.com\r\n{last}\r\n".encode()
        for i, last in enumerate(("", "", "Connection: close\r\n"))
    ]
    for version in (ssl.TLSVersion.TLSv1_2, ssl.TLSVersion.TLSv1_3):
        ctx = certs.ca.client_context()
        ctx.maximum_version = version
        received, clean = await asyncio.to_thread(records_exchange, listener.port, ctx, requests)
        assert received.count(b"HTTP/1.1 200 OK\r\n") == 3, (version, received)
        assert [s["path"] for s in b.seen[-3:]] == ["/0", "/1", "/2"]
        assert clean, version


async def test_large_bodies_both_ways_over_tls(
    backends: Any, proxy: ProxyFactory, certs: Certs
) -> None:
    """A 20 MB upload (records cut across reads) and a 20 MB download to a client that reads
    slowly (the listener's writes wait for it): every byte arrives."""
    b = await backends("a")
    listener = await proxy(RouteSpec(servers=(b.server,)), tls=tls(certs.web))
    size = 20 << 20
    ctx = certs.ca.client_context()
    reader, writer = await asyncio.open_connection(
        "127.0.0.1", listener.port, ssl=ctx, server_hostname="web.example.com"
    )
    head = f"PUT /count HTTP/1.1\r\nHost: web.example.com\r\nContent-Length: {size}\r\n\r\n"
    writer.write(head.encode())
    block = b"y" * (1 << 20)
    for _ in range(size >> 20):
        writer.write(block)
        await writer.drain()
    status, _, body = await asyncio.wait_for(read_response(reader), 30)
    assert status == 200 and body == b'{"received": %d}' % size
    writer.write(f"GET /stream?size={size}&sized=1 HTTP/1.1\r\nHost: x\r\n\r\n".encode())
    await writer.drain()
    head_bytes = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 10)
    assert head_bytes.startswith(b"HTTP/1.1 200")
    got = 0
    while got < size:
        got += len(await asyncio.wait_for(reader.read(1 << 16), 10))
        if got < 4 << 20:
            await asyncio.sleep(0.002)  # slow at first: the proxy's buffers fill
    assert got == size
    writer.close()


async def test_failed_handshakes_are_counted_by_reason(
    backends: Any, proxy: ProxyFactory, certs: Certs
) -> None:
    b = await backends("a")
    registry = CollectorRegistry()
    listener = await proxy(
        RouteSpec(servers=(b.server,)), tls=tls(certs.web), metrics=registry, header_timeout=1.0
    )

    def failures(reason: str) -> float | None:
        labels = {"listener": listener.spec.name, "reason": reason}
        return registry.get_sample_value("interknit_proxy_tls_handshake_failures_total", labels)

    # Plain HTTP to the TLS port: refused by OpenSSL, counted by its reason.
    reader, writer = await asyncio.open_connection("127.0.0.1", listener.port)
    writer.write(b"GET / HTTP/1.1\r\nHost: web.example.com\r\n\r\n")
    await asyncio.wait_for(reader.read(), 5)
    writer.close()
    await until(lambda: failures("http_request") == 1.0)
    # TLS 1.1, which the listener does not speak.
    code, _ = await s_client(listener.port, "-tls1_1", "-cipher", "DEFAULT@SECLEVEL=0")
    assert code != 0
    await until(lambda: failures("unsupported_protocol") == 1.0)
    # A client gone before its hello; one that sends nothing until header_timeout.
    _, writer = await asyncio.open_connection("127.0.0.1", listener.port)
    writer.close()
    await until(lambda: failures("closed") == 1.0)
    reader, writer = await asyncio.open_connection("127.0.0.1", listener.port)
    assert await asyncio.wait_for(reader.read(), 5) == b""
    assert failures("timeout") == 1.0
    writer.close()


async def test_tls13_ticket_goes_with_the_first_answer(
    backends: Any, proxy: ProxyFactory, certs: Certs
) -> None:
    """After a TLS 1.3 handshake the server has only the session ticket left to send, and no
    client waits for it: it leaves with the first answer, in the same write, not alone."""
    b = await backends("a")
    listener = await proxy(RouteSpec(servers=(b.server,)), tls=tls(certs.web))
    ctx = certs.ca.client_context()
    ctx.minimum_version = ssl.TLSVersion.TLSv1_3

    def exchange() -> tuple[bytes, bytes, bool]:
        with socket.create_connection(("127.0.0.1", listener.port)) as raw:
            raw.settimeout(5)
            client = BioClient(raw, ctx)
            obj, incoming, outgoing = client.obj, client.incoming, client.outgoing
            raw.sendall(outgoing.read())  # the client's Finished
            raw.settimeout(0.3)
            try:
                early = raw.recv(65536)  # nothing yet
            except TimeoutError:
                early = b""
            raw.settimeout(5)
            obj.write(b"GET / HTTP/1.1\r\nHost: web.example.com\r\n\r\n")
            raw.sendall(outgoing.read())
            incoming.write(raw.recv(65536))
            answer = b""
            with contextlib.suppress(ssl.SSLWantReadError):
                while True:
                    answer += obj.read(65536)
            return early, answer, obj.session is not None and obj.session.has_ticket

    early, answer, ticket = await asyncio.to_thread(exchange)
    assert early == b""
    assert answer.startswith(b"HTTP/1.1 200 OK") and ticket, (answer, ticket)


async def test_a_closed_tls_connection_is_freed_without_a_collection(
    backends: Any, proxy: ProxyFactory, certs: Certs
) -> None:
    """A node collects garbage rarely (heap.py): what a closed TLS connection held (OpenSSL's
    connection, its protocol and buffers) must go by reference counting alone."""
    import gc

    from interknit.tls.transport import TlsServerConnection

    def alive() -> int:
        return sum(isinstance(o, TlsServerConnection) for o in gc.get_objects())

    b = await backends("a")
    listener = await proxy(RouteSpec(servers=(b.server,)), tls=tls(certs.web))
    ctx = certs.ca.client_context()
    gc.collect()
    gc.disable()
    try:
        before = alive()
        for close in (True, False):  # closed by the listener, and by the client
            for _ in range(10):
                reader, writer = await asyncio.open_connection(
                    "127.0.0.1", listener.port, ssl=ctx, server_hostname="web.example.com"
                )
                extra = "Connection: close\r\n" if close else ""
                writer.write(f"GET / HTTP/1.1\r\nHost: web.example.com\r\n{extra}\r\n".encode())
                status, _, _ = await read_response(reader)
                assert status == 200
                writer.close()
        await until(lambda: not listener.connections)
        await asyncio.sleep(0.1)
        assert alive() - before == 0
    finally:
        gc.enable()


async def test_garbage_before_and_after_the_handshake_closes_that_connection_only(
    backends: Any, proxy: ProxyFactory, certs: Certs
) -> None:
    """Random bytes, records with a forged tag, a record longer than TLS allows: before the
    handshake and after it. Each connection is closed (OpenSSL's alert first, when it has
    one), the failure counted, and the listener goes on answering."""
    import random

    b = await backends("a")
    registry = CollectorRegistry()
    listener = await proxy(
        RouteSpec(servers=(b.server,)), tls=tls(certs.web), metrics=registry, header_timeout=2.0
    )
    rng = random.Random(17)
    forged = b"\x17\x03\x03\x00\x40" + rng.randbytes(64)  # application data, a wrong tag
    too_long = b"\x17\x03\x03\xff\xff" + rng.randbytes(1000)
    garbage = [rng.randbytes(n) for n in (1, 5, 300, 20000)] + [forged, too_long]
    garbage += [b"\x16\x03\x01\x02\x00" + rng.randbytes(512)]  # a "ClientHello" of noise
    ctx = certs.ca.client_context()

    def send_after_handshake(payload: bytes) -> bytes:
        with socket.create_connection(("127.0.0.1", listener.port)) as raw:
            raw.settimeout(5)
            tls_sock = ctx.wrap_socket(raw, server_hostname="web.example.com")
            # The same socket, now written around the TLS layer.
            tls_sock.sendall(b"GET / HTTP/1.1\r\nHost: web.example.com\r\n\r\n")
            assert tls_sock.recv(65536).startswith(b"HTTP/1.1 200")
            raw_fd = socket.socket(fileno=os.dup(tls_sock.fileno()))
            with raw_fd:
                raw_fd.settimeout(5)
                raw_fd.sendall(payload)
                received = b""
                while chunk := raw_fd.recv(65536):
                    received += chunk
            tls_sock.close()
            return received

    def failures() -> float:
        total = 0.0
        for metric in registry.collect():
            if metric.name == "interknit_proxy_tls_handshake_failures":
                total += sum(s.value for s in metric.samples if s.name.endswith("_total"))
        return total

    for payload in garbage:
        reader, writer = await asyncio.open_connection("127.0.0.1", listener.port)
        writer.write(payload)
        assert isinstance(await asyncio.wait_for(reader.read(), 5), bytes)
        writer.close()
    # After the handshake, bytes that end a record (a part of one waits, as a part of a
    # request does, for the keep-alive timeout).
    for payload in (forged, too_long, garbage[-1], b"\x99" + garbage[3]):
        after = await asyncio.to_thread(send_after_handshake, payload)
        # What came back, if anything, is one short record: the alert (TLS 1.3 encrypts it as
        # application data, 19 bytes).
        assert after == b"" or (
            after[:1] in (b"\x15", b"\x17") and len(after) == 5 + int.from_bytes(after[3:5]) < 64
        ), after[:20]
    await until(lambda: failures() == len(garbage) and not listener.connections)
    code, out = await curl(listener.port, certs)
    assert code == 0 and out.startswith("HTTP/1.1 200"), out


async def test_a_client_close_notify_after_its_request_still_gets_the_answer(
    backends: Any, proxy: ProxyFactory, certs: Certs
) -> None:
    """A client that sends its request and then close_notify (it will send nothing more; TLS
    1.3 lets it still read) is answered once its request went upstream (before, the request is
    given up: abort_on_close, as over plaintext), then closed with the server's close_notify."""
    b = await backends("a")
    listener = await proxy(RouteSpec(servers=(b.server,)), tls=tls(certs.web))
    ctx = certs.ca.client_context()

    def exchange() -> tuple[bytes, bool]:
        import time

        with socket.create_connection(("127.0.0.1", listener.port)) as raw:
            raw.settimeout(5)
            client = BioClient(raw, ctx)
            client.obj.write(b"GET /?delay=0.3 HTTP/1.1\r\nHost: web.example.com\r\n\r\n")
            raw.sendall(client.outgoing.read())
            time.sleep(0.15)  # the request is upstream
            with pytest.raises(ssl.SSLWantReadError):
                client.obj.unwrap()  # close_notify written; the server's not here yet
            raw.sendall(client.outgoing.read())
            return client.read_to_close()

    answer, clean = await asyncio.to_thread(exchange)
    assert answer.startswith(b"HTTP/1.1 200 OK") and clean, (answer[:100], clean)
    assert b.seen and b.seen[-1]["path"] == "/?delay=0.3"
