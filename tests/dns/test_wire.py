"""The hand-written codec against dnspython, and garbage that must never crash the zone."""

from __future__ import annotations

import struct

import dns.edns
import dns.flags
import dns.message
import dns.name
import dns.rcode
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from interknit.dns import wire
from interknit.dns.zone import Zone
from tests.dns.helpers import ZONE, inst

LABEL = st.from_regex(r"[A-Za-z0-9_-]{1,20}", fullmatch=True)
NAMES = st.lists(LABEL, min_size=0, max_size=5).map(lambda ls: ".".join([*ls, ""]) or ".")
TYPES = st.sampled_from(["A", "AAAA", "SRV", "TXT", "SOA", "NS", "ANY", "MX", "CAA", "TYPE999"])


def zone() -> Zone:
    z = Zone()
    z.sync([inst("search", "s1", "10.0.0.1"), inst("search", "s2", "10.0.0.2")], 3)
    return z


@settings(max_examples=300, deadline=None)
@given(name=NAMES, rdtype=TYPES, edns=st.sampled_from([None, 512, 1232, 4096]))
def test_dnspython_queries_parse_identically(name: str, rdtype: str, edns: int | None) -> None:
    if edns is None:
        query = dns.message.make_query(name, rdtype)
    else:
        query = dns.message.make_query(name, rdtype, use_edns=0, payload=edns)
    data = query.to_wire()
    parsed = wire.parse_query(data)
    assert parsed is not None
    assert parsed.id == query.id
    assert parsed.flags == query.flags
    expected = dns.name.from_text(name).to_wire()
    assert expected is not None and parsed.name == expected.lower()
    assert parsed.qtype == query.question[0].rdtype
    assert parsed.qclass == 1
    assert parsed.edns == (edns is not None)
    if edns is not None:
        assert parsed.payload == edns
    # The slow path agrees with the fast one.
    slow = wire.parse_unusual(data)
    assert (slow.id, slow.name, slow.qtype, slow.question, slow.edns, slow.payload) == (
        parsed.id,
        parsed.name,
        parsed.qtype,
        parsed.question,
        parsed.edns,
        parsed.payload,
    )


@settings(max_examples=500, deadline=None)
@given(data=st.binary(max_size=300))
def test_random_garbage_never_crashes(data: bytes) -> None:
    reply = zone().answer(data, "192.0.2.1", 0.0)
    if reply is None:
        return
    assert reply.wire[:2] == data[:2]
    msg = dns.message.from_wire(reply.wire)
    assert msg.flags & dns.flags.QR


@settings(max_examples=300, deadline=None)
@given(cut=st.integers(min_value=0, max_value=60), flip=st.integers(0, 59), bit=st.integers(0, 7))
def test_truncated_and_mangled_queries_get_formerr_or_a_valid_reply(
    cut: int, flip: int, bit: int
) -> None:
    data = bytearray(dns.message.make_query(f"search.{ZONE}", "A", use_edns=0).to_wire())
    if flip < len(data):
        data[flip] ^= 1 << bit
    packet = bytes(data[: len(data) - cut])
    reply = zone().answer(packet, "192.0.2.1", 0.0)
    if reply is not None:
        dns.message.from_wire(reply.wire)


def test_short_packets_and_responses_are_dropped() -> None:
    z = zone()
    assert z.answer(b"\x12", "192.0.2.1", 0.0) is None
    response = dns.message.make_response(dns.message.make_query(f"search.{ZONE}", "A"))
    assert z.answer(response.to_wire(), "192.0.2.1", 0.0) is None


def test_truncated_question_is_formerr_without_question() -> None:
    data = dns.message.make_query(f"search.{ZONE}", "A").to_wire()[:-3]
    reply = zone().answer(data, "192.0.2.1", 0.0)
    assert reply is not None and reply.rcode == wire.FORMERR
    msg = dns.message.from_wire(reply.wire)
    assert msg.rcode() == dns.rcode.FORMERR and msg.question == []


