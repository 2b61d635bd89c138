"""ring_hash, maglev and source_ip: consistency, balance, minimal movement, retries."""

from __future__ import annotations

import math
import random
from collections import Counter
from collections.abc import Callable

import pytest

from interknit.balance.base import Balancer, Endpoint
from interknit.balance.maglev import Maglev, build_table
from interknit.balance.ring_hash import RingHash, points_per_weight
from interknit.balance.source_ip import SourceIp
from tests.balance.helpers import endpoints, many

Factory = Callable[[], RingHash | Maglev]
FACTORIES: dict[str, Factory] = {
    "ring_hash": lambda: RingHash(rng=random.Random(1)),
    "maglev": lambda: Maglev(rng=random.Random(1)),
    "source_ip": lambda: SourceIp(rng=random.Random(1)),
}
# How far one endpoint's share of keys may stray from its fair share: a ring of ~1024 points
# over 10 endpoints varies by about 10% per endpoint; Maglev's table splits almost exactly.
TOLERANCE = {"ring_hash": 0.3, "maglev": 0.05, "source_ip": 0.05}
KEYS = [f"user-{i}".encode() for i in range(20000)]


@pytest.fixture(params=sorted(FACTORIES))
def policy(request: pytest.FixtureRequest) -> str:
    return str(request.param)


def mapping(balancer: Balancer, keys: list[bytes] = KEYS) -> dict[bytes, str]:
    out = {}
    for key in keys:
        ep = balancer.pick(key, 0.0)
        assert ep is not None
        out[key] = ep.key
    return out


def built(policy: str, eps: list[Endpoint]) -> RingHash | Maglev:
    balancer = FACTORIES[policy]()
    balancer.set_endpoints(eps, 0.0)
    return balancer


def test_same_key_same_endpoint_whatever_the_order(policy: str) -> None:
    eps = many(10)
    first = mapping(built(policy, eps))
    assert mapping(built(policy, eps)) == first
    assert mapping(built(policy, list(reversed(eps)))) == first


def test_hash_is_stable_across_processes(policy: str) -> None:
    # Golden values: a salted hash (Python's hash()) would change them from run to run.
    balancer = built(policy, many(10))
    got = [balancer.pick(key, 0.0).key for key in (b"alice", b"bob", b"10.0.0.7")]  # type: ignore[union-attr]
    assert got == GOLDEN[policy]


GOLDEN = {
    "ring_hash": ["svc/2", "svc/7", "svc/8"],
    "maglev": ["svc/1", "svc/2", "svc/5"],
    "source_ip": ["svc/1", "svc/2", "svc/5"],
}


def test_keys_spread_evenly(policy: str) -> None:
    counts = Counter(mapping(built(policy, many(10))).values())
    fair = len(KEYS) / 10
    assert len(counts) == 10
    for count in counts.values():
        assert abs(count - fair) / fair < TOLERANCE[policy], counts


def test_keys_spread_by_weight(policy: str) -> None:
    counts = Counter(mapping(built(policy, endpoints(1, 2, 3, 0))).values())
    assert "svc/d" not in counts
    total = len(KEYS)
    for key, weight in (("svc/a", 1), ("svc/b", 2), ("svc/c", 3)):
        fair = total * weight / 6
        assert abs(counts[key] - fair) / fair < TOLERANCE[policy], counts


