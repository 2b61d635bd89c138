"""The asyncio shell: real event loop, short real timeouts, no timed assertions."""

from __future__ import annotations

import asyncio

import pytest
from prometheus_client import CollectorRegistry

from interknit.demand.asyncio_gate import Gate, Rejected
from interknit.demand.limiter import Limiter
from interknit.demand.limits import FixedLimit
from interknit.demand.metrics import DemandMetrics
from interknit.demand.overload import OverloadMonitor
from interknit.demand.queue import CRITICAL, DEFAULT, SHEDDABLE
from interknit.demand.rate import KeyedRateLimiter, TokenBucket
from interknit.demand.settings import DemandSettings


def fixed_gate(n: int, queue: int = 8, queue_timeout: float = 5.0, **kw: object) -> Gate:
    # A long CoDel interval: a slow machine must not switch these queues to LIFO mid-test.
    limiter = Limiter(
        FixedLimit(n), queue=queue, queue_timeout=queue_timeout, reserve=0.0, codel_interval=60.0
    )
    return Gate(limiter, **kw)  # type: ignore[arg-type]


async def test_queued_request_is_admitted_when_a_slot_frees() -> None:
    gate = fixed_gate(1)
    first = await gate.acquire()
    waiting = asyncio.create_task(gate.acquire())
    await asyncio.sleep(0)
    assert not waiting.done()
    assert gate.limiter is not None and len(gate.limiter.queue) == 1
    gate.release(first)
    second = await asyncio.wait_for(waiting, 5)
    assert gate.limiter.inflight == 1
    gate.release(second)
    assert gate.limiter.inflight == 0


async def test_queue_timeout_refuses_the_waiter() -> None:
    gate = fixed_gate(1, queue_timeout=0.02)
    held = await gate.acquire()
    with pytest.raises(Rejected) as info:
        await gate.acquire()
    assert info.value.reason == "queue_timeout" and info.value.status == 503
    assert info.value.retry_header == "1"
    gate.release(held)


async def test_deadline_while_queued_refuses_as_deadline() -> None:
    gate = fixed_gate(1)
    held = await gate.acquire()
    with pytest.raises(Rejected) as info:
        await gate.acquire(deadline=gate.clock() + 0.02)
    assert info.value.reason == "deadline"
    gate.release(held)


async def test_cancelled_waiter_leaves_the_queue() -> None:
    gate = fixed_gate(1)
    held = await gate.acquire()
    waiting = asyncio.create_task(gate.acquire())
    await asyncio.sleep(0)
    waiting.cancel()
    with pytest.raises(asyncio.CancelledError):
        await waiting
    assert gate.limiter is not None and len(gate.limiter.queue) == 0
    gate.release(held)
    assert gate.limiter.inflight == 0


async def test_waiter_cancelled_right_after_admission_gives_the_slot_back() -> None:
    gate = fixed_gate(1)
    held = await gate.acquire()
    waiting = asyncio.create_task(gate.acquire())
    await asyncio.sleep(0)
    gate.release(held)  # admits the waiter, which has not run yet
    waiting.cancel()
    with pytest.raises(asyncio.CancelledError):
        await waiting
    assert gate.limiter is not None and gate.limiter.inflight == 0


async def test_rate_limits_answer_429_with_refill_time() -> None:
    t = [0.0]
    gate = Gate(
        None,
        rate=TokenBucket(2.0, 2),
        client_rate=KeyedRateLimiter(1.0, 1),
        clock=lambda: t[0],
    )
    await gate.acquire(client_key="a")
    with pytest.raises(Rejected) as info:
        await gate.acquire(client_key="a")
    assert info.value.status == 429 and info.value.retry_after == pytest.approx(1.0)
    await gate.acquire(client_key="b")
    with pytest.raises(Rejected) as info:
        await gate.acquire(client_key="c")  # the route's bucket is empty now
    assert info.value.retry_after == pytest.approx(0.5)
    assert info.value.retry_header == "1"
    # c's own token was given back when the route refused it.
    t[0] = 0.5
    await gate.acquire(client_key="c")
    t[0] = 3.0
    await gate.acquire(client_key="a")


async def test_context_manager_releases_and_marks_timeouts_dropped() -> None:
    gate = fixed_gate(2)
    async with gate.admit(DEFAULT) as permit:
        assert gate.limiter is not None and gate.limiter.inflight == 1
        assert not permit.dropped
    assert gate.limiter.inflight == 0
    with pytest.raises(TimeoutError):
        async with gate.admit(CRITICAL):
            raise TimeoutError
    assert gate.limiter.inflight == 0


