"""The DNS wire format of the common case, packed and parsed by hand.

Almost every query a server sees is a standard query with one question and at most one OPT
record. This module parses exactly that, in a few microseconds, and packs the records the zone
pre-encodes. Anything else (several questions, a compressed question name, EDNS options,
additional records besides OPT) is left to ``parse_unusual``, which uses dnspython: slow but
complete, and rare.

Records are packed so that they can be reordered freely: a name inside a record points, at
most, into the *question*, which always starts at offset 12 and has a fixed length for a given
name. That is what lets the zone keep answers as bytes and rotate them by slicing.
"""

from __future__ import annotations

import ipaddress
import struct
from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import dns.edns

# Record types and classes we name.
A = 1
NS = 2
SOA = 6
HINFO = 13
TXT = 16
AAAA = 28
SRV = 33
OPT = 41
IXFR = 251
AXFR = 252
ANY = 255
CLASS_IN = 1

# Response codes.
NOERROR = 0
FORMERR = 1
SERVFAIL = 2
NXDOMAIN = 3
NOTIMP = 4
REFUSED = 5
BADVERS = 16  # extended: the upper 8 bits go into the OPT record's TTL

# Header flag bits.
QR = 0x8000
OPCODE_MASK = 0x7800
AA = 0x0400
TC = 0x0200
RD = 0x0100
CD = 0x0010

ECS_CODE = 8
COOKIE_CODE = 10
MAX_NAME = 255

HEADER = struct.Struct("!HHHHHH")
_H = struct.Struct("!H")
_RR_FIXED = struct.Struct("!HHIH")  # type, class, ttl, rdlength
_OPT_FIXED = struct.Struct("!HHIH")


class FormatError(Exception):
    """The packet is not a DNS query we can read; answer FORMERR (or drop it, see ``reply_to``)."""


@dataclass(slots=True)
class Ecs:
    """An EDNS Client Subnet option (RFC 7871) as the client sent it."""

    family: int  # 1 = IPv4, 2 = IPv6
    source: int  # source prefix length
    address: ipaddress.IPv4Address | ipaddress.IPv6Address


@dataclass(slots=True)
class Query:
    """One parsed query. ``name`` is the lower-cased wire form of the question name."""

    id: int
    flags: int
    name: bytes
    qtype: int
    qclass: int
    # The question exactly as the client sent it (case preserved, for 0x20 clients).
    question: bytes
    edns: bool = False
    payload: int = 512
    edns_version: int = 0
    ecs: Ecs | None = None


def parse_query(data: bytes) -> Query | None:
    """Parse the common case; ``None`` means "not common, ask ``parse_unusual``".

    Raises ``FormatError`` for packets that are not queries at all.
    """
    size = len(data)
    if size < 17:
        raise FormatError("shorter than a header and a question")
    qid, flags, qd, an, ns, ar = HEADER.unpack_from(data)
    if flags & QR:
        raise FormatError("a response, not a query")
    if qd != 1 or an or ns or ar > 1 or flags & OPCODE_MASK:
        return None
    pos = 12
    total = 0
    while True:
        if pos >= size:
            raise FormatError("question name runs past the end")
        length = data[pos]
        if length == 0:
            pos += 1
            break
        if length > 63:
            return None  # a compression pointer or an extended label type: unusual
        pos += length + 1
        total += length + 1
        if total > MAX_NAME - 1:
            raise FormatError("question name longer than 255 octets")
    end = pos + 4
    if end > size:
        raise FormatError("question truncated")
    name = data[12:pos].lower()
    qtype, qclass = struct.unpack_from("!HH", data, pos)
    query = Query(qid, flags, name, qtype, qclass, data[12:end])
    if ar == 0:
        if end != size:
            raise FormatError("trailing bytes after the question")
        return query
    # One additional record: the common case is an OPT record with no options.
    if end + 11 > size or data[end] != 0:
        return None
    rtype, payload, ttl, rdlen = _OPT_FIXED.unpack_from(data, end + 1)
    if rtype != OPT:
        return None
    if end + 11 + rdlen != size:
        raise FormatError("OPT record length does not match the packet")
    # Options we do not act on (cookies, padding, keepalive) are skipped here; the client
    # subnet option is read by dnspython, which validates it properly.
    opos = end + 11
    while opos < size:
        if opos + 4 > size:
            raise FormatError("truncated EDNS option")
        code, olen = struct.unpack_from("!HH", data, opos)
        if code == ECS_CODE:
            return None
        if code == COOKIE_CODE and olen != 8 and not 16 <= olen <= 40:
            # RFC 7873 5.2.2: a client cookie is 8 bytes, with a server cookie 16 to 40.
            raise FormatError("malformed COOKIE option")
        opos += 4 + olen
    if opos != size:
        raise FormatError("EDNS option runs past the end")
    query.edns = True
    query.payload = payload
    query.edns_version = (ttl >> 16) & 0xFF
    return query


