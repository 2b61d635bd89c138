from __future__ import annotations

import math
import random
from collections import Counter
from collections.abc import Container, Sequence

import pytest

from interknit.balance.base import Endpoint
from interknit.balance.pool import POLICIES, Pool, make_balancer
from interknit.balance.round_robin import RoundRobin
from tests.balance.helpers import assert_distribution, instance


class Recording:
    """A real round robin that also remembers what the pool handed it."""

    def __init__(self) -> None:
        self.inner = RoundRobin()
        self.calls: list[list[str]] = []

    def set_endpoints(self, endpoints: Sequence[Endpoint], now: float) -> None:
        self.calls.append([ep.key for ep in endpoints])
        self.inner.set_endpoints(endpoints, now)

    def pick(
        self, hash_key: bytes | None, now: float, exclude: Container[Endpoint] = ()
    ) -> Endpoint | None:
        return self.inner.pick(hash_key, now, exclude)


def keys(pool: Pool) -> list[str]:
    return [ep.key for ep in pool.selected]


def test_usable_means_passing_or_warning_and_not_ejected() -> None:
    pool = Pool("svc", RoundRobin(), panic_threshold=0.0)
    pool.update(
        [
            instance("a"),
            instance("b", "warning"),
            instance("c", "critical"),
            instance("d", "draining"),
            instance("e", "maintenance"),
            instance("f", ejected_until=110.0),
            instance("g", ejected_until=90.0),
        ],
        now=100.0,
    )
    assert keys(pool) == ["svc/a", "svc/b", "svc/g"]
    assert pool.usable_count == 3
    assert pool.total == 6  # maintenance does not count
    assert not pool.panic
    assert {pool.pick(None, 100.0).key for _ in range(9)} == set(keys(pool))  # type: ignore[union-attr]


def test_ejection_runs_out_on_its_own() -> None:
    pool = Pool("svc", RoundRobin())
    pool.update([instance("a"), instance("b", ejected_until=110.0)], now=100.0)
    assert keys(pool) == ["svc/a"]
    assert pool.pick(None, 109.9).key == "svc/a"  # type: ignore[union-attr]
    picked = {pool.pick(None, 110.0).key for _ in range(4)}  # type: ignore[union-attr]
    assert picked == {"svc/a", "svc/b"}
    # It re-joined at 110, so slow start ramps from there.
    assert pool.get("svc/b").since == 110.0  # type: ignore[union-attr]


def test_endpoints_keep_their_identity_and_counters_across_updates() -> None:
    pool = Pool("svc", RoundRobin())
    pool.update([instance("a"), instance("b")], now=0.0)
    a = pool.get("svc/a")
    assert a is not None
    a.started()
    a.started()
    pool.update(
        [instance("a", "critical", weight=5, port=9999), instance("b"), instance("c")], now=1.0
    )
    pool.update([instance("a", weight=5, port=9999), instance("c")], now=2.0)
    assert pool.get("svc/a") is a
    assert a.inflight == 2 and a.weight == 5 and a.port == 9999
    assert pool.get("svc/b") is None
    assert [ep.key for ep in pool.endpoints] == ["svc/a", "svc/c"]
    # Gone and back: a new object (its old requests finish on the old one harmlessly).
    pool.update([instance("a"), instance("b"), instance("c")], now=3.0)
    b = pool.get("svc/b")
    pool.update([instance("a"), instance("c")], now=4.0)
    pool.update([instance("a"), instance("b"), instance("c")], now=5.0)
    assert pool.get("svc/b") is not b


def test_since_marks_when_an_endpoint_became_usable() -> None:
    pool = Pool("svc", RoundRobin(), panic_threshold=0.0)
    pool.update([instance("a"), instance("b", "critical")], now=10.0)
    # Usable in the pool's first view: no ramp for a node that just started.
    assert pool.get("svc/a").since == -math.inf  # type: ignore[union-attr]
    pool.update([instance("a"), instance("b"), instance("c")], now=20.0)
    assert pool.get("svc/b").since == 20.0  # type: ignore[union-attr]
    assert pool.get("svc/c").since == 20.0  # type: ignore[union-attr]
    pool.update([instance("a"), instance("b", "warning"), instance("c")], now=30.0)
    assert pool.get("svc/b").since == 20.0  # type: ignore[union-attr]
    pool.update([instance("a", "draining"), instance("b"), instance("c")], now=40.0)
    pool.update([instance("a"), instance("b"), instance("c")], now=50.0)
    assert pool.get("svc/a").since == 50.0  # type: ignore[union-attr]


