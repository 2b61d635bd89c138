"""DNS packets, valid and mangled, at the real server over UDP and TCP: a property test.

The server runs on its own thread and event loop; the client is a plain socket. Each input
starts as a query dnspython builds (names in and out of the zone, any type and class, EDNS
with and without options, any opcode and flags) and is then maybe mangled (a bit flipped, cut
short, bytes appended, counts changed, a name turned into a compression pointer). What holds
for every input:

* a reply, if any, is a DNS message dnspython reads, a response, with the query's id and
  opcode; a packet that is itself a response gets no reply;
* any opcode but QUERY is NOTIMP; a query dnspython reads (one question, nothing after it) is
  answered, echoing its question, with an answer code a query may get; a packet dnspython
  cannot read as a query is FORMERR (or, without a readable header, no reply);
* a UDP reply fits the client's buffer (512 bytes, or what its EDNS says, at most 1232);
* over TCP the same packet gets the same answer code (and is never truncated);
* the server answers a plain query afterwards.

The counts of inputs tried, by what they were, are printed (with -s, or on failure).
"""

from __future__ import annotations

import asyncio
import os
import socket
import struct
import threading
from collections import Counter
from collections.abc import Iterator

import dns.edns
import dns.exception
import dns.flags
import dns.message
import dns.opcode
import dns.rcode
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from prometheus_client import CollectorRegistry

from interknit.dns.server import DnsServer
from interknit.dns.zone import Zone, ZoneConfig
from tests.dns.helpers import ZONE, inst

EXAMPLES = int(os.environ.get("INTERKNIT_FUZZ_EXAMPLES", "400"))
QUERY_RCODES = {
    dns.rcode.NOERROR,
    dns.rcode.NXDOMAIN,
    dns.rcode.REFUSED,
    dns.rcode.FORMERR,  # a question for the OPT type
    dns.rcode.BADVERS,
    dns.rcode.SERVFAIL,  # an answer too big for TCP's length prefix (only huge TXT meta)
}


class ServerThread:
    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self.ready = threading.Event()
        self.thread = threading.Thread(target=self.run, daemon=True)
        self.port = 0
        self.tried: Counter[str] = Counter()

    def run(self) -> None:
        asyncio.set_event_loop(self.loop)
        self.loop.run_until_complete(self.setup())
        self.ready.set()
        self.loop.run_forever()

    async def setup(self) -> None:
        zone = Zone(ZoneConfig(max_answers=40))
        self.server = DnsServer(zone, "127.0.0.1", 0, CollectorRegistry(), rate_limit=False)
        instances = [inst("search", f"s{i}", f"10.0.0.{i}", 9000 + i) for i in range(1, 4)]
        instances += [inst("big", f"b{i:02d}", f"10.4.0.{i}", 7000 + i) for i in range(1, 41)]
        instances += [inst("meta", "m1", "10.9.0.1", meta={"k": "v" * 200})]
        instances += [inst("six", "v6", "2001:db8::1")]
        self.server.sync(instances, 1, initial=True)
        await self.server.start()
        self.port = self.server.port

    def stop(self) -> None:
        async def down() -> None:
            await self.server.stop()

        asyncio.run_coroutine_threadsafe(down(), self.loop).result(5)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(5)


@pytest.fixture(scope="module")
def server() -> Iterator[ServerThread]:
    st_ = ServerThread()
    st_.thread.start()
    assert st_.ready.wait(10)
    try:
        yield st_
    finally:
        print(f"\ndns fuzz: {sum(st_.tried.values())} inputs: {dict(st_.tried)}")
        st_.stop()


# ---------------------------------------------------------------------- inputs

NAMES = st.sampled_from(
    [
        f"search.{ZONE}",
        f"SeArCh.{ZONE}",
        f"s1.search.{ZONE}",
        f"_search._tcp.{ZONE}",
        f"big.{ZONE}",
        f"_big._tcp.{ZONE}",
        f"m1.meta.{ZONE}",
        f"six.{ZONE}",
        f"nothing.{ZONE}",
        ZONE,
        f"ns.{ZONE}",
        "example.com.",
        ".",
        f"{'a' * 63}.{'b' * 63}.{ZONE}",
    ]
)
TYPES = st.one_of(
    st.sampled_from(["A", "AAAA", "SRV", "TXT", "SOA", "NS", "ANY", "MX", "AXFR", "IXFR", "OPT"]),
    st.integers(0, 65535),
)
CLASSES = st.sampled_from(["IN", "IN", "IN", "CH", "ANY", 254, 0, 65535])
OPTIONS = st.lists(
    st.one_of(
        st.builds(
            lambda a, n: dns.edns.ECSOption(a, n),
            st.sampled_from(["192.0.2.0", "10.1.2.3", "2001:db8::"]),
            st.integers(0, 32),
        ),
        st.builds(lambda d: dns.edns.GenericOption(10, d), st.binary(min_size=8, max_size=40)),
        st.builds(lambda d: dns.edns.GenericOption(12, d), st.binary(max_size=20)),
        st.builds(
            lambda c, d: dns.edns.GenericOption(c, d), st.integers(0, 65535), st.binary(max_size=8)
        ),
    ),
    max_size=2,
)


