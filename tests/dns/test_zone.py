"""Every answer rule, through dnspython messages, against the sans-IO zone."""

from __future__ import annotations

import random
from collections import Counter

import dns.flags
import dns.message
import dns.opcode
import dns.rcode
import dns.rdataclass
import dns.rdatatype
import dns.tsigkeyring
import dns.update
import pytest

from interknit.dns.zone import Zone, ZoneConfig
from tests.dns.helpers import ZONE, addresses, ask, delete, inst, put, rrset

SEARCH = [inst("search", f"s{i}", f"10.0.0.{i}", 9000 + i, tags=("eu",)) for i in range(1, 4)]


def make_zone(*instances: object, revision: int = 7, **config: object) -> Zone:
    zone = Zone(ZoneConfig(**config), rng=random.Random(1))  # type: ignore[arg-type]
    zone.sync(list(instances) or SEARCH, revision)  # type: ignore[arg-type]
    return zone


def test_service_a_lists_passing_instances_with_aa() -> None:
    msg = ask(make_zone(), f"search.{ZONE}")
    assert msg.rcode() == dns.rcode.NOERROR
    assert msg.flags & dns.flags.AA
    assert sorted(addresses(msg)) == ["10.0.0.1", "10.0.0.2", "10.0.0.3"]
    assert rrset(msg, "A").ttl == 5  # type: ignore[union-attr]


def test_round_robin_rotates_every_answer() -> None:
    zone = make_zone()
    firsts = [addresses(ask(zone, f"search.{ZONE}"))[0] for _ in range(6)]
    assert firsts == ["10.0.0.1", "10.0.0.2", "10.0.0.3"] * 2
    # Each answer is the full set, in rotated order.
    assert addresses(ask(zone, f"search.{ZONE}")) == ["10.0.0.1", "10.0.0.2", "10.0.0.3"]
    assert addresses(ask(zone, f"search.{ZONE}")) == ["10.0.0.2", "10.0.0.3", "10.0.0.1"]


def test_max_answers_caps_and_still_rotates_over_all() -> None:
    many = [inst("web", f"w{i}", f"10.1.0.{i}") for i in range(1, 13)]
    zone = make_zone(*many, max_answers=8)
    seen: set[str] = set()
    for _ in range(12):
        got = addresses(ask(zone, f"web.{ZONE}"))
        assert len(got) == 8
        seen.update(got)
    assert len(seen) == 12


def test_question_case_is_echoed() -> None:
    msg = ask(make_zone(), f"SeArCh.{ZONE}")
    assert msg.question[0].name.to_text() == f"SeArCh.{ZONE}"
    assert len(addresses(msg)) == 3


def test_only_passing_and_warning_are_answered() -> None:
    instances = [
        inst("api", "a1", "10.2.0.1"),
        inst("api", "a2", "10.2.0.2", check_status="warning"),
        inst("api", "a3", "10.2.0.3", check_status="critical"),
        inst("api", "a4", "10.2.0.4", operator="draining"),
        inst("api", "a5", "10.2.0.5", operator="maintenance"),
    ]
    assert sorted(addresses(ask(make_zone(*instances), f"api.{ZONE}"))) == [
        "10.2.0.1",
        "10.2.0.2",
    ]


def test_all_critical_is_noerror_empty_with_soa_never_stale() -> None:
    zone = make_zone()
    assert addresses(ask(zone, f"search.{ZONE}"))
    for revision, instance in enumerate(SEARCH, start=8):
        zone.apply(put(revision, instance.evolve(check_status="critical"), "health"))
    msg = ask(zone, f"search.{ZONE}")
    assert msg.rcode() == dns.rcode.NOERROR
    assert msg.answer == []
    assert msg.authority[0].rdtype == dns.rdatatype.SOA
    assert msg.authority[0][0].serial == 10


def test_nxdomain_for_unknown_names_with_soa() -> None:
    zone = make_zone()
    for name in (f"nope.{ZONE}", f"x.search.{ZONE}", f"a.b.search.{ZONE}", f"_nope._tcp.{ZONE}"):
        msg = ask(zone, name)
        assert msg.rcode() == dns.rcode.NXDOMAIN, name
        assert msg.flags & dns.flags.AA
        soa = msg.authority[0]
        assert soa.rdtype == dns.rdatatype.SOA and soa.name.to_text() == ZONE
        assert soa[0].serial == 7 and soa[0].minimum == 5


