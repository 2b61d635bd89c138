"""The zone's reply cache: the same bytes as the normal path, and never a stale answer."""

from __future__ import annotations

import random

import dns.edns
import dns.message
import dns.rdatatype
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from interknit.dns import zone as zone_module
from interknit.dns.gslb import GslbConfig
from interknit.dns.zone import Zone, ZoneConfig
from tests.dns.helpers import ZONE, addresses, delete, inst, put

REGIONS = {"10.1.0.0/16": "eu", "10.2.0.0/16": "us"}
WEB = [inst("web", f"w{i}", f"10.0.0.{i}", 9000 + i, tags=("eu",), region="eu") for i in (1, 2, 3)]
WEB_US = [inst("web", f"u{i}", f"10.9.0.{i}", 9100 + i, region="us") for i in (1, 2)]


def make_zone(**config: object) -> Zone:
    zone = Zone(ZoneConfig(**config), rng=random.Random(1))  # type: ignore[arg-type]
    zone.sync(WEB + WEB_US, 1)
    return zone


def served(zone: Zone, data: bytes, client: str = "10.1.0.9", now: float = 0.0) -> bytes:
    """What the UDP server sends: the cached reply when there is one, else the normal path."""
    hit = zone.answer_cached(data, client, now)
    if hit is not None:
        return hit[0]
    reply = zone.answer(data, client, now)
    assert reply is not None
    return reply.wire


def query(name: str, rdtype: str = "A", **make: object) -> bytes:
    return dns.message.make_query(name, rdtype, **make).to_wire()  # type: ignore[arg-type]


def test_a_repeated_question_is_served_from_cache_with_its_own_id() -> None:
    zone = make_zone()
    first = query(f"web.{ZONE}")
    assert zone.answer_cached(first, "10.1.0.9", 0.0) is None
    zone.answer(first, "10.1.0.9", 0.0)
    again = dns.message.make_query(f"web.{ZONE}", "A")
    hit = zone.answer_cached(again.to_wire(), "10.1.0.9", 0.0)
    # Each rotation is built once by the normal path before the cache can serve it.
    assert hit is None
    for _ in range(4):  # five instances: five rotations
        zone.answer(again.to_wire(), "10.1.0.9", 0.0)
    third = dns.message.make_query(f"web.{ZONE}", "A")
    hit = zone.answer_cached(third.to_wire(), "10.1.0.9", 0.0)
    assert hit is not None
    msg = dns.message.from_wire(hit[0])
    assert msg.id == third.id
    assert len(addresses(msg)) == 5
    assert hit[1].service == "web" and hit[1].rcode == 0


def test_rotation_continues_across_both_paths() -> None:
    zone = make_zone()
    firsts = [
        addresses(dns.message.from_wire(served(zone, query(f"web.{ZONE}"))))[0] for _ in range(10)
    ]
    order = ["10.9.0.1", "10.9.0.2", "10.0.0.1", "10.0.0.2", "10.0.0.3"]  # by instance id
    assert firsts == order * 2


def test_a_change_empties_the_cache() -> None:
    zone = make_zone()
    data = query(f"web.{ZONE}")
    for _ in range(6):
        served(zone, data)
    assert zone.answer_cached(data, "10.1.0.9", 0.0) is not None
    zone.apply(delete(2, WEB[0]), now=50.0)
    assert zone.answer_cached(data, "10.1.0.9", 50.0) is None
    for _ in range(8):
        got = addresses(dns.message.from_wire(served(zone, data, now=50.0)))
        assert "10.0.0.1" not in got and len(got) == 4


def test_the_lowered_ttl_after_a_change_is_not_served_past_its_end() -> None:
    zone = make_zone()
    zone.apply(put(2, inst("web", "w9", "10.0.0.9", region="eu")), now=100.0)
    data = query(f"web.{ZONE}")
    for _ in range(12):
        assert dns.message.from_wire(served(zone, data, now=101.0)).answer[0].ttl == 1
    # The TTL returns to 5s one TTL after the change; the cached 1s replies must not outlive it.
    assert zone.answer_cached(data, "10.1.0.9", 105.0) is None
    for _ in range(12):
        assert dns.message.from_wire(served(zone, data, now=105.0)).answer[0].ttl == 5