def parse_unusual(data: bytes) -> Query:
    """Parse any query with dnspython; raises ``FormatError`` when dnspython cannot."""
    # Imported here: dnspython costs the node about 8 MiB, and only odd queries need it.
    import dns.edns
    import dns.exception
    import dns.message

    try:
        msg = dns.message.from_wire(data)
    except (dns.exception.DNSException, ValueError, IndexError, struct.error) as exc:
        raise FormatError(str(exc) or type(exc).__name__) from exc
    if msg.flags & QR:
        raise FormatError("a response, not a query")
    if len(msg.question) != 1:
        raise FormatError("a query must have exactly one question")
    rrset = msg.question[0]
    name = rrset.name.to_wire()
    assert name is not None
    # Echo the question uncompressed, in the client's case.
    question = name + struct.pack("!HH", rrset.rdtype, rrset.rdclass)
    flags = msg.flags
    query = Query(msg.id, flags, name.lower(), int(rrset.rdtype), int(rrset.rdclass), question)
    if msg.edns >= 0:
        query.edns = True
        query.payload = msg.payload
        query.edns_version = msg.edns
        for option in msg.options:
            if isinstance(option, dns.edns.ECSOption):
                query.ecs = _ecs_from_option(option)
    return query


def _ecs_from_option(option: dns.edns.ECSOption) -> Ecs | None:
    try:
        address = ipaddress.ip_address(option.address)
    except ValueError:
        return None
    family = 1 if address.version == 4 else 2
    return Ecs(family, option.srclen, address)


def header_of(data: bytes) -> tuple[int, int] | None:
    """The id and flags of a packet, when it has a header at all and is not a response."""
    if len(data) < 12:
        return None
    qid, flags = struct.unpack_from("!HH", data)
    if flags & QR:
        return None  # never answer a response: two servers could loop forever
    return qid, flags


# -- packing ----------------------------------------------------------------------------------


def name_to_wire(name: str) -> bytes:
    """An absolute name in uncompressed wire form, lower-cased: ``"a.b."`` -> ``b"\\1a\\1b\\0"``."""
    labels = [label for label in name.lower().rstrip(".").split(".") if label]
    out = bytearray()
    for label in labels:
        raw = label.encode("ascii")
        if not 0 < len(raw) <= 63:
            raise ValueError(f"bad DNS label in {name!r}")
        out.append(len(raw))
        out += raw
    out.append(0)
    if len(out) > MAX_NAME:
        raise ValueError(f"DNS name too long: {name!r}")
    return bytes(out)


def compress(name: bytes, qname: bytes) -> bytes:
    """``name`` with its longest suffix shared with the question replaced by a pointer.

    Only suffixes that start on a label boundary of *both* names count, which holds because
    we walk ``name`` label by label and compare with the tail of ``qname``.
    """
    pos = 0
    qlen = len(qname)
    while name[pos]:
        tail = name[pos:]
        if qlen >= len(tail) and qname.endswith(tail) and _boundary(qname, qlen - len(tail)):
            return name[:pos] + _H.pack(0xC000 | (12 + qlen - len(tail)))
        pos += name[pos] + 1
    return name