@st.composite
def packets(draw: st.DrawFn) -> tuple[str, bytes]:
    qtype = draw(TYPES)
    try:
        query = dns.message.make_query(draw(NAMES), qtype, rdclass=draw(CLASSES))
    except (dns.exception.DNSException, ValueError):
        query = dns.message.make_query(f"search.{ZONE}", "A")
    if draw(st.booleans()):
        query.use_edns(
            draw(st.sampled_from([0, 0, 0, 1])),
            payload=draw(st.sampled_from([0, 512, 1232, 4096, 65535])),
            options=draw(OPTIONS),
        )
    flags = draw(st.sampled_from([0, dns.flags.RD, dns.flags.CD, dns.flags.AD, dns.flags.TC]))
    query.flags |= flags
    opcode = draw(st.sampled_from([0, 0, 0, 0, 1, 2, 4, 5, 15]))
    query.set_opcode(opcode)
    try:
        data = bytearray(query.to_wire())
    except dns.exception.DNSException:
        data = bytearray(dns.message.make_query(f"search.{ZONE}", "A").to_wire())
    how = draw(st.sampled_from(["as built"] * 6 + ["flip", "cut", "append", "counts", "pointer"]))
    if how == "flip":
        at = draw(st.integers(0, len(data) - 1))
        data[at] ^= 1 << draw(st.integers(0, 7))
    elif how == "cut":
        data = data[: draw(st.integers(0, len(data) - 1))]
    elif how == "append":
        data += draw(st.binary(min_size=1, max_size=20))
    elif how == "counts" and len(data) >= 12:
        field = draw(st.integers(0, 3))
        struct.pack_into("!H", data, 4 + 2 * field, draw(st.integers(0, 3)))
    elif how == "pointer" and len(data) > 14:
        # The question name becomes a pointer: to itself (a loop) or into the header.
        data[12:14] = struct.pack("!H", 0xC000 | draw(st.sampled_from([12, 0, 4, 200])))
    return f"opcode {opcode}, {how}", bytes(data)


# ---------------------------------------------------------------------- the exchange


def udp(port: int, data: bytes) -> bytes | None:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        sock.settimeout(0.3)
        sock.sendto(data, ("127.0.0.1", port))
        try:
            return sock.recv(65535)
        except TimeoutError:
            return None


def tcp(port: int, data: bytes) -> bytes | None:
    with socket.create_connection(("127.0.0.1", port), timeout=2) as sock:
        sock.sendall(struct.pack("!H", len(data)) + data)
        try:
            head = sock.recv(2)
            if len(head) < 2:
                return None
            (size,) = struct.unpack("!H", head)
            body = b""
            while len(body) < size:
                chunk = sock.recv(size - len(body))
                if not chunk:
                    return None
                body += chunk
            return body
        except (TimeoutError, ConnectionResetError):
            return None


def read_as_query(data: bytes) -> dns.message.Message | None:
    """What dnspython makes of the packet as a query: None if it cannot read it, or it is
    not a query of one question."""
    try:
        msg = dns.message.from_wire(data)
    except Exception:
        return None
    if len(msg.question) != 1:
        return None
    return msg


@settings(
    max_examples=EXAMPLES,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(packet=packets())
def test_every_packet_gets_a_lawful_reply_or_none(
    server: ServerThread, packet: tuple[str, bytes]
) -> None:
    what, data = packet
    header = struct.unpack_from("!HH", data) if len(data) >= 4 else None
    reply = udp(server.port, data)
    if reply is None:
        server.tried[f"{what}: no reply"] += 1
        # Only what cannot be answered goes unanswered: no header, or a response.
        assert len(data) < 12 or (header is not None and header[1] & dns.flags.QR), data
        return
    assert header is not None
    answer = dns.message.from_wire(reply)
    rcode = answer.rcode()
    server.tried[f"{what}: {dns.rcode.to_text(rcode)}"] += 1
    assert answer.flags & dns.flags.QR and answer.id == header[0]
    opcode = (header[1] >> 11) & 0xF
    assert answer.opcode() == opcode
    query = read_as_query(data)
    if opcode != 0:
        assert rcode == dns.rcode.NOTIMP, (data, answer)
    elif query is None:
        assert rcode == dns.rcode.FORMERR, (data, answer)
    else:
        assert rcode in QUERY_RCODES, (data, answer)
        if rcode != dns.rcode.FORMERR:
            asked = query.question[0]
            echoed = answer.question[0]
            assert (echoed.name, echoed.rdtype, echoed.rdclass) == (
                asked.name,
                asked.rdtype,
                asked.rdclass,
            )
    limit = 512
    if query is not None and query.edns >= 0:
        limit = min(max(query.payload, 512), 1232)
    assert len(reply) <= limit, (len(reply), limit)
    over_tcp = tcp(server.port, data)
    assert over_tcp is not None
    assert dns.message.from_wire(over_tcp).rcode() == rcode
    assert not dns.message.from_wire(over_tcp).flags & dns.flags.TC


def test_the_server_still_answers(server: ServerThread) -> None:
    reply = udp(server.port, dns.message.make_query(f"search.{ZONE}", "A").to_wire())
    assert reply is not None
    assert dns.message.from_wire(reply).rcode() == dns.rcode.NOERROR