def test_slow_start_through_the_pool() -> None:
    pool = Pool("svc", make_balancer("random", rng=random.Random(4), slow_start=60.0))
    pool.update([instance("a"), instance("b")], now=0.0)
    pool.update([instance("a"), instance("b"), instance("c")], now=100.0)
    early = Counter(pool.pick(None, 100.0).key for _ in range(4000))  # type: ignore[union-attr]
    assert_distribution(early, {"svc/a": 1.0, "svc/b": 1.0, "svc/c": 0.1})
    later = Counter(pool.pick(None, 130.0).key for _ in range(4000))  # type: ignore[union-attr]
    assert_distribution(later, {"svc/a": 1.0, "svc/b": 1.0, "svc/c": 0.5})
    done = Counter(pool.pick(None, 160.0).key for _ in range(4000))  # type: ignore[union-attr]
    assert_distribution(done, {"svc/a": 1.0, "svc/b": 1.0, "svc/c": 1.0})


def test_panic_balances_over_all_but_draining_and_maintenance() -> None:
    pool = Pool("svc", RoundRobin())
    fleet = [
        instance("a"),
        instance("b", "critical"),
        instance("c", "critical"),
        instance("d", ejected_until=1e9),
        instance("e", "draining"),
        instance("f", "maintenance"),
    ]
    pool.update(fleet, now=0.0)
    # 1 usable of 5 not in maintenance: below half.
    assert pool.panic
    assert keys(pool) == ["svc/a", "svc/b", "svc/c", "svc/d"]
    picked = {pool.pick(None, 0.0).key for _ in range(8)}  # type: ignore[union-attr]
    assert picked == {"svc/a", "svc/b", "svc/c", "svc/d"}


def test_panic_threshold_edges() -> None:
    pool = Pool("svc", RoundRobin())
    pool.update(
        [instance("a"), instance("b"), instance("c", "critical"), instance("d", "critical")],
        now=0.0,
    )
    assert not pool.panic  # exactly half usable is not below half
    assert keys(pool) == ["svc/a", "svc/b"]
    pool.update(
        [
            instance("a"),
            instance("b", "critical"),
            instance("c", "critical"),
            instance("d", "critical"),
        ],
        now=1.0,
    )
    assert pool.panic and len(pool.selected) == 4
    pool.update(
        [instance("a"), instance("b"), instance("c", "critical"), instance("d", "critical")],
        now=2.0,
    )
    assert not pool.panic and keys(pool) == ["svc/a", "svc/b"]
    # Threshold 0 turns panic off: an all-critical pool serves nothing.
    off = Pool("svc", RoundRobin(), panic_threshold=0.0)
    off.update([instance("a", "critical")], now=0.0)
    assert not off.panic and off.pick(None, 0.0) is None
    with pytest.raises(ValueError):
        Pool("svc", RoundRobin(), panic_threshold=1.5)


def test_all_critical_panics_and_still_serves() -> None:
    pool = Pool("svc", RoundRobin())
    pool.update([instance("a", "critical"), instance("b", "critical")], now=0.0)
    assert pool.panic and pool.pick(None, 0.0) is not None


def test_empty_and_maintenance_only_pools() -> None:
    pool = Pool("svc", RoundRobin())
    pool.update([], now=0.0)
    assert pool.pick(None, 0.0) is None and not pool.panic
    pool.update([instance("a", "maintenance")], now=0.0)
    assert pool.pick(None, 0.0) is None and not pool.panic and pool.total == 0