def _boundary(wire: bytes, offset: int) -> bool:
    pos = 0
    while pos < offset:
        pos += wire[pos] + 1
    return pos == offset


def rr(owner: bytes, rtype: int, ttl: int, rdata: bytes) -> bytes:
    """One record; ``owner`` is already compressed (or a pointer)."""
    return owner + _RR_FIXED.pack(rtype, CLASS_IN, ttl, len(rdata)) + rdata


def pointer(offset: int) -> bytes:
    return _H.pack(0xC000 | offset)


QNAME_POINTER = pointer(12)


def txt_rdata(strings: list[bytes]) -> bytes:
    out = bytearray()
    for raw in strings:
        for i in range(0, max(len(raw), 1), 255):
            chunk = raw[i : i + 255]
            out.append(len(chunk))
            out += chunk
    return bytes(out)


def srv_rdata(priority: int, weight: int, port: int, target: bytes) -> bytes:
    # RFC 2782 forbids compressing the target; it is sent whole.
    return struct.pack("!HHH", priority, weight, port) + target


def soa_rdata(
    mname: bytes, rname: bytes, serial: int, refresh: int, retry: int, expire: int, minimum: int
) -> bytes:
    return (
        mname + rname + struct.pack("!IIIII", serial & 0xFFFFFFFF, refresh, retry, expire, minimum)
    )


def opt_record(payload: int, ext_rcode: int = 0, options: bytes = b"") -> bytes:
    return b"\x00" + _OPT_FIXED.pack(OPT, payload, ext_rcode << 24, len(options)) + options


def ecs_option(ecs: Ecs, scope: int) -> bytes:
    """The client's ECS option echoed with our scope (RFC 7871 section 7.2.1)."""
    nbytes = (ecs.source + 7) // 8
    addr = ecs.address.packed[:nbytes]
    body = struct.pack("!HBB", ecs.family, ecs.source, scope) + addr
    return struct.pack("!HH", ECS_CODE, len(body)) + body


def response_flags(query_flags: int, authoritative: bool, rcode: int) -> int:
    """QR set; opcode, RD and CD copied; AA when we answer for the name; the low rcode bits."""
    flags = QR | (query_flags & (OPCODE_MASK | RD | CD)) | (rcode & 0xF)
    if authoritative:
        flags |= AA
    return flags


def error_reply(qid: int, query_flags: int, rcode: int, question: bytes = b"") -> bytes:
    """A reply carrying only a code (and the question when we could read it)."""
    flags = response_flags(query_flags, False, rcode)
    return HEADER.pack(qid, flags, 1 if question else 0, 0, 0, 0) + question


def qtype_name(qtype: int) -> str:
    """A bounded label for metrics: known types by name, the rest as ``other``."""
    return _QTYPE_NAMES.get(qtype, "other")


_QTYPE_NAMES = {
    A: "A",
    NS: "NS",
    5: "CNAME",
    SOA: "SOA",
    12: "PTR",
    HINFO: "HINFO",
    15: "MX",
    TXT: "TXT",
    AAAA: "AAAA",
    SRV: "SRV",
    64: "SVCB",
    65: "HTTPS",
    257: "CAA",
    IXFR: "IXFR",
    AXFR: "AXFR",
    ANY: "ANY",
}
RCODE_NAMES = {
    NOERROR: "NOERROR",
    FORMERR: "FORMERR",
    SERVFAIL: "SERVFAIL",
    NXDOMAIN: "NXDOMAIN",
    NOTIMP: "NOTIMP",
    REFUSED: "REFUSED",
    BADVERS: "BADVERS",
}