async def test_metrics_and_overload_are_fed() -> None:
    registry = CollectorRegistry()
    metrics = DemandMetrics(registry)
    overload = OverloadMonitor(min_requests=4)
    settings = DemandSettings(concurrency=1, queue=0)
    gate = Gate.from_settings(settings, route="search", metrics=metrics, overload=overload)
    permit = await gate.acquire()
    for _ in range(5):
        with pytest.raises(Rejected):
            await gate.acquire(SHEDDABLE)
    gate.shed("connections")
    sample = registry.get_sample_value
    assert sample("interknit_demand_admitted_total", {"route": "search"}) == 1
    assert sample("interknit_demand_shed_total", {"route": "search", "reason": "queue_full"}) == 5
    assert sample("interknit_demand_shed_total", {"route": "search", "reason": "connections"}) == 1
    assert sample("interknit_demand_limit", {"route": "search"}) == 1
    assert sample("interknit_demand_inflight", {"route": "search"}) == 1
    assert sample("interknit_demand_queue_depth", {"route": "search"}) == 0
    assert gate.overloaded()
    gate.release(permit)
    assert sample("interknit_demand_inflight", {"route": "search"}) == 0


async def test_queue_wait_is_observed() -> None:
    registry = CollectorRegistry()
    metrics = DemandMetrics(registry)
    gate = Gate.from_settings(
        DemandSettings(concurrency=1, queue=4, reserve=0.0), route="r", metrics=metrics
    )
    assert gate.limiter is not None
    gate.limiter.queue.interval = 60.0
    held = await gate.acquire()
    waiting = asyncio.create_task(gate.acquire())
    await asyncio.sleep(0)
    assert registry.get_sample_value("interknit_demand_queue_depth", {"route": "r"}) == 1
    gate.release(held)
    gate.release(await waiting)
    assert registry.get_sample_value("interknit_demand_queued_total", {"route": "r"}) == 1
    assert (
        registry.get_sample_value("interknit_demand_queue_wait_seconds_count", {"route": "r"}) == 1
    )


async def test_many_concurrent_requests_never_exceed_the_limit() -> None:
    gate = fixed_gate(3, queue=100)
    peak = 0
    running = 0

    async def one() -> None:
        nonlocal peak, running
        async with gate.admit():
            running += 1
            peak = max(peak, running)
            await asyncio.sleep(0)
            running -= 1

    await asyncio.gather(*(one() for _ in range(50)))
    assert peak == 3
    assert gate.limiter is not None and gate.limiter.inflight == 0


async def test_no_slot_or_queue_place_leaks_under_churn() -> None:
    """Admissions, queue timeouts, deadlines, cancellations and drops, all interleaved."""
    import random

    rng = random.Random(7)
    limiter = Limiter(FixedLimit(4), queue=16, queue_timeout=0.01, reserve=0.25)
    gate = Gate(limiter)
    outcomes: dict[str, int] = {}

    async def one(i: int) -> None:
        priority = rng.choice([CRITICAL, DEFAULT, SHEDDABLE])
        deadline = gate.clock() + rng.choice([0.002, 0.05, 1.0]) if i % 3 == 0 else None
        try:
            async with gate.admit(priority, deadline) as permit:
                for _ in range(rng.randrange(4)):
                    await asyncio.sleep(0)
                if rng.random() < 0.1:
                    await asyncio.sleep(0.003)
                permit.dropped = rng.random() < 0.1
            outcomes["ok"] = outcomes.get("ok", 0) + 1
        except Rejected as refusal:
            outcomes[refusal.reason] = outcomes.get(refusal.reason, 0) + 1

    tasks = [asyncio.create_task(one(i)) for i in range(300)]
    await asyncio.sleep(0)
    for task in rng.sample(tasks, 30):
        task.cancel()
    results = await asyncio.gather(*tasks, return_exceptions=True)
    cancelled = sum(isinstance(r, asyncio.CancelledError) for r in results)
    assert sum(outcomes.values()) + cancelled == 300
    assert outcomes.get("ok", 0) > 0 and outcomes.get("queue_full", 0) > 0
    assert limiter.inflight == 0
    assert len(limiter.queue) == 0