def test_balancer_hears_only_real_changes() -> None:
    recording = Recording()
    pool = Pool("svc", recording)
    pool.update([instance("a"), instance("b")], now=0.0)
    pool.update([instance("a"), instance("b")], now=1.0)
    pool.refresh(2.0)
    pool.update([instance("b"), instance("a")], now=3.0)
    assert recording.calls == [["svc/a", "svc/b"]]
    pool.update([instance("a", weight=3), instance("b")], now=4.0)
    pool.update([instance("a", weight=3), instance("b", "critical"), instance("c")], now=5.0)
    assert recording.calls[1:] == [["svc/a", "svc/b"], ["svc/a", "svc/c"]]


def test_endpoints_put_and_removed_one_at_a_time() -> None:
    pool = Pool("svc", RoundRobin())
    pool.put(instance("a"), now=0.0)
    pool.put(instance("b"), now=0.0)
    a = pool.get("svc/a")
    pool.put(instance("a", "critical", meta=(("tier", "gold"),)), now=1.0)
    assert keys(pool) == ["svc/b"]
    assert pool.get("svc/a") is a and a is not None and a.meta == {"tier": "gold"}
    pool.remove("svc/b", now=2.0)
    assert keys(pool) == ["svc/a"] and pool.panic
    assert pool.health("svc/a") == "critical" and pool.health("svc/b") is None
    pool.remove("svc/b", now=3.0)  # already gone: no change
    assert pool.health("svc/a") == "critical"


def test_static_servers() -> None:
    pool = Pool.for_servers(
        ["127.0.0.1:9001", "[::1]:9002", "backend.local:80"], RoundRobin(), now=0.0
    )
    assert [ep.key for ep in pool.endpoints] == ["127.0.0.1:9001", "[::1]:9002", "backend.local:80"]
    v6 = pool.get("[::1]:9002")
    assert v6 is not None and v6.address == "::1" and v6.port == 9002
    # Passive checks eject static servers through set_health.
    pool.set_health("127.0.0.1:9001", now=0.0, ejected_until=30.0)
    assert len(pool.selected) == 2 and not pool.is_usable(pool.get("127.0.0.1:9001"))  # type: ignore[arg-type]
    pool.set_health("backend.local:80", now=1.0, health="critical")
    assert pool.panic
    pool.refresh(30.0)
    assert [ep.key for ep in pool.selected] == ["127.0.0.1:9001", "[::1]:9002"]
    with pytest.raises(KeyError):
        pool.set_health("nope:1", now=0.0)


def test_duplicate_static_server() -> None:
    with pytest.raises(ValueError, match="twice"):
        Pool.for_servers(["a:1", "a:1"], RoundRobin(), now=0.0)


@pytest.mark.parametrize("name", POLICIES)
def test_every_policy_serves_a_pool(name: str) -> None:
    balancer = make_balancer(name, rng=random.Random(1), slow_start=5.0)
    pool = Pool("svc", balancer)
    pool.update([instance("a"), instance("b"), instance("c", "critical")], now=0.0)
    chosen = {pool.pick(f"k{i}".encode(), 0.0).key for i in range(100)}  # type: ignore[union-attr]
    assert chosen == {"svc/a", "svc/b"}
    first = pool.pick(b"k", 0.0)
    assert pool.pick(b"k", 0.0, exclude=[first]) not in (first, None)  # type: ignore[list-item]


def test_unknown_policy() -> None:
    with pytest.raises(ValueError, match="least_requests"):
        make_balancer("fastest")


def test_describe_for_the_status_page() -> None:
    pool = Pool("svc", RoundRobin())
    pool.update([instance("a", weight=2), instance("b", "critical", ejected_until=9.0)], now=0.0)
    a = pool.get("svc/a")
    assert a is not None
    a.started()
    view = pool.describe()
    assert view["name"] == "svc" and view["usable"] == 1 and view["total"] == 2
    assert not view["panic"]
    assert view["endpoints"] == [
        {
            "key": "svc/a",
            "address": "10.0.0.1",
            "port": 8000,
            "weight": 2,
            "health": "passing",
            "ejected_until": None,
            "usable": True,
            "selected": True,
            "inflight": 1,
        },
        {
            "key": "svc/b",
            "address": "10.0.0.1",
            "port": 8000,
            "weight": 1,
            "health": "critical",
            "ejected_until": 9.0,
            "usable": False,
            "selected": False,
            "inflight": 0,
        },
    ]
