from __future__ import annotations

import random
from collections import Counter

from hypothesis import given
from hypothesis import strategies as st

from interknit.balance.round_robin import RoundRobin
from tests.balance.helpers import endpoints


def picks(rr: RoundRobin, count: int, now: float = 0.0) -> str:
    out = []
    for _ in range(count):
        ep = rr.pick(None, now)
        assert ep is not None
        out.append(ep.key[-1])
    return "".join(out)


def test_smooth_weighted_sequence_matches_nginx() -> None:
    rr = RoundRobin()
    rr.set_endpoints(endpoints(5, 1, 1), 0.0)
    # nginx's documented sequence for weights 5, 1, 1: heavy peer spread, not bunched.
    assert picks(rr, 14) == "aabacaa" * 2


def test_equal_weights_rotate_in_order() -> None:
    rr = RoundRobin()
    rr.set_endpoints(endpoints(1, 1, 1, 1), 0.0)
    assert picks(rr, 8) == "abcdabcd"


def test_counts_are_exact_per_cycle() -> None:
    rr = RoundRobin()
    rr.set_endpoints(endpoints(3, 2, 1), 0.0)
    assert Counter(picks(rr, 600)) == {"a": 300, "b": 200, "c": 100}


def test_exclude_skips_tried_endpoints_and_keeps_rotation() -> None:
    rr = RoundRobin()
    eps = endpoints(1, 1, 1)
    rr.set_endpoints(eps, 0.0)
    got = [rr.pick(None, 0.0, exclude=[eps[0]]) for _ in range(6)]
    assert [ep.key[-1] for ep in got if ep] == list("bcbcbc")
    assert rr.pick(None, 0.0, exclude=eps) is None
    # a sat out; the others' rotation carries on undisturbed.
    assert picks(rr, 3) == "abc"


def test_empty_pool_picks_nothing() -> None:
    rr = RoundRobin()
    assert rr.pick(None, 0.0) is None
    rr.set_endpoints([], 0.0)
    assert rr.pick(None, 0.0) is None


def test_zero_weight_gets_nothing_unless_all_are_zero() -> None:
    rr = RoundRobin()
    rr.set_endpoints(endpoints(1, 0, 2), 0.0)
    assert set(picks(rr, 30)) == {"a", "c"}
    rr.set_endpoints(endpoints(0, 0), 0.0)
    assert picks(rr, 4) == "abab"


def test_slow_start_ramps_a_new_endpoint() -> None:
    rr = RoundRobin(slow_start=10.0)
    a, b = endpoints(1, 1)
    a.since = float("-inf")
    b.since = 100.0
    rr.set_endpoints([a, b], 100.0)
    # At the start b weighs the floor (10%): 10 of 110 picks.
    assert Counter(picks(rr, 110, now=100.0))["b"] == 10
    # Half way through it weighs 0.5: one pick in three.
    assert Counter(picks(rr, 300, now=105.0))["b"] == 100
    # Once ramped, equal shares.
    assert Counter(picks(rr, 100, now=110.0))["b"] == 50


def test_random_start_keeps_the_smooth_sequence() -> None:
    for seed in range(20):
        rr = RoundRobin(rng=random.Random(seed))
        rr.set_endpoints(endpoints(5, 1, 1), 0.0)
        sequence = picks(rr, 7)
        # Whatever the start, a cycle is still 5 a, 1 b, 1 c, and b and c are never adjacent.
        assert Counter(sequence) == {"a": 5, "b": 1, "c": 1}
        assert "bc" not in sequence and "cb" not in sequence
    rr = RoundRobin(rng=random.Random(3))
    rr.set_endpoints(endpoints(1, 1, 1, 1), 0.0)
    # Equal weights: still a strict rotation, from wherever it starts.
    sequence = picks(rr, 8)
    assert sorted(sequence[:4]) == list("abcd") and sequence[4:] == sequence[:4]
    starts_equal = set()
    for seed in range(20):
        rr = RoundRobin(rng=random.Random(seed))
        rr.set_endpoints(endpoints(1, 1, 1, 1), 0.0)
        starts_equal.add(picks(rr, 1))
    assert starts_equal == set("abcd")


def smooth_sequence(weights: list[int], count: int) -> list[int]:
    """nginx's smooth weighted round robin, written out plainly as the oracle."""
    current = [0] * len(weights)
    out = []
    for _ in range(count):
        for i, w in enumerate(weights):
            current[i] += w
        best = max(range(len(weights)), key=lambda i: (current[i], -i))
        current[best] -= sum(weights)
        out.append(best)
    return out


@given(st.integers(1, 9), st.integers(1, 5), st.integers(0, 40))
def test_equal_weights_take_the_rotation_shortcut_and_match_the_smooth_order(
    n: int, weight: int, count: int
) -> None:
    rr = RoundRobin()
    eps = endpoints(*[weight] * n)
    rr.set_endpoints(eps, 0.0)
    got = [eps.index(rr.pick(None, 0.0)) for _ in range(count)]  # type: ignore[arg-type]
    assert got == smooth_sequence([weight] * n, count)


def test_equal_weights_step_over_excluded_endpoints_and_keep_rotating() -> None:
    rr = RoundRobin()
    eps = endpoints(1, 1, 1)
    rr.set_endpoints(eps, 0.0)
    assert rr.pick(None, 0.0) is eps[0]
    assert rr.pick(None, 0.0, exclude={eps[1]}) is eps[2]
    assert rr.pick(None, 0.0) is eps[0]
    assert rr.pick(None, 0.0, exclude=set(eps)) is None