def test_trailing_bytes_are_formerr() -> None:
    data = dns.message.make_query(f"search.{ZONE}", "A").to_wire() + b"\x00"
    with pytest.raises(wire.FormatError):
        wire.parse_query(data)


def test_compressed_question_name_takes_the_slow_path_and_fails_cleanly() -> None:
    # With one question a pointer can only point at the header or at itself: never valid.
    header = struct.pack("!HHHHHH", 0x1234, 0x0100, 1, 0, 0, 0)
    packet = header + b"\x01x" + wire.pointer(12) + struct.pack("!HH", 1, 1)
    assert wire.parse_query(packet) is None
    reply = zone().answer(packet, "192.0.2.1", 0.0)
    assert reply is not None and reply.rcode == wire.FORMERR
    assert dns.message.from_wire(reply.wire).id == 0x1234


def test_two_questions_are_formerr() -> None:
    header = struct.pack("!HHHHHH", 7, 0x0100, 2, 0, 0, 0)
    question = wire.name_to_wire(f"search.{ZONE}") + struct.pack("!HH", 1, 1)
    reply = zone().answer(header + question * 2, "192.0.2.1", 0.0)
    assert reply is not None and reply.rcode == wire.FORMERR


def test_ecs_option_is_read_by_dnspython_and_cookies_stay_on_the_fast_path() -> None:
    ecs = dns.edns.ECSOption("198.51.100.0", 24)
    data = dns.message.make_query(f"search.{ZONE}", "A", use_edns=0, options=[ecs]).to_wire()
    assert wire.parse_query(data) is None
    parsed = wire.parse_unusual(data)
    assert parsed.ecs is not None and parsed.ecs.source == 24
    assert str(parsed.ecs.address) == "198.51.100.0"
    cookie = dns.edns.GenericOption(dns.edns.OptionType.COOKIE, b"\x01" * 8)
    data = dns.message.make_query(f"search.{ZONE}", "A", use_edns=0, options=[cookie]).to_wire()
    fast = wire.parse_query(data)
    assert fast is not None and fast.edns and fast.ecs is None


def test_records_point_only_into_the_question() -> None:
    qname = wire.name_to_wire(f"_db._tcp.{ZONE}")
    target = wire.name_to_wire(f"d1.db.{ZONE}")
    packed = wire.compress(target, qname)
    assert packed == b"\x02d1\x02db" + wire.pointer(12 + len(b"\x03_db\x04_tcp"))
    assert wire.compress(qname, qname) == wire.QNAME_POINTER
    # A suffix that is not on a label boundary of the question is not shared.
    assert wire.compress(wire.name_to_wire("nal."), wire.name_to_wire("internal.")) == (
        wire.name_to_wire("nal.")
    )


def test_name_to_wire_rejects_bad_names() -> None:
    with pytest.raises(ValueError):
        wire.name_to_wire("a" * 64 + ".")
    with pytest.raises(ValueError):
        wire.name_to_wire(("a" * 63 + ".") * 5)


@pytest.mark.parametrize("size", [0, 7, 9, 15, 41])
def test_a_malformed_cookie_is_formerr(size: int) -> None:
    """RFC 7873 5.2.2; the fast path skipped every option it does not act on (found by the
    packet fuzz test: dnspython refuses such a query, the server answered it)."""
    query = dns.message.make_query(f"search.{ZONE}", "A", use_edns=0)
    query.use_edns(0, options=[dns.edns.GenericOption(10, b"c" * size)])
    reply = zone().answer(query.to_wire(), "192.0.2.1", 0.0)
    assert reply is not None and dns.message.from_wire(reply.wire).rcode() == dns.rcode.FORMERR
    for good in (8, 16, 40):
        query.use_edns(0, options=[dns.edns.GenericOption(10, b"c" * good)])
        reply = zone().answer(query.to_wire(), "192.0.2.1", 0.0)
        assert reply is not None
        assert dns.message.from_wire(reply.wire).rcode() == dns.rcode.NOERROR
