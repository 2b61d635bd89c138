"""The real DnsServer on 127.0.0.1, queried over UDP and TCP by dnspython and by dig."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import dns.asyncquery
import dns.exception
import dns.flags
import dns.message
import dns.rcode
import pytest
from prometheus_client import CollectorRegistry, generate_latest

from interknit.config import ConfigError, parse_config
from interknit.dns.rrl import RrlConfig
from interknit.dns.server import DnsServer
from interknit.dns.setup import build_server
from interknit.dns.zone import Zone, ZoneConfig
from tests.conftest import require_tool
from tests.dns.helpers import ZONE, addresses, inst, put
from tests.nodeproc import free_port

HOST = "127.0.0.1"


@pytest.fixture
async def server() -> AsyncIterator[DnsServer]:
    zone = Zone(ZoneConfig(max_answers=40))
    srv = DnsServer(zone, HOST, 0, CollectorRegistry())
    srv.sync(
        [inst("search", f"s{i}", f"10.0.0.{i}", 9000 + i) for i in range(1, 4)]
        + [inst("big", f"instance-{i:02d}", f"10.4.0.{i}", 7000 + i) for i in range(1, 41)],
        11,
        initial=True,
    )
    await srv.start()
    try:
        yield srv
    finally:
        await srv.stop()


async def test_udp_and_tcp_share_one_port(server: DnsServer) -> None:
    assert server.port > 0
    query = dns.message.make_query(f"search.{ZONE}", "A")
    udp = await dns.asyncquery.udp(query, HOST, port=server.port, timeout=2)
    tcp = await dns.asyncquery.tcp(query, HOST, port=server.port, timeout=2)
    assert len(addresses(udp)) == 3 and len(addresses(tcp)) == 3
    assert udp.flags & dns.flags.AA


async def test_truncated_over_udp_full_over_tcp(server: DnsServer) -> None:
    query = dns.message.make_query(f"_big._tcp.{ZONE}", "SRV")
    udp = await dns.asyncquery.udp(query, HOST, port=server.port, timeout=2)
    assert udp.flags & dns.flags.TC and udp.answer == []
    tcp = await dns.asyncquery.tcp(query, HOST, port=server.port, timeout=2)
    assert not tcp.flags & dns.flags.TC and len(tcp.answer[0]) == 40
    both, used_tcp = await dns.asyncquery.udp_with_fallback(
        query, HOST, port=server.port, timeout=2
    )
    assert used_tcp and len(both.answer[0]) == 40


async def test_several_queries_on_one_tcp_connection(server: DnsServer) -> None:
    reader, writer = await asyncio.open_connection(HOST, server.port)
    try:
        for name in ("search", "big", "nope"):
            wire = dns.message.make_query(f"{name}.{ZONE}", "A").to_wire()
            writer.write(len(wire).to_bytes(2, "big") + wire)
            await writer.drain()
            size = int.from_bytes(await reader.readexactly(2), "big")
            msg = dns.message.from_wire(await reader.readexactly(size))
            expected = dns.rcode.NXDOMAIN if name == "nope" else dns.rcode.NOERROR
            assert msg.rcode() == expected
    finally:
        writer.close()


async def test_refused_and_garbage_keep_the_server_up(server: DnsServer) -> None:
    transport, _ = await asyncio.get_running_loop().create_datagram_endpoint(
        asyncio.DatagramProtocol, remote_addr=(HOST, server.port)
    )
    transport.sendto(b"\x00")
    transport.sendto(b"\xff" * 40)
    transport.close()
    refused = await dns.asyncquery.udp(
        dns.message.make_query("example.com.", "A"), HOST, port=server.port, timeout=2
    )
    assert refused.rcode() == dns.rcode.REFUSED
    ok = await dns.asyncquery.udp(
        dns.message.make_query(f"search.{ZONE}", "A"), HOST, port=server.port, timeout=2
    )
    assert ok.rcode() == dns.rcode.NOERROR


async def test_one_client_holding_connections_leaves_tcp_to_the_others() -> None:
    """One client opening 300 TCP connections and sending nothing once took every one of the
    256 places for the idle timeout (10 of 10 other clients refused for 11.5 s)."""
    metrics = CollectorRegistry()
    srv = DnsServer(Zone(ZoneConfig()), HOST, 0, metrics)
    srv.sync([inst("search", "s1", "10.0.0.1", 9001)], 1, initial=True)
    await srv.start()
    held: list[asyncio.StreamWriter] = []
    try:
        for _ in range(300):
            _, writer = await asyncio.open_connection(HOST, srv.port)
            held.append(writer)
        query = dns.message.make_query(f"search.{ZONE}", "A")
        for n in range(2, 12):  # ten other clients
            answer = await dns.asyncquery.tcp(
                query, HOST, port=srv.port, timeout=2, source=f"127.0.0.{n}"
            )
            assert addresses(answer) == ["10.0.0.1"]
        refused = metrics.get_sample_value(
            "interknit_dns_tcp_refused_total", {"reason": "per-client"}
        )
        assert refused == 300 - srv.max_tcp_per_client
    finally:
        for writer in held:
            writer.close()
        await srv.stop()


def test_the_tcp_limits_come_from_the_config() -> None:
    section = parse_config(
        {"dns": {"tcp_max_connections": 64, "tcp_max_per_client": 4, "tcp_idle_timeout": "3s"}}
    ).dns
    srv = build_server(section, [], CollectorRegistry())
    assert (srv.max_tcp_connections, srv.max_tcp_per_client, srv.tcp_idle_timeout) == (64, 4, 3.0)
    with pytest.raises(ConfigError, match=r"dns\.tcp_max_per_client"):
        parse_config({"dns": {"tcp_max_per_client": 0}})


async def test_events_reach_answers_and_metrics_count(server: DnsServer) -> None:
    server.apply(put(12, inst("search", "s9", "10.0.0.9")))
    query = dns.message.make_query(f"s9.search.{ZONE}", "A")
    msg = await dns.asyncquery.udp(query, HOST, port=server.port, timeout=2)
    assert addresses(msg) == ["10.0.0.9"]
    assert msg.answer[0].ttl == 1  # just changed
    await dns.asyncquery.udp(
        dns.message.make_query(f"_big._tcp.{ZONE}", "SRV"), HOST, port=server.port, timeout=2
    )
    metrics = server.metrics
    assert metrics.query_count("A", "NOERROR", "udp") >= 1
    # What a scrape sees, through the collector.
    text = generate_latest(server.metrics.registry).decode()
    assert 'interknit_dns_queries_total{qtype="A",rcode="NOERROR",transport="udp"}' in text
    assert 'interknit_dns_answers_total{service="search"}' in text
    assert "interknit_dns_truncated_total 1.0" in text


async def test_rate_limiting_drops_and_slips_over_udp() -> None:
    zone = Zone()
    zone.sync([inst("search", "s1", "10.0.0.1")], 1)
    srv = DnsServer(zone, HOST, 0, rrl=RrlConfig(rate=1.0, burst=3.0, slip=2, exempt=()))
    await srv.start()
    try:
        query = dns.message.make_query(f"search.{ZONE}", "A")
        answered = truncated = 0
        for _ in range(8):
            try:
                msg = await dns.asyncquery.udp(query, HOST, port=srv.port, timeout=0.3)
            except dns.exception.Timeout:
                continue
            if msg.flags & dns.flags.TC:
                truncated += 1
            else:
                answered += 1
        assert answered == 3
        assert truncated >= 1
        assert srv.metrics.rate_limited.labels("drop")._value.get() >= 1
        # TCP is never limited: the handshake proves the address.
        msg = await dns.asyncquery.tcp(query, HOST, port=srv.port, timeout=2)
        assert addresses(msg) == ["10.0.0.1"]
    finally:
        await srv.stop()


async def test_dig_queries(server: DnsServer) -> None:
    dig = require_tool("dig")

    async def run(*args: str) -> str:
        proc = await asyncio.create_subprocess_exec(
            dig,
            f"@{HOST}",
            "-p",
            str(server.port),
            "+time=2",
            "+tries=1",
            *args,
            stdout=asyncio.subprocess.PIPE,
        )
        out, _ = await proc.communicate()
        assert proc.returncode == 0
        return out.decode()

    short = await run("+short", f"search.{ZONE}", "A")
    assert sorted(short.split()) == ["10.0.0.1", "10.0.0.2", "10.0.0.3"]
    srv = await run("+short", f"_search._tcp.{ZONE}", "SRV")
    assert f"9001 s1.search.{ZONE}" in srv
    nx = await run(f"nope.{ZONE}", "A")
    assert "status: NXDOMAIN" in nx and "SOA" in nx
    big = await run(f"_big._tcp.{ZONE}", "SRV")  # dig retries over TCP on TC by itself
    records = [line for line in big.splitlines() if "SRV" in line and not line.startswith(";")]
    assert len(records) == 40 and "(TCP)" in big
    refused = await run("example.com", "A")
    assert "status: REFUSED" in refused


async def test_dnsmasq_forwards_the_zone_as_the_docs_say(server: DnsServer) -> None:
    dnsmasq = require_tool("dnsmasq")
    port = free_port()
    proc = await asyncio.create_subprocess_exec(
        dnsmasq,
        "--keep-in-foreground",
        "--conf-file=/dev/null",
        "--no-resolv",
        "--no-hosts",
        "--bind-interfaces",
        f"--listen-address={HOST}",
        f"--port={port}",
        "--pid-file=",
        f"--server=/ik.internal/{HOST}#{server.port}",
        "--rebind-domain-ok=/ik.internal/",
        stderr=asyncio.subprocess.PIPE,
    )
    try:
        query = dns.message.make_query(f"search.{ZONE}", "A")
        msg = None
        deadline = asyncio.get_running_loop().time() + 15
        while msg is None and asyncio.get_running_loop().time() < deadline:
            try:  # dnsmasq needs a moment to bind (longer on a busy machine)
                msg = await dns.asyncquery.udp(query, HOST, port=port, timeout=0.5)
            except (dns.exception.Timeout, ConnectionRefusedError):
                if proc.returncode is not None:
                    break  # dnsmasq gave up (say, its TCP port was taken): see stderr below
                await asyncio.sleep(0.05)
        if msg is None:
            err = (
                b"" if proc.stderr is None or proc.returncode is None else await proc.stderr.read()
            )
            raise AssertionError(f"dnsmasq did not answer: {err.decode(errors='replace')}")
        assert sorted(addresses(msg)) == ["10.0.0.1", "10.0.0.2", "10.0.0.3"]
        nx = await dns.asyncquery.udp(
            dns.message.make_query(f"nope.{ZONE}", "A"), HOST, port=port, timeout=2
        )
        assert nx.rcode() == dns.rcode.NXDOMAIN
    finally:
        if proc.returncode is None:
            proc.terminate()
        await proc.wait()
