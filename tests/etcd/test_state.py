"""The etcd-fed local copy (sans-IO): key changes in, the registry's instances and events out."""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

from interknit.registry.etcd_client import KV, prefix_end
from interknit.registry.etcd_records import (
    Health,
    Layout,
    NodeRecord,
    Registration,
)
from interknit.registry.etcd_state import Change, EtcdState
from interknit.registry.model import Check, InstanceSpec

L = Layout("/ik/")
SPEC = InstanceSpec(address="10.0.0.1", port=80, tags=("a",), meta=(("k", "v"),))
NODE_LEASE = 77


def put(key: bytes, value: bytes, rev: int, create: int | None = None, lease: int = 0) -> Change:
    return Change(KV(key, value, create or rev, rev, lease), deleted=False)


def delete(key: bytes, rev: int) -> Change:
    return Change(KV(key, b"", 0, rev, 0), deleted=True)


def register(
    s: EtcdState, iid: str, rev: int, spec: InstanceSpec = SPEC, owner: str = "n1"
) -> list[Change]:
    return [
        put(L.instance("web", iid), Registration(spec, owner).encode(), rev, lease=NODE_LEASE),
        put(L.health("web", iid), Health.initial(spec, 5.0).encode(), rev, lease=NODE_LEASE),
    ]


def test_layout_parses_only_its_own_keys() -> None:
    assert L.parse(L.instance("web", "a")) == ("instances", "web", "a")
    assert L.parse(L.health("web", "a")) == ("health", "web", "a")
    assert L.parse(L.ttl("web", "a")) == ("ttl", "web", "a")
    assert L.parse(L.node("n1")) == ("nodes", "n1", "")
    assert L.parse(b"/other/instances/web/a") is None
    assert L.parse(b"/ik/instances/web") is None
    assert L.parse(b"/ik/future/web/a") is None
    assert Layout("/x").prefix == "/x/"
    assert prefix_end(b"/ik/") == b"/ik0"
    assert prefix_end(b"a\xff") == b"b"


@given(
    port=st.integers(1, 65535),
    weight=st.integers(0, 1000),
    tags=st.lists(st.sampled_from(["a", "b", "c"]), unique=True),
    check=st.sampled_from(
        [None, Check(ttl=10.0), Check(http="/h", interval=1.5), Check(tcp=True, fall=5)]
    ),
)
@settings(max_examples=50)
def test_records_round_trip(port: int, weight: int, tags: list[str], check: Check | None) -> None:
    spec = InstanceSpec("h.example", port, zone="z", weight=weight, tags=tuple(tags), check=check)
    assert InstanceSpec.from_json(spec.to_json()) == spec
    reg = Registration(spec, "node-9")
    assert Registration.decode(reg.encode()) == reg
    health = Health("critical", "draining", "out", 1.5, 2.5, "lease")
    assert Health.decode(health.encode()) == health
    assert NodeRecord("n", 1, 2.0).encode() == b'{"name":"n","lease":1,"started":2.0}'


def test_a_registration_transaction_is_one_event_at_its_revision() -> None:
    s = EtcdState(L)
    s.reset([], 10)
    applied = s.apply(register(s, "a", 12))
    [event] = applied.events
    assert (event.revision, event.type, event.reason) == (12, "put", "register")
    assert event.instance.create_revision == event.instance.mod_revision == 12
    assert s.revision == 12 and s.service_revision("web") == 12
    assert s.owner("web", "a") == "n1"
    # A TTL key alone changes nothing a consumer sees.
    assert s.apply([put(L.ttl("web", "a"), b"", 13, lease=5)]).events == []
    assert s.revision == 12
    assert s.entry("web", "a").ttl is not None  # type: ignore[union-attr]


def test_health_changes_carry_their_reason_and_deletes_say_why() -> None:
    s = EtcdState(L)
    s.apply(register(s, "a", 3) + register(s, "b", 3))
    critical = Health("critical", output="ttl expired", critical_since=1.0, reason="lease")
    [ev] = s.apply([put(L.health("web", "a"), critical.encode(), 4, create=3)]).events
    assert (ev.reason, ev.instance.health, ev.instance.mod_revision) == ("lease", "critical", 4)
    assert ev.instance.create_revision == 3
    [ev] = s.apply([delete(L.instance("web", "a"), 5), delete(L.health("web", "a"), 5)]).events
    assert (ev.type, ev.reason, ev.revision) == ("delete", "deregister", 5)
    assert s.entry("web", "a") is None
    # The node's lease ran out: its key and its instances go in one revision.
    s.apply([put(L.node("n1"), b"{}", 6, lease=NODE_LEASE)])
    applied = s.apply(
        [
            delete(L.node("n1"), 7),
            delete(L.instance("web", "b"), 7),
            delete(L.health("web", "b"), 7),
        ]
    )
    assert [(e.reason, e.instance.id) for e in applied.events] == [("expire", "b")]
    assert set(applied.lease_expired) == {("web", "b")}
    assert applied.nodes_deleted == {"n1"}
    assert s.service_names() == []


def test_history_is_searched_by_revision_across_gaps_and_shared_revisions() -> None:
    s = EtcdState(L, history_size=4)
    s.reset([], 100)
    assert s.events_since(100) == ([], 100)
    assert s.events_since(99) is None  # before the listing: resync
    s.apply(register(s, "a", 103) + register(s, "b", 103))  # one transaction, two instances
    s.apply(register(s, "c", 110))
    got = s.events_since(100)
    assert got is not None and [e.instance.id for e in got[0]] == ["a", "b", "c"]
    got = s.events_since(105)
    assert got is not None and [e.instance.id for e in got[0]] == ["c"] and got[1] == 110
    for i, rev in enumerate(range(120, 126)):
        s.apply(register(s, f"x{i}", rev))
    # Exactly history_size events are promised: the oldest kept resumes, older resyncs.
    assert s.oldest_revision() == 121
    got = s.events_since(121)
    assert got is not None and [e.revision for e in got[0]] == [122, 123, 124, 125]
    assert s.events_since(120) is None


def test_reset_replaces_everything_and_reports_what_vanished() -> None:
    s = EtcdState(L)
    s.apply(register(s, "a", 3) + register(s, "b", 4))
    kvs = [c.kv for c in register(s, "b", 4)] + [KV(L.node("n1"), b"{}", 2, 2, NODE_LEASE)]
    vanished = s.reset(kvs, 20)
    assert set(vanished) == {("web", "a")}
    assert [i.id for i in s.instances("web")] == ["b"]
    assert s.revision == 20 and s.service_revision("web") == 20
    assert s.events_since(20) == ([], 20) and s.events_since(19) is None
    assert "n1" in s.nodes
    # A service that vanished entirely moves too, so a blocked watcher of it wakes and sees.
    s.reset([], 30)
    assert s.service_revision("web") == 30 and not s.has_service("web")