def test_nodata_for_a_known_name_of_another_type() -> None:
    zone = make_zone()
    for name, rdtype in (
        (f"search.{ZONE}", "MX"),
        (f"search.{ZONE}", "AAAA"),
        (f"search.{ZONE}", "SRV"),
        (f"_tcp.{ZONE}", "A"),  # an empty non-terminal exists
        (ZONE, "A"),
    ):
        msg = ask(zone, name, rdtype)
        assert msg.rcode() == dns.rcode.NOERROR, (name, rdtype)
        assert msg.answer == []
        assert msg.authority[0].rdtype == dns.rdatatype.SOA


def test_deregistered_service_becomes_nxdomain() -> None:
    zone = make_zone()
    for revision, instance in enumerate(SEARCH, start=8):
        zone.apply(delete(revision, instance))
    assert ask(zone, f"search.{ZONE}").rcode() == dns.rcode.NXDOMAIN
    assert ask(zone, f"_tcp.{ZONE}").rcode() == dns.rcode.NXDOMAIN
    assert zone.revision == 10


def test_tag_filters_instances() -> None:
    instances = [
        inst("db", "d1", "10.3.0.1", tags=("primary",)),
        inst("db", "d2", "10.3.0.2", tags=("replica", "EU")),
        inst("db", "d3", "10.3.0.3", tags=("replica",)),
    ]
    zone = make_zone(*instances)
    assert addresses(ask(zone, f"primary.db.{ZONE}")) == ["10.3.0.1"]
    assert sorted(addresses(ask(zone, f"replica.db.{ZONE}"))) == ["10.3.0.2", "10.3.0.3"]
    assert addresses(ask(zone, f"eu.db.{ZONE}")) == ["10.3.0.2"]
    assert ask(zone, f"missing.db.{ZONE}").rcode() == dns.rcode.NXDOMAIN


def test_instance_name_answers_one_address_and_txt_meta() -> None:
    instances = [inst("db", "d1", "10.3.0.1", meta={"version": "1.2", "az": "b"})]
    zone = make_zone(*instances)
    assert addresses(ask(zone, f"d1.db.{ZONE}")) == ["10.3.0.1"]
    txt = rrset(ask(zone, f"d1.db.{ZONE}", "TXT"), "TXT")
    assert txt is not None
    assert sorted(s for r in txt for s in r.strings) == [b"az=b", b"version=1.2"]


def test_aaaa_answers_ipv6_instances_only() -> None:
    zone = make_zone(inst("v6", "a", "2001:db8::1"), inst("v6", "b", "10.9.0.1"))
    assert addresses(ask(zone, f"v6.{ZONE}", "AAAA"), "AAAA") == ["2001:db8::1"]
    assert addresses(ask(zone, f"v6.{ZONE}", "A")) == ["10.9.0.1"]


def test_srv_with_targets_and_glue() -> None:
    zone = make_zone(
        inst("db", "d1", "10.3.0.1", 5432, weight=10, tags=("primary",)),
        inst("db", "d2", "10.3.0.2", 5433, weight=20),
    )
    msg = ask(zone, f"_db._tcp.{ZONE}", "SRV")
    srv = rrset(msg, "SRV")
    assert srv is not None
    got = sorted((r.port, r.weight, r.target.to_text()) for r in srv)
    assert got == [(5432, 10, f"d1.db.{ZONE}"), (5433, 20, f"d2.db.{ZONE}")]
    glue = {r.name.to_text(): r[0].address for r in msg.additional}
    assert glue == {f"d1.db.{ZONE}": "10.3.0.1", f"d2.db.{ZONE}": "10.3.0.2"}
    tagged = rrset(ask(zone, f"_db._primary.{ZONE}", "SRV"), "SRV")
    assert tagged is not None and [r.port for r in tagged] == [5432]


def test_apex_soa_and_ns_with_glue() -> None:
    zone = make_zone(revision=42)
    soa = rrset(ask(zone, ZONE, "SOA"), "SOA")
    assert soa is not None and soa[0].serial == 42
    assert soa[0].mname.to_text() == f"ns.{ZONE}"
    msg = ask(zone, ZONE, "NS")
    ns = rrset(msg, "NS")
    assert ns is not None and ns[0].target.to_text() == f"ns.{ZONE}"
    assert msg.additional[0][0].address == "127.0.0.1"
    assert addresses(ask(zone, f"ns.{ZONE}")) == ["127.0.0.1"]


