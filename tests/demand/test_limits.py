from __future__ import annotations

import pytest

from interknit.demand.limiter import Limiter
from interknit.demand.limits import AimdLimit, FixedLimit, GradientLimit
from tests.demand.sim import Pool, mean


def test_fixed_limit_never_moves() -> None:
    limit = FixedLimit(7)
    assert limit.limit == 7
    assert limit.on_sample(10.0, 100, True) == 7
    assert limit.on_sample(0.001, 1, False) == 7
    with pytest.raises(ValueError):
        FixedLimit(0)


def test_aimd_grows_by_one_when_busy_and_backs_off_on_drop() -> None:
    limit = AimdLimit(initial_limit=10, backoff_ratio=0.5, timeout=1.0)
    assert limit.on_sample(0.01, 5, False) == 11
    assert limit.on_sample(0.01, 2, False) == 11  # idle pool: no growth
    assert limit.on_sample(0.01, 11, True) == 5
    assert limit.on_sample(2.0, 5, False) == 2  # too slow counts as a drop
    assert limit.on_sample(0.01, 1, True) == 1  # never below min_limit


def test_aimd_respects_max_and_validates() -> None:
    limit = AimdLimit(initial_limit=3, max_limit=4)
    for _ in range(10):
        limit.on_sample(0.01, 4, False)
    assert limit.limit == 4
    with pytest.raises(ValueError):
        AimdLimit(backoff_ratio=1.5)
    with pytest.raises(ValueError):
        AimdLimit(min_limit=5, max_limit=2)


def test_gradient_probes_noload_rtt_first() -> None:
    limit = GradientLimit(initial_limit=50, min_limit=4, probe_samples=3)
    assert limit.limit == 4  # pinned low while measuring
    # Samples from requests that started at high concurrency do not count.
    assert limit.on_sample(0.5, 40, False) == 4
    for rtt in (0.010, 0.012, 0.011):
        limit.on_sample(rtt, 2, False)
    assert limit.noload_rtt == pytest.approx(0.011)
    assert limit.limit == 50


def test_gradient_shrinks_on_high_latency_and_grows_when_fast() -> None:
    limit = GradientLimit(
        initial_limit=100,
        probe_samples=1,
        smoothing=1.0,
        rtt_tolerance=1.0,
        window_min=1,
        window_max=1,
    )
    limit.on_sample(0.010, 1, False)
    # Latency four times the no-load: gradient clamps at 0.5, plus sqrt(100) headroom.
    assert limit.on_sample(0.040, 100, False) == 60
    # Latency at no-load: grows by its headroom.
    before = limit.limit
    assert limit.on_sample(0.010, before, False) > before
    # ...but not when the pool was not even half used (application-limited).
    at = limit.limit
    assert limit.on_sample(0.010, 2, False) == at


def test_gradient_drop_halves_towards_floor() -> None:
    limit = GradientLimit(
        initial_limit=100, min_limit=10, probe_samples=1, smoothing=1.0, window_max=1, window_min=1
    )
    limit.on_sample(0.01, 1, False)
    assert limit.on_sample(0.01, 100, True) == 60  # a drop halves (plus headroom)
    for _ in range(20):
        limit.on_sample(0.01, 100, True)
    assert limit.limit == 10  # never below min_limit


def test_gradient_updates_once_a_window() -> None:
    limit = GradientLimit(initial_limit=40, probe_samples=1, window_min=10, smoothing=1.0)
    limit.on_sample(0.01, 1, False)
    # The window is one limit's worth of samples: 39 slow samples change nothing yet...
    for _ in range(39):
        assert limit.on_sample(0.1, 40, False) == 40
    # ...the 40th closes the window and applies one cut.
    assert limit.on_sample(0.1, 40, False) == int(40 * 0.5 + 40**0.5)


def test_gradient_reprobes_after_probe_every() -> None:
    limit = GradientLimit(initial_limit=30, probe_samples=2, probe_every=3, window_max=10)
    limit.on_sample(0.01, 1, False)
    limit.on_sample(0.01, 1, False)
    assert limit.limit >= 30
    for _ in range(29):  # two windows of ten, and most of a third
        limit.on_sample(0.01, 30, False)
    assert limit.limit > limit.min_limit
    limit.on_sample(0.01, 30, False)  # the third window closes
    assert limit.limit == limit.min_limit
    limit.on_sample(0.02, 1, False)
    limit.on_sample(0.02, 1, False)
    assert limit.noload_rtt == pytest.approx(0.02)
    assert limit.limit > limit.min_limit


def test_gradient_converges_to_pool_capacity() -> None:
    pool = Pool(capacity=40, service=0.010)
    limiter = Limiter(GradientLimit(), queue=0)
    pool.run(limiter, 4000)
    settled = mean(pool.limits[-1000:])
    # rtt_tolerance 1.25 plus sqrt headroom: a little above C, never far above it.
    assert 40 <= settled <= 80
    # And the latency it buys stays within the tolerance band (plus headroom).
    assert mean(pool.rtts[-1000:]) <= 0.010 * 2.0


def test_gradient_starts_low_and_finds_a_large_pool() -> None:
    pool = Pool(capacity=200, service=0.005)
    limiter = Limiter(GradientLimit(initial_limit=10), queue=0)
    pool.run(limiter, 8000)
    assert 200 <= mean(pool.limits[-1000:]) <= 400


def test_gradient_follows_backends_removed_and_added() -> None:
    pool = Pool(capacity=60, service=0.010)
    limiter = Limiter(GradientLimit(), queue=0)
    pool.run(limiter, 3000)
    assert 60 <= mean(pool.limits[-500:]) <= 120
    pool.capacity = 20  # two of three backends gone
    pool.run(limiter, 3000)
    assert 20 <= mean(pool.limits[-500:]) <= 40
    pool.capacity = 120  # backends added
    pool.run(limiter, 4000)
    assert 120 <= mean(pool.limits[-500:]) <= 240


def test_gradient_follows_a_slowdown() -> None:
    limit = GradientLimit(probe_every=40)
    pool = Pool(capacity=40, service=0.010)
    limiter = Limiter(limit, queue=0)
    pool.run(limiter, 2500)
    before = mean(pool.limits[-500:])
    pool.service = 0.030  # every backend three times slower
    pool.run(limiter, 300)
    # First reaction: latency is far above the no-load RTT, so the limit is cut.
    assert mean(pool.limits[-100:]) < before
    pool.run(limiter, 6000)
    # After the re-probe the slower no-load RTT is the reference and the limit recovers.
    assert limit.noload_rtt == pytest.approx(0.030)
    assert 40 <= mean(pool.limits[-500:]) <= 80


def test_aimd_settles_around_the_drop_point() -> None:
    # Upstream gives up after twice the service time: drops start beyond 2 * C in flight.
    pool = Pool(capacity=30, service=0.010, timeout=0.020)
    limiter = Limiter(AimdLimit(initial_limit=5), queue=0)
    pool.run(limiter, 5000)
    assert 30 <= mean(pool.limits[-1000:]) <= 70
