from __future__ import annotations

import random
from collections import Counter

import pytest

from interknit.balance.least_requests import LeastRequests
from tests.balance.helpers import assert_distribution, endpoints


def balancer(seed: int = 1, **kwargs: float) -> LeastRequests:
    return LeastRequests(rng=random.Random(seed), **kwargs)  # type: ignore[arg-type]


def test_the_most_loaded_endpoint_never_wins_a_comparison() -> None:
    lr = balancer()
    eps = endpoints(1, 1, 1)
    eps[0].inflight = 10
    lr.set_endpoints(eps, 0.0)
    counts = Counter(lr.pick(None, 0.0).key for _ in range(3000))  # type: ignore[union-attr]
    # Two different endpoints are compared every time, so the busiest one always loses.
    assert counts["svc/a"] == 0
    assert_distribution(counts, {"svc/b": 1, "svc/c": 1})


def test_two_endpoints_always_the_less_loaded() -> None:
    lr = balancer()
    a, b = endpoints(1, 1)
    lr.set_endpoints([a, b], 0.0)
    a.inflight, b.inflight = 3, 2
    assert all(lr.pick(None, 0.0) is b for _ in range(50))
    b.inflight = 4
    assert all(lr.pick(None, 0.0) is a for _ in range(50))


def test_idle_pool_is_shared_by_weight() -> None:
    lr = balancer()
    lr.set_endpoints(endpoints(3, 1, 2), 0.0)
    counts = Counter(lr.pick(None, 0.0).key for _ in range(6000))  # type: ignore[union-attr]
    assert_distribution(counts, {"svc/a": 3, "svc/b": 1, "svc/c": 2})


def test_load_is_compared_per_unit_of_weight() -> None:
    lr = balancer()
    heavy, light = endpoints(2, 1)
    heavy.inflight = light.inflight = 2
    lr.set_endpoints([heavy, light], 0.0)
    # heavy carries 1 per unit of weight, light 2: heavy wins whenever both are drawn.
    counts = Counter(lr.pick(None, 0.0).key for _ in range(2000))  # type: ignore[union-attr]
    assert counts["svc/b"] < 20


def test_a_stuck_endpoint_gets_little_new_work() -> None:
    """A closed loop: requests on b never finish, on the others they finish at once."""
    lr = balancer(seed=7)
    eps = endpoints(1, 1, 1, 1)
    lr.set_endpoints(eps, 0.0)
    for _ in range(4000):
        ep = lr.pick(None, 0.0)
        assert ep is not None
        ep.started()
        if ep is not eps[1]:
            ep.finished()
    # Random would have sent b about 1000; two choices stop once it is ahead of the others.
    assert eps[1].inflight <= 2


def test_exclude_and_empty() -> None:
    lr = balancer()
    assert lr.pick(None, 0.0) is None
    eps = endpoints(1, 2, 3)
    lr.set_endpoints(eps, 0.0)
    seen = {lr.pick(None, 0.0, exclude=[eps[2]]) for _ in range(200)}
    assert seen == {eps[0], eps[1]}
    assert {lr.pick(None, 0.0, exclude=eps[:2]) for _ in range(20)} == {eps[2]}
    assert lr.pick(None, 0.0, exclude=eps) is None


def test_slow_start_lowers_a_new_endpoints_share() -> None:
    lr = balancer(slow_start=30.0)
    old, new = endpoints(1, 1)
    old.since, new.since = float("-inf"), 0.0
    lr.set_endpoints([old, new], 0.0)
    early = Counter(lr.pick(None, 0.0).key for _ in range(2000))  # type: ignore[union-attr]
    # Idle pool: the first draw wins ties, so shares follow effective weights 1 : 0.1.
    assert_distribution(early, {"svc/a": 1.0, "svc/b": 0.1})
    late = Counter(lr.pick(None, 30.0).key for _ in range(2000))  # type: ignore[union-attr]
    assert_distribution(late, {"svc/a": 1, "svc/b": 1})


@pytest.mark.parametrize("choices", [1, 3])
def test_other_choice_counts(choices: int) -> None:
    lr = LeastRequests(rng=random.Random(3), choices=choices)
    eps = endpoints(1, 1, 1, 1)
    eps[0].inflight = 5
    lr.set_endpoints(eps, 0.0)
    counts = Counter(lr.pick(None, 0.0).key for _ in range(2000))  # type: ignore[union-attr]
    if choices == 1:
        assert_distribution(counts, {ep.key: 1 for ep in eps})
    else:
        assert counts["svc/a"] == 0


def test_choices_must_be_positive() -> None:
    with pytest.raises(ValueError):
        LeastRequests(choices=0)