@pytest.mark.parametrize("size", [5, 10, 40])
def test_removing_one_endpoint_moves_about_one_nth(policy: str, size: int) -> None:
    eps = many(size)
    before = mapping(built(policy, eps))
    gone = eps[size // 2]
    after = mapping(built(policy, [ep for ep in eps if ep is not gone]))
    moved = {key for key in KEYS if before[key] != after[key]}
    owned = {key for key in KEYS if before[key] == gone.key}
    # Every key of the removed endpoint moves; few others do.
    assert owned <= moved
    extra = len(moved - owned) / len(KEYS)
    if policy == "ring_hash":
        assert extra == 0.0
    else:
        assert extra < 0.5 / size
    assert len(moved) / len(KEYS) < 1.6 / size


@pytest.mark.parametrize("size", [5, 10, 40])
def test_adding_one_endpoint_moves_about_one_nth(policy: str, size: int) -> None:
    eps = many(size + 1)
    before = mapping(built(policy, eps[:size]))
    after = mapping(built(policy, eps))
    moved = [key for key in KEYS if before[key] != after[key]]
    # Keys move only to the newcomer (Maglev: mostly), and about 1/(N+1) of them.
    to_new = sum(1 for key in moved if after[key] == eps[size].key)
    if policy == "ring_hash":
        assert to_new == len(moved)
    else:
        assert to_new >= 0.8 * len(moved)
    assert 0.5 / (size + 1) < len(moved) / len(KEYS) < 1.6 / (size + 1)


def test_retry_goes_elsewhere_and_agrees_with_itself(policy: str) -> None:
    eps = many(6)
    balancer = built(policy, eps)
    for key in KEYS[:200]:
        first = balancer.pick(key, 0.0)
        assert first is not None
        second = balancer.pick(key, 0.0, exclude=[first])
        assert second is not None and second is not first
        assert balancer.pick(key, 0.0, exclude=[first]) is second
        third = balancer.pick(key, 0.0, exclude={first, second})
        assert third is not None and third not in (first, second)
    assert balancer.pick(b"k", 0.0, exclude=eps) is None
    only = eps[3]
    assert balancer.pick(b"k", 0.0, exclude=[ep for ep in eps if ep is not only]) is only


def test_retries_spread_over_the_others(policy: str) -> None:
    eps = many(5)
    balancer = built(policy, eps)
    retried: Counter[str] = Counter()
    for key in KEYS[:5000]:
        first = balancer.pick(key, 0.0)
        if first is eps[0]:
            retried[balancer.pick(key, 0.0, exclude=[first]).key] += 1  # type: ignore[union-attr]
    assert set(retried) == {ep.key for ep in eps[1:]}


def test_without_a_key_any_endpoint(policy: str) -> None:
    eps = many(4)
    balancer = built(policy, eps)
    seen = Counter(balancer.pick(None, 0.0).key for _ in range(400))  # type: ignore[union-attr]
    assert set(seen) == {ep.key for ep in eps}


def test_empty(policy: str) -> None:
    balancer = FACTORIES[policy]()
    assert balancer.pick(b"x", 0.0) is None
    balancer.set_endpoints([], 0.0)
    assert balancer.pick(b"x", 0.0) is None
    assert balancer.pick(None, 0.0) is None


def test_all_zero_weights_count_as_equal(policy: str) -> None:
    counts = Counter(mapping(built(policy, endpoints(0, 0, 0))).values())
    assert len(counts) == 3


def test_ring_size_bounds() -> None:
    ring = RingHash()
    ring.set_endpoints(many(3), 0.0)
    assert 1024 <= ring.ring_size < 2048
    ring.set_endpoints(many(1), 0.0)
    assert ring.ring_size == 1024
    # A light endpoint among heavy ones still gets a point of its own.
    ring.set_endpoints(endpoints(1000, 1000, 1), 0.0)
    assert ring.ring_size >= 2001
    small = RingHash(min_ring_size=16, max_ring_size=64)
    small.set_endpoints(endpoints(100, 100), 0.0)
    assert small.ring_size <= 64


def test_points_per_weight_is_a_power_of_two() -> None:
    for total in (1, 3, 10, 99, 1000, 5000):
        scale = points_per_weight([1.0] * total, 1024, 1 << 18)
        assert scale == 2.0 ** round(math.log2(scale))
        assert total * scale >= 1024 or scale == 1.0


def test_ring_parameters_are_checked() -> None:
    with pytest.raises(ValueError):
        RingHash(min_ring_size=0)
    with pytest.raises(ValueError):
        RingHash(min_ring_size=2048, max_ring_size=1024)


def test_maglev_table_is_full_and_weighted() -> None:
    table = build_table(["a", "b", "c"], [1.0, 1.0, 2.0], 65537)
    counts = Counter(table)
    assert sum(counts.values()) == 65537 and -1 not in counts
    assert abs(counts[2] / 65537 - 0.5) < 0.01
    assert abs(counts[0] / 65537 - 0.25) < 0.01
    assert build_table([], [], 65537) == []


def test_maglev_table_size_must_be_prime() -> None:
    with pytest.raises(ValueError):
        Maglev(table_size=65536)
    small = Maglev(table_size=251)
    small.set_endpoints(many(3), 0.0)
    assert len(small.table) == 251


def test_maglev_builds_for_hundreds_of_endpoints() -> None:
    balancer = Maglev()
    balancer.set_endpoints(many(500), 0.0)
    assert len(set(balancer.table)) == 500
