"""HAProxy fed by the zone's SRV records, configured as docs/dns.md says."""

from __future__ import annotations

import asyncio
import socket
import tempfile
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from prometheus_client import CollectorRegistry

from interknit.dns.server import DnsServer
from interknit.dns.zone import Zone
from tests.conftest import require_tool
from tests.dns.helpers import inst, put

HOST = "127.0.0.1"
SERVER_OPTIONS = "resolvers interknit resolve-prefer ipv4 init-addr none"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind((HOST, 0))
        return int(sock.getsockname()[1])


async def backend(name: str) -> asyncio.Server:
    return await backend_at(name, HOST, 0)


async def backend_at(name: str, host: str, port: int) -> asyncio.Server:
    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            await reader.readuntil(b"\r\n\r\n")
            body = name.encode()
            writer.write(
                b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\nConnection: close\r\n\r\n%s"
                % (len(body), body)
            )
            await writer.drain()
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        finally:
            writer.close()

    return await asyncio.start_server(handle, host, port)


async def get(port: int) -> str | None:
    try:
        reader, writer = await asyncio.wait_for(asyncio.open_connection(HOST, port), 1)
    except (OSError, TimeoutError):
        return None
    try:
        writer.write(b"GET / HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        raw = await asyncio.wait_for(reader.read(), 2)
    except (OSError, TimeoutError):
        return None
    finally:
        writer.close()
    head, _, body = raw.partition(b"\r\n\r\n")
    return body.decode() if head.startswith(b"HTTP/1.1 200") else None


@pytest.fixture
async def backends() -> AsyncIterator[list[asyncio.Server]]:
    servers = [await backend("one"), await backend("two"), await backend("three")]
    yield servers
    for server in servers:
        server.close()


async def test_haproxy_server_template_follows_srv_records(
    backends: list[asyncio.Server],
) -> None:
    haproxy = require_tool("haproxy")
    ports = [int(s.sockets[0].getsockname()[1]) for s in backends]
    zone = Zone()
    dns_server = DnsServer(zone, HOST, 0, CollectorRegistry())
    dns_server.sync([inst("web", f"w{i}", HOST, ports[i]) for i in (0, 1)], 1, initial=True)
    await dns_server.start()
    front = free_port()
    config = f"""
global
    stats timeout 5s
defaults
    mode http
    timeout connect 1s
    timeout client 5s
    timeout server 5s
resolvers interknit
    nameserver ik {HOST}:{dns_server.port}
    accepted_payload_size 1232
    hold valid 1s
    hold obsolete 1s
    timeout resolve 200ms
    timeout retry 200ms
frontend fe
    bind {HOST}:{front}
    default_backend web
backend web
    balance roundrobin
    server-template web 4 _web._tcp.ik.internal {SERVER_OPTIONS}
"""
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "haproxy.cfg"
        path.write_text(config)
        proc = await asyncio.create_subprocess_exec(
            haproxy, "-db", "-f", str(path), stdout=asyncio.subprocess.DEVNULL
        )
        try:

            async def seen(want: set[str]) -> set[str]:
                got: set[str] = set()
                for _ in range(100):
                    body = await get(front)
                    if body is not None:
                        got.add(body)
                    if got >= want:
                        return got
                    await asyncio.sleep(0.05)
                return got

            assert await seen({"one", "two"}) == {"one", "two"}
            # A new instance joins and the first one leaves: HAProxy follows the records.
            dns_server.apply(put(2, inst("web", "w2", HOST, ports[2])))
            dns_server.apply(put(3, inst("web", "w0", HOST, ports[0], check_status="critical")))
            # HAProxy lets go of a vanished record after "hold obsolete" (1s); poll for it.
            after: set[str | None] = set()
            for _ in range(100):
                after = {await get(front) for _ in range(8)}
                if after == {"two", "three"}:
                    break
                await asyncio.sleep(0.1)
            assert after == {"two", "three"}
        finally:
            proc.terminate()
            await proc.wait()
            await dns_server.stop()


async def test_nginx_resolver_spreads_over_the_rotated_addresses() -> None:
    nginx = require_tool("nginx")
    # Two instances on the same port at two loopback addresses: nginx uses A records only.
    first = await backend_at("one", "127.0.0.1", 0)
    port = int(first.sockets[0].getsockname()[1])
    try:
        second = await backend_at("two", "127.0.0.2", port)
    except OSError:
        first.close()
        pytest.skip("127.0.0.2 is not usable here")
    zone = Zone()
    dns_server = DnsServer(zone, HOST, 0, CollectorRegistry())
    dns_server.sync(
        [inst("search", "s1", "127.0.0.1", port), inst("search", "s2", "127.0.0.2", port)],
        1,
        initial=True,
    )
    await dns_server.start()
    front = free_port()
    with tempfile.TemporaryDirectory() as tmp:
        config = f"""
daemon off;
master_process off;
pid {tmp}/nginx.pid;
error_log {tmp}/error.log;
events {{ worker_connections 64; }}
http {{
    access_log off;
    client_body_temp_path {tmp};
    proxy_temp_path {tmp};
    fastcgi_temp_path {tmp};
    uwsgi_temp_path {tmp};
    scgi_temp_path {tmp};
    resolver {HOST}:{dns_server.port} valid=1s ipv6=off;
    server {{
        listen {HOST}:{front};
        location / {{
            set $search_backend http://search.ik.internal:{port};
            proxy_pass $search_backend;
        }}
    }}
}}
"""
        path = Path(tmp) / "nginx.conf"
        path.write_text(config)
        proc = await asyncio.create_subprocess_exec(
            nginx, "-p", tmp, "-c", str(path), stderr=asyncio.subprocess.DEVNULL
        )
        try:
            seen: set[str] = set()
            for _ in range(100):
                body = await get(front)
                if body is not None:
                    seen.add(body)
                if seen == {"one", "two"}:
                    break
                await asyncio.sleep(0.05)
            assert seen == {"one", "two"}
        finally:
            proc.terminate()
            await proc.wait()
            await dns_server.stop()
            first.close()
            second.close()
