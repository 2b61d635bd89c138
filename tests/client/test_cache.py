"""The sans-IO cache: freshness, confirmation, stale fallback and pruning, on an injected clock."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from interknit.client.cache import Cache
from interknit.client.model import Query
from interknit.registry.model import Instance, InstanceSpec

Q = Query("web")


def inst(iid: str, port: int = 80) -> Instance:
    return Instance(service="web", id=iid, spec=InstanceSpec(address="10.0.0.1", port=port))


A = (inst("a"),)
AB = (inst("a"), inst("b", 81))


def test_empty_cache_has_nothing_to_serve() -> None:
    cache = Cache(ttl=5, max_stale=60)
    assert cache.fresh(Q, 0.0) is None
    assert cache.fallback(Q, 0.0) is None


def test_fresh_within_ttl_then_not() -> None:
    cache = Cache(ttl=5, max_stale=60)
    stored = cache.store(Q, A, 7, now=100.0, node="http://n1")
    assert stored.stale is False and stored.age == 0.0 and stored.revision == 7
    hit = cache.fresh(Q, 105.0)
    assert hit is not None and hit.instances == A and hit.age == 5.0 and not hit.stale
    assert cache.fresh(Q, 105.01) is None


def test_fallback_is_stale_after_ttl_and_gone_after_max_stale() -> None:
    cache = Cache(ttl=5, max_stale=60)
    cache.store(Q, A, 7, now=100.0)
    within_ttl = cache.fallback(Q, 103.0)
    assert within_ttl is not None and within_ttl.stale is False
    old = cache.fallback(Q, 159.0)
    assert old is not None and old.stale is True and old.age == 59.0 and old.instances == A
    assert cache.fallback(Q, 160.5) is None


def test_any_answer_confirms_and_unchanged_answer_keeps_the_same_tuple() -> None:
    cache = Cache(ttl=5, max_stale=60)
    cache.store(Q, A, 7, now=0.0)
    first = cache.entry(Q)
    assert first is not None
    kept = first.instances
    cache.store(Q, (inst("a"),), 7, now=4.0)
    entry = cache.entry(Q)
    assert entry is not None and entry.instances is kept and entry.confirmed_at == 4.0
    assert cache.fresh(Q, 9.0) is not None
    cache.store(Q, AB, 8, now=9.0)
    entry = cache.entry(Q)
    assert entry is not None and entry.instances == AB and entry.revision == 8


def test_live_blocking_query_keeps_an_entry_fresh_past_ttl() -> None:
    cache = Cache(ttl=5, max_stale=60)
    cache.store(Q, A, 7, now=0.0)
    cache.set_live(Q, True)
    hit = cache.fresh(Q, 50.0)
    assert hit is not None and hit.age == 0.0 and not hit.stale
    cache.set_live(Q, False)
    assert cache.fresh(Q, 50.0) is None
    stale = cache.fallback(Q, 50.0)
    assert stale is not None and stale.stale and stale.age == 50.0


def test_node_stale_answer_is_marked_stale_even_when_fresh() -> None:
    cache = Cache(ttl=5, max_stale=60)
    assert cache.store(Q, A, 7, now=0.0, node_stale=True).stale
    hit = cache.fresh(Q, 1.0)
    assert hit is not None and hit.stale


def test_queries_are_cached_separately() -> None:
    cache = Cache(ttl=5, max_stale=60)
    cache.store(Query("web", healthy=False), AB, 3, now=0.0)
    assert cache.fresh(Query("web"), 0.0) is None
    assert cache.fresh(Query("web", tag="v1"), 0.0) is None
    assert cache.fresh(Query("web", healthy=False), 0.0) is not None


def test_idle_and_prune() -> None:
    cache = Cache(ttl=5, max_stale=60, idle_after=30)
    cache.store(Q, A, 1, now=0.0)
    assert not cache.idle(Q, 30.0)
    # A background refresh is not a use.
    cache.store(Q, A, 1, now=29.0, used=False)
    assert cache.idle(Q, 31.0)
    assert cache.prune(61.0) == []  # confirmed at 29: still servable
    assert cache.prune(89.5) == [Q]
    assert Q not in cache and len(cache) == 0
    assert cache.idle(Q, 0.0)


def test_max_stale_is_never_shorter_than_ttl() -> None:
    cache = Cache(ttl=5, max_stale=1)
    cache.store(Q, A, 1, now=0.0)
    assert cache.fallback(Q, 4.0) is not None


@given(
    ttl=st.floats(0, 100),
    max_stale=st.floats(0, 1000),
    confirmed=st.floats(0, 1e6),
    later=st.floats(0, 2000),
    live=st.booleans(),
)
def test_fresh_and_fallback_agree_with_the_rules(
    ttl: float, max_stale: float, confirmed: float, later: float, live: bool
) -> None:
    cache = Cache(ttl=ttl, max_stale=max_stale)
    cache.store(Q, A, 1, now=confirmed)
    cache.set_live(Q, live)
    now = confirmed + later
    age = now - confirmed
    fresh = cache.fresh(Q, now)
    assert (fresh is not None) == (live or age <= ttl)
    fallback = cache.fallback(Q, now)
    if fresh is not None:
        assert fallback is not None and not fallback.stale and fallback.age <= max(ttl, 0.0) + 1e-9
    elif age > max(max_stale, ttl):
        assert fallback is None
    else:
        assert fallback is not None and fallback.stale and fallback.instances == A


def test_a_query_without_its_own_entry_falls_back_to_a_wider_one() -> None:
    cache = Cache(ttl=5, max_stale=60)
    critical = Instance(
        service="web",
        id="c",
        spec=InstanceSpec(address="10.0.0.2", port=80, tags=("v1",)),
        check_status="critical",
    )
    tagged = Instance(
        service="web", id="t", spec=InstanceSpec(address="10.0.0.3", port=80, tags=("v1",))
    )
    cache.store(Query("web", healthy=False), (*A, critical, tagged), 1, now=0.0)
    passing = cache.fallback(Query("web"), 10.0)
    assert passing is not None and passing.stale
    assert [i.id for i in passing.instances] == ["a", "t"]
    v1 = cache.fallback(Query("web", tag="v1"), 10.0)
    assert v1 is not None and [i.id for i in v1.instances] == ["t"]
    # Never fresh through another query, even within its TTL.
    derived = cache.fallback(Query("web"), 1.0)
    assert derived is not None and derived.stale
    assert cache.fresh(Query("web"), 1.0) is None
    # Past max_stale the wider answer is gone too.
    assert cache.fallback(Query("web"), 61.0) is None


def test_subsets_only_when_asked() -> None:
    cache = Cache(ttl=5, max_stale=60)
    cache.store(Query("web"), A, 1, now=0.0)
    assert cache.fallback(Query("web", healthy=False), 10.0) is None
    some = cache.fallback(Query("web", healthy=False), 10.0, subsets=True)
    assert some is not None and some.instances == A and some.stale


def test_own_entry_wins_over_a_wider_one() -> None:
    cache = Cache(ttl=5, max_stale=60)
    cache.store(Query("web", healthy=False), AB, 1, now=5.0)
    cache.store(Query("web"), A, 1, now=0.0)
    own = cache.fallback(Query("web"), 7.0)
    assert own is not None and own.instances == A
