"""Client-side picks go through the proxy's pools and balancers."""

from __future__ import annotations

import random
from collections import Counter

from interknit.client.model import Lookup, Query
from interknit.client.picker import Picker
from interknit.registry.model import Instance, InstanceSpec

Q = Query("web", healthy=False)


def inst(iid: str, weight: int = 1, **kw: object) -> Instance:
    spec = InstanceSpec(address="10.0.0.1", port=8000 + ord(iid[0]), weight=weight)
    return Instance(service="web", id=iid, spec=spec, **kw)  # type: ignore[arg-type]


def lookup(*instances: Instance) -> Lookup:
    return Lookup("web", tuple(instances), 1, False, 0.0)


def test_round_robin_follows_weights_exactly() -> None:
    answer = lookup(inst("a", 5), inst("b"), inst("c"))
    picker = Picker()
    picks = [picker.pick(Q, "round_robin", answer, 0.0) for _ in range(70)]
    counts = Counter(p.id for p in picks if p is not None)
    assert counts == {"a": 50, "b": 10, "c": 10}


def test_draining_and_ejected_instances_get_nothing() -> None:
    answer = lookup(
        inst("a"),
        inst("b"),
        inst("c"),
        inst("d", operator="draining"),
        inst("e", ejected_until=100.0),
    )
    picker = Picker()
    ids = {p.id for _ in range(50) if (p := picker.pick(Q, "round_robin", answer, 50.0))}
    assert ids == {"a", "b", "c"}
    # Once the ejection has run out, the ejected instance is back.
    ids = {p.id for _ in range(50) if (p := picker.pick(Q, "round_robin", answer, 101.0))}
    assert ids == {"a", "b", "c", "e"}


def test_hashing_keeps_a_key_on_one_instance() -> None:
    answer = lookup(*(inst(c) for c in "abcdefgh"))
    picker = Picker(rng=random.Random(1))
    for policy in ("ring_hash", "maglev"):
        for user in range(20):
            key = f"user-{user}".encode()
            first = picker.pick(Q, policy, answer, 0.0, key=key)
            assert first is not None
            assert all(picker.pick(Q, policy, answer, 0.0, key=key) == first for _ in range(5))


def test_exclude_sends_a_retry_elsewhere() -> None:
    answer = lookup(inst("a"), inst("b"))
    picker = Picker()
    for _ in range(10):
        chosen = picker.pick(Q, "random", answer, 0.0, exclude={"a"})
        assert chosen is not None and chosen.id == "b"
    assert picker.pick(Q, "random", answer, 0.0, exclude={"a", "b"}) is None


def test_nothing_usable_picks_nothing_and_new_answers_rebuild_the_pool() -> None:
    picker = Picker()
    assert picker.pick(Q, "round_robin", lookup(), 0.0) is None
    assert picker.pick(Q, "round_robin", lookup(inst("a", operator="maintenance")), 0.0) is None
    chosen = picker.pick(Q, "round_robin", lookup(inst("b")), 0.0)
    assert chosen is not None and chosen.id == "b"


def test_panic_balances_over_critical_instances_too() -> None:
    # One usable of four is below the 50% panic threshold: the pool uses them all.
    answer = lookup(
        inst("a"),
        inst("b", check_status="critical"),
        inst("c", check_status="critical"),
        inst("d", check_status="critical"),
    )
    picker = Picker()
    ids = {p.id for _ in range(40) if (p := picker.pick(Q, "round_robin", answer, 0.0))}
    assert ids == {"a", "b", "c", "d"}
    assert picker.pool(Q, "round_robin", answer, 0.0).panic
