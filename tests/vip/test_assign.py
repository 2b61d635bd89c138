"""The assignment of VIPs to live nodes: exhaustive over small clusters, hypothesis over larger."""

from __future__ import annotations

import itertools
from collections import Counter

from hypothesis import given, settings
from hypothesis import strategies as st

from interknit.vip.assign import assign, score

NODES = ("a", "b", "c", "d")


def loads(result: dict[str, str], weights: dict[str, int]) -> dict[str, int]:
    count = Counter(result.values())
    return {n: count.get(n, 0) for n in weights}


def potential(load: dict[str, int], weights: dict[str, int]) -> float:
    return sum(load[n] ** 2 / weights[n] for n in weights)


def no_move_helps(result: dict[str, str], weights: dict[str, int]) -> bool:
    load = loads(result, weights)
    for giver, taker in itertools.permutations(weights, 2):
        if (
            load[giver]
            and (2 * load[taker] + 1) / weights[taker] < (2 * load[giver] - 1) / weights[giver]
        ):
            return False
    return True


def check(vips: list[str], weights: dict[str, int], current: dict[str, str]) -> dict[str, str]:
    result = assign(vips, weights, current)
    # Every VIP goes to a live node, and only configured VIPs are named.
    assert set(result) == (set(vips) if weights else set())
    assert set(result.values()) <= set(weights)
    # A fixed point: nothing moves when assigning again from the result.
    assert assign(vips, weights, result) == result
    # Balanced: no single move would even out the loads further.
    assert no_move_helps(result, weights)
    # The order of inputs does not matter: every node computes the same.
    shuffled = dict(reversed(list(weights.items())))
    assert assign(list(reversed(vips)), shuffled, dict(reversed(list(current.items())))) == result
    # Moves: a VIP leaves a live holder only to even the loads, and only for a node that ends up
    # with fewer (by weight) than the holder had.
    start = {n: sum(1 for v in vips if current.get(v) == n) for n in weights}
    for vip in vips:
        holder = current.get(vip)
        if holder in weights and result[vip] != holder:
            taker = result[vip]
            assert (
                (loads(result, weights)[taker]) / weights[taker] <= start[holder] / weights[holder]
            )
    return result


def test_exhaustive_small_clusters_equal_weights() -> None:
    vips = ["v1", "v2", "v3", "v4"]
    holders = (None, "a", "b", "c", "dead")
    for live in (("a",), ("a", "b"), ("a", "b", "c"), ("b", "c")):
        weights = dict.fromkeys(live, 1)
        for combo in itertools.product(holders, repeat=len(vips)):
            current = {v: h for v, h in zip(vips, combo, strict=True) if h is not None}
            result = check(vips, weights, current)
            load = loads(result, weights)
            assert max(load.values()) - min(load.values()) <= 1


def test_exhaustive_small_clusters_unequal_weights() -> None:
    vips = ["v1", "v2", "v3", "v4", "v5"]
    for wa, wb in itertools.product((1, 2, 3), repeat=2):
        weights = {"a": wa, "b": wb}
        for combo in itertools.product((None, "a", "b"), repeat=len(vips)):
            current = {v: h for v, h in zip(vips, combo, strict=True) if h is not None}
            check(vips, weights, current)


def test_a_dead_node_moves_only_its_own_vips() -> None:
    vips = [f"10.0.0.{i}" for i in range(1, 10)]
    weights = dict.fromkeys(("a", "b", "c"), 1)
    start = assign(vips, weights, {})
    assert sorted(Counter(start.values()).values()) == [3, 3, 3]
    after = assign(vips, {"a": 1, "b": 1}, start)
    moved = {v for v in vips if after[v] != start[v]}
    assert moved == {v for v in vips if start[v] == "c"}
    assert sorted(Counter(after.values()).values()) == [4, 5]


def test_a_node_that_comes_back_takes_only_what_evens_the_loads() -> None:
    vips = [f"10.0.0.{i}" for i in range(1, 10)]
    two = assign(vips, {"a": 1, "b": 1}, {})
    three = assign(vips, dict.fromkeys(("a", "b", "c"), 1), two)
    moved = {v for v in vips if three[v] != two[v]}
    assert len(moved) == 3 and {three[v] for v in moved} == {"c"}
    # Traffic Server's rule for equal weights: loads 2 and 1 (differ by one) do not move.
    assert assign(["x", "y", "z"], {"a": 1, "b": 1}, {"x": "a", "y": "a", "z": "b"}) == {
        "x": "a",
        "y": "a",
        "z": "b",
    }
    # Loads 3 and 0 (differ by two or more): one moves.
    moved_one = assign(["x", "y", "z"], {"a": 1, "b": 1}, dict.fromkeys("xyz", "a"))
    assert sorted(Counter(moved_one.values()).values()) == [1, 2]


def test_weights_share_the_vips_in_proportion() -> None:
    vips = [f"v{i}" for i in range(40)]
    result = assign(vips, {"a": 1, "b": 3}, {})
    assert Counter(result.values()) == {"a": 10, "b": 30}


def test_no_live_node_assigns_nothing() -> None:
    assert assign(["v"], {}, {"v": "a"}) == {}


def test_rendezvous_scores_are_stable_and_weighted() -> None:
    assert score("v", "a", 1) == score("v", "a", 1)
    assert score("v", "a", 2) == 2 * score("v", "a", 1)
    # Over many VIPs, a node of weight 3 ranks first about three times as often as one of 1.
    firsts = Counter(
        max(("a", "b"), key=lambda n: score(f"v{i}", n, 3 if n == "b" else 1)) for i in range(4000)
    )
    assert 0.70 < firsts["b"] / 4000 < 0.80


@settings(max_examples=300, deadline=None)
@given(
    vips=st.lists(st.sampled_from([f"v{i}" for i in range(12)]), unique=True, max_size=12),
    weights=st.dictionaries(st.sampled_from(NODES), st.integers(1, 4), max_size=4),
    current=st.dictionaries(
        st.sampled_from([f"v{i}" for i in range(12)]), st.sampled_from((*NODES, "gone"))
    ),
)
def test_random_clusters(vips: list[str], weights: dict[str, int], current: dict[str, str]) -> None:
    check(vips, weights, current)


@settings(max_examples=100, deadline=None)
@given(steps=st.lists(st.tuples(st.sampled_from(NODES), st.booleans()), min_size=1, max_size=12))
def test_membership_changes_move_a_bounded_number(steps: list[tuple[str, bool]]) -> None:
    """Nodes join and leave one at a time: a leave moves exactly the leaver's VIPs; a join moves
    VIPs only to the joiner, at most its fair share (rounded up)."""
    vips = [f"v{i}" for i in range(10)]
    live: dict[str, int] = {"a": 1}
    result = assign(vips, live, {})
    for node, join in steps:
        before = dict(result)
        if join and node not in live:
            live[node] = 1
            result = assign(vips, live, before)
            moved = [v for v in vips if result[v] != before[v]]
            assert all(result[v] == node for v in moved)
            assert len(moved) <= -(-len(vips) // len(live))
        elif not join and node in live and len(live) > 1:
            del live[node]
            result = assign(vips, live, before)
            moved = {v for v in vips if result[v] != before[v]}
            assert moved == {v for v in vips if before[v] == node}
