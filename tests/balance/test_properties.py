"""Properties every policy keeps, whatever the endpoints, weights, times and exclusions."""

from __future__ import annotations

import math
import random
from typing import get_args

from hypothesis import given, settings
from hypothesis import strategies as st

from interknit.balance.base import Endpoint
from interknit.balance.maglev import Maglev
from interknit.balance.pool import POLICIES, Health, Pool, make_balancer
from interknit.balance.source_ip import SourceIp
from tests.balance.helpers import instance

SMALL_TABLES: dict[str, type[Maglev]] = {"maglev": Maglev, "source_ip": SourceIp}

endpoint_sets = st.lists(
    st.tuples(
        st.integers(min_value=-1, max_value=5),  # weight
        st.one_of(st.just(-math.inf), st.floats(min_value=0.0, max_value=100.0)),  # since
        st.booleans(),  # excluded
        st.integers(min_value=0, max_value=3),  # inflight
    ),
    max_size=12,
)


@settings(max_examples=60, deadline=None)
@given(
    policy=st.sampled_from(POLICIES),
    spec=endpoint_sets,
    now=st.floats(min_value=0.0, max_value=200.0),
    slow_start=st.sampled_from([0.0, 30.0]),
    hash_keys=st.lists(st.one_of(st.none(), st.binary(max_size=8)), min_size=1, max_size=5),
    seed=st.integers(min_value=0, max_value=2**32),
)
def test_pick_is_a_member_not_excluded_or_none_only_when_nothing_is_left(
    policy: str,
    spec: list[tuple[int, float, bool, int]],
    now: float,
    slow_start: float,
    hash_keys: list[bytes | None],
    seed: int,
) -> None:
    eps = [
        Endpoint(
            key=f"s/{i}",
            address="10.0.0.1",
            port=1000 + i,
            weight=w,
            since=since,
            inflight=inflight,
        )
        for i, (w, since, _, inflight) in enumerate(spec)
    ]
    excluded = [ep for ep, (_, _, ex, _) in zip(eps, spec, strict=True) if ex]
    balancer = make_balancer(policy, rng=random.Random(seed), slow_start=slow_start)
    if policy in SMALL_TABLES:
        # The same algorithm on a small prime table keeps hypothesis fast.
        balancer = SMALL_TABLES[policy](rng=random.Random(seed), table_size=251)
    balancer.set_endpoints(eps, 0.0)
    all_zero = all(ep.weight <= 0 for ep in eps)
    for key in hash_keys:
        for exclude in ((), excluded):
            got = balancer.pick(key, now, exclude)
            allowed = [ep for ep in eps if (ep.weight > 0 or all_zero) and ep not in exclude]
            if allowed:
                assert got is not None and got in allowed
            else:
                assert got is None


@settings(max_examples=80, deadline=None)
@given(
    updates=st.lists(
        st.lists(
            st.tuples(
                st.sampled_from("abcdef"),
                st.sampled_from(get_args(Health)),
                st.sampled_from([None, 5.0, 50.0]),
            ),
            max_size=6,
        ),
        min_size=1,
        max_size=5,
    ),
    threshold=st.sampled_from([0.0, 0.5, 1.0]),
)
def test_pool_selection_rules(
    updates: list[list[tuple[str, str, float | None]]], threshold: float
) -> None:
    pool = Pool("svc", make_balancer("round_robin"), panic_threshold=threshold)
    identity: dict[str, Endpoint] = {}
    now = 0.0
    for update in updates:
        now += 10.0
        by_id = {i: (health, ejected) for i, health, ejected in update}
        pool.update(
            [instance(i, health, ejected_until=ej) for i, (health, ej) in by_id.items()],  # type: ignore[arg-type]
            now=now,
        )
        usable = sorted(
            f"svc/{i}"
            for i, (health, ej) in by_id.items()
            if health in ("passing", "warning") and (ej is None or ej <= now)
        )
        others = sorted(
            f"svc/{i}"
            for i, (health, _) in by_id.items()
            if health not in ("maintenance", "draining")
        )
        total = sum(1 for health, _ in by_id.values() if health != "maintenance")
        panic = total > 0 and len(usable) < threshold * total
        assert pool.panic == panic
        assert [ep.key for ep in pool.selected] == (others if panic else usable)
        picked = pool.pick(None, now)
        assert (picked is None) == (not pool.selected)
        for ep in pool.endpoints:
            if ep.key in identity:
                assert identity[ep.key] is ep
            identity[ep.key] = ep
        identity = {ep.key: ep for ep in pool.endpoints}
