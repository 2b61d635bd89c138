"""TLS on the other wires: TCP listeners that route by SNI without terminating (and with),
and upstreams reached over TLS, from HTTP and TCP routes."""

from __future__ import annotations

import asyncio
import ssl
import subprocess
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest

from interknit.proxy import MatchSpec, RouteSpec
from interknit.tls.client import ClientTlsSpec
from interknit.tls.server import CertSpec, ServerTlsSpec
from tests.conftest import require_tool
from tests.proxy.conftest import ProxyFactory, read_response, seen_headers, until
from tests.tlscerts import Issued, TestCA


class Certs:
    def __init__(self, directory: Path) -> None:
        self.ca = TestCA(directory / "ca")
        self.other = TestCA(directory / "other", name="another-ca")
        self.a = self.ca.issue("a", dns=("a.example.com",))
        self.b = self.ca.issue("b", dns=("*.b.example.com",))
        self.db = self.ca.issue("db", dns=("db.example.com", "*.tcp.example.com"))
        self.backend = self.ca.issue("backend", dns=("backend.example.com",))
        self.client = self.ca.issue("proxy-client", ips=(), usage="clientAuth")
        self.untrusted = self.other.issue("backend", dns=("backend.example.com",))


@pytest.fixture(scope="module")
def certs(tmp_path_factory: pytest.TempPathFactory) -> Certs:
    return Certs(tmp_path_factory.mktemp("tls-wire"))


def server_context(pair: Issued, client_ca: Path | None = None) -> ssl.SSLContext:
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.load_cert_chain(str(pair.cert), str(pair.key))
    if client_ca is not None:
        ctx.load_verify_locations(cafile=str(client_ca))
        ctx.verify_mode = ssl.CERT_REQUIRED
    return ctx


Servers = Callable[..., Awaitable[int]]


@pytest.fixture
async def echo_servers() -> AsyncIterator[Servers]:
    """TCP servers that answer every read with their name and what they read."""
    started: list[asyncio.Server] = []

    async def make(name: str, ctx: ssl.SSLContext | None = None) -> int:
        async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            try:
                while data := await reader.read(65536):
                    writer.write(name.encode() + b":" + data)
                    await writer.drain()
            except (ConnectionError, ssl.SSLError):
                pass
            finally:
                writer.close()

        server = await asyncio.start_server(serve, "127.0.0.1", 0, ssl=ctx)
        started.append(server)
        return int(server.sockets[0].getsockname()[1])

    yield make
    for server in started:
        server.close()


async def talk(
    port: int, data: bytes, *, ctx: ssl.SSLContext | None = None, sni: str | None = None
) -> bytes:
    reader, writer = await asyncio.open_connection(
        "127.0.0.1", port, ssl=ctx, server_hostname=sni if ctx is not None else None
    )
    try:
        writer.write(data)
        return await asyncio.wait_for(reader.read(65536), 10)
    finally:
        writer.close()


def sni_route(name: str | None, port: int, **kw: Any) -> RouteSpec:
    match = None if name is None else MatchSpec(sni=name)
    return RouteSpec(match=match, servers=(f"127.0.0.1:{port}",), **kw)


async def test_tcp_routes_by_sni_without_terminating(
    proxy: ProxyFactory, echo_servers: Servers, certs: Certs
) -> None:
    a = await echo_servers("A", server_context(certs.a))
    b = await echo_servers("B", server_context(certs.b))
    plain = await echo_servers("C")
    listener = await proxy(
        sni_route("a.example.com", a),
        sni_route("*.b.example.com", b),
        sni_route(None, plain),
        protocol="tcp",
    )
    ctx = certs.ca.client_context()
    # The client's TLS runs end to end: it verifies the backend's own certificate.
    assert await talk(listener.port, b"hi", ctx=ctx, sni="a.example.com") == b"A:hi"
    assert await talk(listener.port, b"hi", ctx=ctx, sni="x.b.example.com") == b"B:hi"
    # Not TLS at all: the route without match takes it, bytes untouched.
    assert await talk(listener.port, b"PING\r\n") == b"C:PING\r\n"
    # openssl s_client sees the certificate of the backend its name chose.
    openssl = require_tool("openssl")
    proc = await asyncio.create_subprocess_exec(
        openssl, "s_client", "-connect", f"127.0.0.1:{listener.port}",
        "-servername", "q.b.example.com", "-CAfile", str(certs.ca.cert),
        stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
    )  # fmt: skip
    out = (await asyncio.wait_for(proc.communicate(), 20))[0].decode()
    assert "CN = b" in out and "Verify return code: 0 (ok)" in out, out


async def test_tcp_sni_without_a_default_route_closes_the_rest(
    proxy: ProxyFactory, echo_servers: Servers, certs: Certs
) -> None:
    a = await echo_servers("A", server_context(certs.a))
    listener = await proxy(
        sni_route("a.example.com", a), protocol="tcp", header_timeout=1.0, name="strict"
    )
    ctx = certs.ca.client_context()
    ctx.check_hostname = False
    with pytest.raises((ssl.SSLError, ConnectionError)):
        await talk(listener.port, b"hi", ctx=ctx, sni="other.example.com")
    assert await talk(listener.port, b"GET / HTTP/1.1\r\n\r\n") == b""
    # A hello that never completes is cut at header_timeout.
    reader, writer = await asyncio.open_connection("127.0.0.1", listener.port)
    writer.write(b"\x16\x03\x01\x02\x00\x01\x00\x01")
    loop = asyncio.get_running_loop()
    began = loop.time()
    assert await asyncio.wait_for(reader.read(), 10) == b""
    assert 0.9 <= loop.time() - began < 3.0
    writer.close()


