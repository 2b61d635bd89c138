from __future__ import annotations

import random
from collections import Counter

from interknit.balance.random_choice import RandomChoice
from tests.balance.helpers import assert_distribution, endpoints


def test_uniform_distribution() -> None:
    rc = RandomChoice(rng=random.Random(11))
    eps = endpoints(1, 1, 1, 1, 1)
    rc.set_endpoints(eps, 0.0)
    counts = Counter(rc.pick(None, 0.0).key for _ in range(10000))  # type: ignore[union-attr]
    assert_distribution(counts, {ep.key: 1 for ep in eps})


def test_weighted_distribution() -> None:
    rc = RandomChoice(rng=random.Random(12))
    rc.set_endpoints(endpoints(5, 1, 0, 4), 0.0)
    counts = Counter(rc.pick(None, 0.0).key for _ in range(10000))  # type: ignore[union-attr]
    assert counts["svc/c"] == 0
    assert_distribution(counts, {"svc/a": 5, "svc/b": 1, "svc/d": 4})


def test_weighted_distribution_with_exclude() -> None:
    rc = RandomChoice(rng=random.Random(13))
    eps = endpoints(5, 1, 4)
    rc.set_endpoints(eps, 0.0)
    counts = Counter(
        rc.pick(None, 0.0, exclude=[eps[0]]).key  # type: ignore[union-attr]
        for _ in range(5000)
    )
    assert_distribution(counts, {"svc/b": 1, "svc/c": 4})


def test_same_seed_same_choices() -> None:
    def run() -> list[str]:
        rc = RandomChoice(rng=random.Random(99))
        rc.set_endpoints(endpoints(1, 2, 3), 0.0)
        return [rc.pick(None, 0.0).key for _ in range(50)]  # type: ignore[union-attr]

    assert run() == run()


def test_exclude_everything_and_empty() -> None:
    rc = RandomChoice(rng=random.Random(1))
    assert rc.pick(None, 0.0) is None
    eps = endpoints(1, 1)
    rc.set_endpoints(eps, 0.0)
    assert rc.pick(None, 0.0, exclude=eps) is None
    assert rc.pick(None, 0.0, exclude={eps[0]}) is eps[1]


def test_slow_start_ramp() -> None:
    rc = RandomChoice(rng=random.Random(5), slow_start=10.0)
    old, new = endpoints(1, 1)
    old.since, new.since = float("-inf"), 50.0
    rc.set_endpoints([old, new], 50.0)
    for now, share in ((50.0, 0.1), (52.5, 0.25), (55.0, 0.5), (60.0, 1.0), (90.0, 1.0)):
        counts = Counter(rc.pick(None, now).key for _ in range(4000))  # type: ignore[union-attr]
        assert_distribution(counts, {"svc/a": 1.0, "svc/b": share})
