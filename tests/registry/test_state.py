"""The registry's state machine, driven with an injected clock."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from interknit.registry.model import Check, Instance, InstanceSpec
from interknit.registry.state import Conflict, NotFound, RegistryError, RegistryState

PLAIN = InstanceSpec(address="10.0.0.1", port=80)
TTL = InstanceSpec(address="10.0.0.1", port=80, check=Check(ttl=10.0))
TTL_DEREG = InstanceSpec(address="10.0.0.1", port=80, check=Check(ttl=10.0, deregister_after=30.0))
HTTP = InstanceSpec(address="10.0.0.1", port=80, check=Check(http="/health"))


def test_register_assigns_revisions_and_is_idempotent() -> None:
    s = RegistryState()
    [e1] = s.register("web", "a", PLAIN, now=0)
    assert (e1.revision, e1.type, e1.reason) == (1, "put", "register")
    assert s.revision == 1
    assert s.register("web", "a", PLAIN, now=1) == []
    assert s.revision == 1
    changed = InstanceSpec(address="10.0.0.1", port=81)
    [e2] = s.register("web", "a", changed, now=2)
    assert (e2.revision, e2.reason) == (2, "update")
    assert e2.instance.create_revision == 1
    assert e2.instance.mod_revision == 2
    assert s.get("web", "a") is not None and s.get("web", "a").port == 81  # type: ignore[union-attr]


def test_initial_health_by_check_kind() -> None:
    s = RegistryState()
    s.register("web", "plain", PLAIN, 0)
    s.register("web", "ttl", TTL, 0)
    s.register("web", "http", HTTP, 0)
    health = {i.id: i.health for i in s.instances("web")}
    assert health == {"plain": "passing", "ttl": "passing", "http": "critical"}


def test_ttl_expires_without_heartbeat_and_heartbeat_revives() -> None:
    s = RegistryState()
    s.register("web", "a", TTL, now=100)
    assert s.next_deadline() == 110
    assert s.tick(109.9) == []
    s.heartbeat("web", "a", now=105)  # renews to 115, no event
    assert s.revision == 1
    assert s.tick(110) == []
    [expired] = s.tick(115)
    assert (expired.reason, expired.instance.health) == ("lease", "critical")
    assert s.tick(1000) == []  # already critical: no more events, no removal without dereg
    [revived] = s.heartbeat("web", "a", now=1001)
    assert revived.instance.health == "passing"
    assert revived.instance.critical_since is None


def test_deregister_after_removes_long_critical_instances() -> None:
    s = RegistryState()
    s.register("web", "a", TTL_DEREG, now=0)
    [lease] = s.tick(10)
    assert lease.instance.critical_since == 10
    assert s.next_deadline() == 40
    assert s.tick(39.9) == []
    [gone] = s.tick(40)
    assert (gone.type, gone.reason) == ("delete", "expire")
    assert s.get("web", "a") is None
    assert not s.has_service("web")


def test_heartbeat_before_removal_cancels_it() -> None:
    s = RegistryState()
    s.register("web", "a", TTL_DEREG, now=0)
    s.tick(10)
    s.heartbeat("web", "a", now=20)  # lease to 30; the removal due at 40 is off
    assert s.tick(29) == []
    [lease] = s.tick(40)
    assert lease.reason == "lease"  # expired again at 30, not removed
    assert s.get("web", "a") is not None
    [gone] = s.tick(60)  # 30 seconds after it turned critical again
    assert gone.reason == "expire"


def test_active_check_critical_then_removed() -> None:
    spec = InstanceSpec(address="10.0.0.1", port=80, check=Check(http="/", deregister_after=5))
    s = RegistryState()
    s.register("web", "a", spec, now=0)
    # Starts critical at 0; the health component's first pass makes it passing.
    [ok] = s.set_check_status("web", "a", "passing", "200 OK", now=1)
    assert ok.instance.health == "passing"
    assert s.set_check_status("web", "a", "passing", "200 OK", now=2) == []
    s.set_check_status("web", "a", "critical", "refused", now=3)
    assert s.tick(7.9) == []
    [gone] = s.tick(8)
    assert gone.reason == "expire"


def test_operator_states_override_checks() -> None:
    s = RegistryState()
    s.register("web", "a", TTL, now=0)
    [drain] = s.set_operator("web", "a", "draining")
    assert drain.instance.health == "draining"
    assert s.set_operator("web", "a", "draining") == []
    [lease] = s.tick(10)
    assert lease.instance.health == "draining"  # operator word still wins
    assert lease.instance.check_status == "critical"
    [back] = s.set_operator("web", "a", "passing")
    assert back.instance.health == "critical"  # the checks speak again
    with pytest.raises(RegistryError):
        s.set_operator("web", "a", "bogus")


def test_errors_change_nothing() -> None:
    s = RegistryState()
    s.register("web", "a", PLAIN, 0)
    with pytest.raises(NotFound):
        s.deregister("web", "b")
    with pytest.raises(NotFound):
        s.deregister("nope", "a")
    with pytest.raises(Conflict):
        s.heartbeat("web", "a", 1)
    assert s.revision == 1


def test_history_resume_and_resync() -> None:
    s = RegistryState(history_size=5)
    for i in range(12):
        s.register("svc", f"i{i}", PLAIN, 0)
    assert s.revision == 12
    assert s.oldest_revision() == 7
    got = s.events_since(7)
    assert got is not None
    events, upto = got
    assert [e.revision for e in events] == [8, 9, 10, 11, 12]
    assert upto == 12
    assert s.events_since(6) is None
    assert s.events_since(12) == ([], 12)
    assert s.events_since(99) == ([], 12)


def test_history_filters_by_service() -> None:
    s = RegistryState()
    s.register("a", "x", PLAIN, 0)
    s.register("b", "x", PLAIN, 0)
    s.register("a", "y", PLAIN, 0)
    got = s.events_since(0, "a")
    assert got is not None
    assert [e.revision for e in got[0]] == [1, 3]
    assert s.service_revision("a") == 3
    assert s.service_revision("b") == 2


def test_service_revision_survives_emptying() -> None:
    s = RegistryState()
    s.register("a", "x", PLAIN, 0)
    s.deregister("a", "x")
    assert s.service_revision("a") == 2
    assert s.services() == {}


def test_restore_gives_every_lease_full_grace() -> None:
    s = RegistryState()
    s.register("web", "a", TTL_DEREG, now=0)
    s.tick(10)  # critical since 10, would be removed at 40
    saved = list(s.all_instances())
    fresh = RegistryState()
    fresh.restore(saved, s.revision, now=1000)
    assert fresh.revision == s.revision
    inst = fresh.get("web", "a")
    assert inst is not None and inst.health == "critical"  # last known health kept
    assert fresh.lease_deadline("web", "a") == 1010
    assert fresh.tick(1009) == []
    [gone] = fresh.tick(1010)
    assert gone.reason == "expire"


def test_restore_passing_lease_expires_after_grace() -> None:
    s = RegistryState()
    s.register("web", "a", TTL, now=0)
    fresh = RegistryState()
    fresh.restore(list(s.all_instances()), s.revision, now=500)
    assert fresh.tick(509) == []
    [lease] = fresh.tick(510)
    assert lease.revision == s.revision + 1  # revisions never go backwards


def test_round_trip_through_record() -> None:
    s = RegistryState()
    spec = InstanceSpec(
        address="h.example",
        port=1,
        zone="z1",
        region="eu",
        weight=7,
        tags=("a", "b"),
        meta=(("k", "v"),),
        check=Check(http="/x", interval=0.25, timeout=0.1, rise=1, fall=4, deregister_after=60),
    )
    [e] = s.register("web", "a", spec, 0)
    again = Instance.from_record(e.instance.to_record())
    assert again.spec == spec
    assert again.health == e.instance.health
    assert again.mod_revision == e.instance.mod_revision


ops = st.lists(
    st.tuples(
        st.sampled_from(["register", "register2", "deregister", "heartbeat", "tick", "drain"]),
        st.sampled_from(["a", "b", "c"]),
        st.floats(min_value=0, max_value=5),
    ),
    max_size=60,
)


@settings(max_examples=200, deadline=None)
@given(ops)
def test_revision_counts_events_and_history_is_consecutive(steps: list) -> None:  # type: ignore[type-arg]
    s = RegistryState(history_size=50)
    now = 0.0
    produced = 0
    specs = {"register": TTL_DEREG, "register2": TTL}
    for op, iid, dt in steps:
        now += dt
        try:
            if op in specs:
                evs = s.register("svc", iid, specs[op], now)
            elif op == "deregister":
                evs = s.deregister("svc", iid)
            elif op == "heartbeat":
                evs = s.heartbeat("svc", iid, now)
            elif op == "drain":
                evs = s.set_operator("svc", iid, "draining")
            else:
                evs = s.tick(now)
        except RegistryError:
            evs = []
        produced += len(evs)
        assert s.revision == produced
        for inst in s.all_instances():
            assert inst.mod_revision <= s.revision
    got = s.events_since(s.oldest_revision())
    assert got is not None
    revs = [e.revision for e in got[0]]
    assert revs == list(range(s.oldest_revision() + 1, s.revision + 1))