async def test_tcp_listener_terminates_and_routes_by_the_handshake_name(
    proxy: ProxyFactory, echo_servers: Servers, certs: Certs
) -> None:
    db = await echo_servers("DB")
    other = await echo_servers("OTHER")
    secure_backend = await echo_servers("SECURE", server_context(certs.backend))
    upstream = ClientTlsSpec(ca=str(certs.ca.cert), sni="backend.example.com")
    listener = await proxy(
        sni_route("db.example.com", db),
        sni_route("*.tcp.example.com", secure_backend, upstream_tls=upstream),
        sni_route(None, other),
        protocol="tcp",
        tls=ServerTlsSpec(certs=(CertSpec(str(certs.db.cert), str(certs.db.key)),), alpn=()),
    )
    ctx = certs.ca.client_context()
    assert await talk(listener.port, b"q", ctx=ctx, sni="db.example.com") == b"DB:q"
    # Terminated here, then TLS again to the backend, verified against its name.
    assert await talk(listener.port, b"q", ctx=ctx, sni="x.tcp.example.com") == b"SECURE:q"
    ctx.check_hostname = False
    assert await talk(listener.port, b"q", ctx=ctx, sni=None) == b"OTHER:q"


async def test_http_upstream_over_tls_verified_and_kept_alive(
    backends: Any, proxy: ProxyFactory, certs: Certs
) -> None:
    b = await backends("tls", ssl_context=server_context(certs.backend))
    upstream = ClientTlsSpec(ca=str(certs.ca.cert), sni="backend.example.com")
    listener = await proxy(RouteSpec(servers=(b.server,), upstream_tls=upstream))
    reader, writer = await asyncio.open_connection("127.0.0.1", listener.port)
    for _ in range(3):
        writer.write(b"GET /x HTTP/1.1\r\nHost: web\r\n\r\n")
        status, headers, _ = await read_response(reader)
        assert status == 200 and headers["x-backend"] == "tls"
    writer.close()
    assert seen_headers(b.seen[-1])["x-forwarded-proto"] == "http"
    # One TLS connection carried the three requests, and waits for the next.
    (pool,) = listener.tls_upstreams.values()  # type: ignore[union-attr]
    assert pool.idle_count("127.0.0.1", b.port) == 1
    assert listener.upstreams.idle_count("127.0.0.1", b.port) == 0  # type: ignore[union-attr]


async def test_http_upstream_tls_failures_are_502_tls_failed(
    backends: Any, proxy: ProxyFactory, certs: Certs
) -> None:
    untrusted = await backends("u", ssl_context=server_context(certs.untrusted))
    good = await backends("g", ssl_context=server_context(certs.backend))
    verified = ClientTlsSpec(ca=str(certs.ca.cert), sni="backend.example.com")
    wrong_name = ClientTlsSpec(ca=str(certs.ca.cert), sni="elsewhere.example.com")
    lax = ClientTlsSpec(verify=False)
    listener = await proxy(
        RouteSpec(match=MatchSpec(path_prefix="/u"), servers=(untrusted.server,),
                  upstream_tls=verified, attempts=0),
        RouteSpec(match=MatchSpec(path_prefix="/n"), servers=(good.server,),
                  upstream_tls=wrong_name, attempts=0),
        RouteSpec(match=MatchSpec(path_prefix="/l"), servers=(untrusted.server,),
                  upstream_tls=lax),
    )  # fmt: skip
    for path, status, reason in (("/u", 502, "tls-failed"), ("/n", 502, "tls-failed"),
                                 ("/l", 200, None)):  # fmt: skip
        reader, writer = await asyncio.open_connection("127.0.0.1", listener.port)
        writer.write(f"GET {path} HTTP/1.1\r\nHost: web\r\n\r\n".encode())
        got, headers, _ = await read_response(reader)
        writer.close()
        assert got == status, path
        assert headers.get("x-interknit-reason") == reason


async def test_http_upstream_with_a_client_certificate(
    backends: Any, proxy: ProxyFactory, certs: Certs
) -> None:
    b = await backends("mtls", ssl_context=server_context(certs.backend, certs.ca.cert))
    with_cert = ClientTlsSpec(
        ca=str(certs.ca.cert), sni="backend.example.com",
        cert=str(certs.client.cert), key=str(certs.client.key),
    )  # fmt: skip
    without = ClientTlsSpec(ca=str(certs.ca.cert), sni="backend.example.com")
    listener = await proxy(
        RouteSpec(match=MatchSpec(path_prefix="/yes"), servers=(b.server,),
                  upstream_tls=with_cert),
        RouteSpec(servers=(b.server,), upstream_tls=without, attempts=0),
    )  # fmt: skip
    for path, ok in (("/yes", True), ("/no", False)):
        reader, writer = await asyncio.open_connection("127.0.0.1", listener.port)
        writer.write(f"GET {path} HTTP/1.1\r\nHost: web\r\n\r\n".encode())
        status, _, _ = await read_response(reader)
        writer.close()
        assert (status == 200) == ok, (path, status)
    await until(lambda: len(listener.connections) == 0)