def test_out_of_zone_is_refused_without_aa() -> None:
    zone = make_zone()
    for name in ("example.com.", "internal.", "xik.internal.", "."):
        msg = ask(zone, name)
        assert msg.rcode() == dns.rcode.REFUSED, name
        assert not msg.flags & dns.flags.AA
        assert msg.answer == []


def test_zone_transfer_and_other_classes_are_refused() -> None:
    zone = make_zone()
    assert ask(zone, ZONE, "AXFR").rcode() == dns.rcode.REFUSED
    assert ask(zone, f"search.{ZONE}", "A", rdclass="CH").rcode() == dns.rcode.REFUSED


def test_any_gets_one_hinfo_record() -> None:
    msg = ask(make_zone(), f"search.{ZONE}", "ANY")
    assert msg.rcode() == dns.rcode.NOERROR
    assert len(msg.answer) == 1 and msg.answer[0].rdtype == dns.rdatatype.HINFO
    assert msg.answer[0][0].cpu == b"RFC8482"
    assert ask(make_zone(), f"nope.{ZONE}", "ANY").rcode() == dns.rcode.NXDOMAIN


def test_edns_is_answered_with_our_buffer_size() -> None:
    zone = make_zone()
    msg = ask(zone, f"search.{ZONE}", use_edns=0, payload=4096)
    assert msg.edns == 0 and msg.payload == 1232
    assert ask(zone, f"search.{ZONE}").edns == -1


def test_unknown_edns_version_gets_badvers() -> None:
    msg = ask(make_zone(), f"search.{ZONE}", use_edns=1)
    assert msg.rcode() == dns.rcode.BADVERS


def big_zone() -> Zone:
    many = [inst("big", f"instance-{i:02d}", f"10.4.0.{i}", 7000 + i) for i in range(1, 41)]
    return make_zone(*many, max_answers=40)


def test_too_big_for_udp_sets_tc_and_sends_no_partial_records() -> None:
    zone = big_zone()
    msg = ask(zone, f"_big._tcp.{ZONE}", "SRV")
    assert msg.flags & dns.flags.TC
    assert msg.answer == [] and msg.additional == []
    full = ask(zone, f"_big._tcp.{ZONE}", "SRV", tcp=True)
    assert not full.flags & dns.flags.TC
    assert len(rrset(full, "SRV")) == 40  # type: ignore[arg-type]
    assert len(full.additional[0]) + sum(len(r) for r in full.additional[1:]) == 40


def test_client_buffer_size_decides_what_fits() -> None:
    zone = big_zone()
    small = ask(zone, f"big.{ZONE}", use_edns=0, payload=512)  # 40 A records: ~700 bytes
    assert small.flags & dns.flags.TC
    large = ask(zone, f"big.{ZONE}", use_edns=0, payload=1232)
    assert not large.flags & dns.flags.TC and len(addresses(large)) == 40
    plain = ask(zone, f"big.{ZONE}")  # no EDNS: 512
    assert plain.flags & dns.flags.TC


def test_ttl_is_lowered_for_one_ttl_after_a_change() -> None:
    zone = make_zone(service_ttls={"search": 30.0})
    assert rrset(ask(zone, f"search.{ZONE}", now=100.0), "A").ttl == 30  # type: ignore[union-attr]
    zone.apply(put(8, inst("search", "s4", "10.0.0.4")), now=100.0)
    assert rrset(ask(zone, f"search.{ZONE}", now=101.0), "A").ttl == 1  # type: ignore[union-attr]
    assert rrset(ask(zone, f"search.{ZONE}", now=129.9), "A").ttl == 1  # type: ignore[union-attr]
    assert rrset(ask(zone, f"search.{ZONE}", now=130.0), "A").ttl == 30  # type: ignore[union-attr]
    # Other services keep their TTL; an event that changes nothing lowers nothing.
    zone.apply(put(9, inst("search", "s4", "10.0.0.4"), "update"), now=200.0)
    assert rrset(ask(zone, f"search.{ZONE}", now=201.0), "A").ttl == 30  # type: ignore[union-attr]


