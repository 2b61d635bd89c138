"""Incremental events and a full resync must leave the zone answering the same."""

from __future__ import annotations

import dns.rcode
from hypothesis import given, settings
from hypothesis import strategies as st

from interknit.dns.zone import Zone, ZoneConfig
from interknit.registry.model import Event, Instance
from tests.dns.helpers import ZONE, ask, delete, inst, put

IDS = ["a", "b", "c", "d"]
SERVICES = ["api", "web"]
HEALTH = ["passing", "warning", "critical"]
OPERATOR = [None, None, "draining", "maintenance"]

instances = st.builds(
    lambda service, id, host, port, tags, weight, health, operator: inst(
        service,
        id,
        f"10.0.0.{host}",
        port,
        tags=tags,
        weight=weight,
        check_status=health,
        operator=operator,
    ),
    st.sampled_from(SERVICES),
    st.sampled_from(IDS),
    st.integers(1, 4),
    st.integers(8000, 8003),
    st.lists(st.sampled_from(["eu", "us", "b"]), max_size=2, unique=True).map(tuple),
    st.integers(1, 3),
    st.sampled_from(HEALTH),
    st.sampled_from(OPERATOR),
)
steps = st.lists(st.tuples(st.booleans(), instances), max_size=25)

QUESTIONS = [
    (f"{name}.{ZONE}", rdtype)
    for svc in SERVICES
    for name, rdtype in [
        (svc, "A"),
        (f"eu.{svc}", "A"),
        (f"b.{svc}", "A"),
        (f"a.{svc}", "A"),
        (f"a.{svc}", "TXT"),
        (f"_{svc}._tcp", "SRV"),
        (f"_{svc}._us", "SRV"),
    ]
] + [(f"_tcp.{ZONE}", "A"), (f"_eu.{ZONE}", "A")]


def snapshot(zone: Zone) -> list[tuple[object, list[str]]]:
    out: list[tuple[object, list[str]]] = []
    for name, rdtype in QUESTIONS:
        msg = ask(zone, name, rdtype, tcp=True)
        records = sorted(r.to_text() for rrset in msg.answer for r in rrset)
        out.append((msg.rcode(), records))
    return out


@settings(max_examples=150, deadline=None)
@given(steps=steps)
def test_events_then_resync_agree(steps: list[tuple[bool, Instance]]) -> None:
    config = ZoneConfig(max_answers=20)
    incremental = Zone(config)
    incremental.sync([], 0)
    batched = Zone(config)  # the same events, a commit's worth at a time
    batched.sync([], 0)
    state: dict[tuple[str, str], Instance] = {}
    commit: list[Event] = []
    for revision, (is_put, instance) in enumerate(steps, start=1):
        event: Event
        if is_put:
            state[instance.key] = instance
            event = put(revision, instance)
        elif instance.key in state:
            event = delete(revision, state.pop(instance.key))
        else:
            continue
        incremental.apply(event, now=float(revision))
        commit.append(event)
        if revision % 3 == 0:
            batched.apply_all(commit, now=float(revision))
            commit = []
    batched.apply_all(commit, now=float(len(steps)))
    full = Zone(config)
    full.sync(state.values(), len(steps))
    assert snapshot(incremental) == snapshot(full)
    assert snapshot(batched) == snapshot(full)
    for service in SERVICES:
        exists = any(key[0] == service for key in state)
        rcode = ask(full, f"{service}.{ZONE}").rcode()
        assert rcode == (dns.rcode.NOERROR if exists else dns.rcode.NXDOMAIN)