def test_weighted_answers_and_ecs_queries_are_never_cached() -> None:
    zone = Zone(ZoneConfig(gslb=GslbConfig(regions=REGIONS)), rng=random.Random(1))
    zone.sync([inst("w", "a", "10.0.0.1", weight=1), inst("w", "b", "10.0.0.2", weight=9)], 1)
    data = query(f"w.{ZONE}")
    for _ in range(20):
        zone.answer(data, "10.1.0.9", 0.0)
    assert zone.answer_cached(data, "10.1.0.9", 0.0) is None
    zone = make_zone(gslb=GslbConfig(regions=REGIONS))
    ecs = query(f"web.global.{ZONE}", use_edns=0, options=[dns.edns.ECSOption("10.2.0.0", 24)])
    for _ in range(10):
        zone.answer(ecs, "10.1.0.9", 0.0)
    assert zone.answer_cached(ecs, "10.1.0.9", 0.0) is None


def test_global_names_are_cached_per_client_region() -> None:
    zone = make_zone(gslb=GslbConfig(regions=REGIONS))
    data = query(f"web.global.{ZONE}")
    for _ in range(6):
        assert len(addresses(dns.message.from_wire(served(zone, data, "10.1.0.9")))) == 3
        assert len(addresses(dns.message.from_wire(served(zone, data, "10.2.0.9")))) == 2
    assert zone.answer_cached(data, "10.1.0.9", 0.0) is not None
    eu = addresses(dns.message.from_wire(served(zone, data, "10.1.7.7")))
    us = addresses(dns.message.from_wire(served(zone, data, "10.2.7.7")))
    assert set(eu) == {"10.0.0.1", "10.0.0.2", "10.0.0.3"}
    assert set(us) == {"10.9.0.1", "10.9.0.2"}
    # A spread over several regions is a draw per query: not cached.
    zone = make_zone(gslb=GslbConfig(regions=REGIONS, policy="weighted"))
    for _ in range(10):
        zone.answer(data, "10.1.0.9", 0.0)
    assert zone.answer_cached(data, "10.1.0.9", 0.0) is None


def test_the_cache_stays_small_under_varied_questions(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(zone_module, "CACHE_MAX_BYTES", 4000)
    zone = make_zone()
    rng = random.Random(7)
    for _ in range(500):
        name = "".join(c.upper() if rng.random() < 0.5 else c for c in f"web.{ZONE}")
        data = query(name)
        msg = dns.message.from_wire(served(zone, data))
        assert msg.question[0].name.to_text() == name  # 0x20: the client's case is echoed
    assert len(zone._cache) < 60


NAMES = [
    f"web.{ZONE}",
    f"WEB.{ZONE}",
    f"eu.web.{ZONE}",
    f"w1.web.{ZONE}",
    f"_web._tcp.{ZONE}",
    f"web.global.{ZONE}",
    f"nope.{ZONE}",
    ZONE,
    "example.com.",
]
TYPES = ["A", "AAAA", "SRV", "TXT", "SOA", "NS", "MX"]
step = st.one_of(
    st.tuples(
        st.just("ask"),
        st.sampled_from(NAMES),
        st.sampled_from(TYPES),
        st.sampled_from(["10.1.0.9", "10.2.0.9"]),
        st.booleans(),
        st.integers(1, 7),  # asked that many times in a row, as resolvers do
    ),
    st.tuples(st.just("down"), st.sampled_from(WEB + WEB_US)),
    st.tuples(st.just("up"), st.sampled_from(WEB + WEB_US)),
    st.tuples(st.just("wait"), st.floats(0.1, 4.0)),
)


@settings(max_examples=100, deadline=None)
@given(st.lists(step, max_size=60))
def test_cached_and_uncached_zones_send_the_same_bytes(steps: list[tuple[object, ...]]) -> None:
    """Every query gets byte for byte what a zone that never uses its cache sends."""
    gslb = GslbConfig(regions=REGIONS, fallback={"eu": ["us"], "us": ["eu"]})
    cached, plain = make_zone(gslb=gslb), make_zone(gslb=gslb)
    now, revision, qid = 10.0, 1, 0
    for item in steps:
        if item[0] == "ask":
            _, name, rdtype, client, edns, times = item
            for _ in range(int(times)):  # type: ignore[call-overload]
                qid = (qid + 1) & 0xFFFF
                msg = dns.message.make_query(str(name), str(rdtype), use_edns=0 if edns else None)
                msg.id = qid
                data = msg.to_wire()
                expected = plain.answer(data, str(client), now)
                assert expected is not None
                assert served(cached, data, str(client), now) == expected.wire
        elif item[0] == "wait":
            now += float(item[1])  # type: ignore[arg-type]
        else:
            revision += 1
            instance = item[1]
            status = "critical" if item[0] == "down" else "passing"
            event = put(revision, instance.evolve(check_status=status), "health")  # type: ignore[attr-defined]
            cached.apply(event, now)
            plain.apply(event, now)