def test_resync_marks_only_changed_services() -> None:
    other = inst("other", "o1", "10.5.0.1")
    zone = make_zone(*SEARCH, other)
    zone.sync([*SEARCH[:2], other], 20, now=50.0)
    assert rrset(ask(zone, f"search.{ZONE}", now=51.0), "A").ttl == 1  # type: ignore[union-attr]
    assert rrset(ask(zone, f"other.{ZONE}", now=51.0), "A").ttl == 5  # type: ignore[union-attr]
    assert sorted(addresses(ask(zone, f"search.{ZONE}", now=51.0))) == ["10.0.0.1", "10.0.0.2"]


def test_unequal_weights_draw_the_first_answer_by_weight() -> None:
    zone = make_zone(inst("w", "heavy", "10.6.0.1", weight=3), inst("w", "light", "10.6.0.2"))
    firsts = Counter(addresses(ask(zone, f"w.{ZONE}"))[0] for _ in range(4000))
    share = firsts["10.6.0.1"] / 4000
    # Binomial(4000, 0.75): sd ~0.0068; 5 sd either side.
    assert 0.716 < share < 0.784


def test_equal_weights_rotate_exactly() -> None:
    zone = make_zone(inst("w", "a", "10.6.0.1", weight=2), inst("w", "b", "10.6.0.2", weight=2))
    firsts = Counter(addresses(ask(zone, f"w.{ZONE}"))[0] for _ in range(100))
    assert firsts == {"10.6.0.1": 50, "10.6.0.2": 50}


def test_names_dns_cannot_spell_are_skipped() -> None:
    zone = make_zone(
        inst("Bad_Name", "x", "10.7.0.1"), inst("ok", "id_with_underscore", "10.7.0.2")
    )
    assert ask(zone, f"ok.{ZONE}").rcode() == dns.rcode.NOERROR
    assert zone.services == ["ok"]
    assert ask(zone, f"_ok._tcp.{ZONE}", "SRV").answer == []


def update_message(kind: int) -> bytes:
    """Dynamic updates (RFC 2136) as clients send them: nsupdate signs with TSIG; the others
    are mutations of one (no zone section, a bare header, trailing bytes)."""
    keyring = dns.tsigkeyring.from_text({"k.": "c2VjcmV0c2VjcmV0c2VjcmV0"})
    signed = dns.update.UpdateMessage(ZONE, keyring=keyring, keyname="k.")
    signed.add(f"new.{ZONE}", 60, "A", "192.0.2.1")
    plain = dns.update.UpdateMessage(ZONE)
    plain.present(f"search.{ZONE}")
    plain.delete(f"search.{ZONE}", "A")
    wire = plain.to_wire()
    return [
        signed.to_wire(),
        wire[:4] + b"\x00\x00" + wire[6:],  # ZOCOUNT 0
        wire[:2] + b"\x28\x00" + b"\x00" * 8,  # a header and nothing else
        wire + b"junk",
        wire,
    ][kind]


@pytest.mark.parametrize("kind", range(5), ids=["tsig", "no-zone", "header", "trailing", "plain"])
def test_an_update_is_not_implemented(kind: int) -> None:
    """An UPDATE's sections are not a query's: most were answered FORMERR, as broken queries."""
    packet = update_message(kind)
    reply = make_zone().answer(packet, "192.0.2.1", 0.0)
    assert reply is not None
    answer = dns.message.from_wire(reply.wire)
    assert answer.rcode() == dns.rcode.NOTIMP
    assert answer.opcode() == dns.opcode.UPDATE and answer.id == int.from_bytes(packet[:2])


@pytest.mark.parametrize("opcode", ["NOTIFY", "STATUS"])
def test_other_opcodes_are_not_implemented(opcode: str) -> None:
    query = dns.message.make_query(f"search.{ZONE}", "SOA")
    query.set_opcode(dns.opcode.from_text(opcode))
    reply = make_zone().answer(query.to_wire(), "192.0.2.1", 0.0)
    assert reply is not None
    assert dns.message.from_wire(reply.wire).rcode() == dns.rcode.NOTIMP


def test_names_too_long_for_dns_are_left_out() -> None:
    zone_name = ".".join(["z" * 60] * 2) + ".example."  # 131 octets of zone
    zone = Zone(ZoneConfig(zone=zone_name))
    long_id = "i" * 63
    zone.sync([inst("s" * 63, long_id, "10.8.0.1", tags=("t" * 60,))], 1)
    # service + zone fits; id + service + zone (259 octets) does not, and is simply absent.
    msg = ask(zone, f"{'s' * 63}.{zone_name}")
    assert addresses(msg) == ["10.8.0.1"]
