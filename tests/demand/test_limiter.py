from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from interknit.demand.limiter import ADMIT, Limiter, Reject
from interknit.demand.limits import AimdLimit, FixedLimit
from interknit.demand.queue import ADMITTED, CRITICAL, DEFAULT, QUEUED, REJECTED, SHEDDABLE, Entry


def limiter(n: int, **kw: object) -> Limiter:
    return Limiter(FixedLimit(n), **kw)  # type: ignore[arg-type]


def test_admits_up_to_the_limit_then_queues_then_refuses() -> None:
    lim = limiter(2, queue=1, reserve=0.0)
    assert lim.try_acquire(0.0, DEFAULT) is ADMIT
    assert lim.try_acquire(0.0, DEFAULT) is ADMIT
    queued = lim.try_acquire(0.0, DEFAULT)
    assert isinstance(queued, Entry) and queued.status == QUEUED
    full = lim.try_acquire(0.0, DEFAULT)
    assert isinstance(full, Reject) and full.reason == "queue_full" and full.status == 503
    assert full.retry_after > 0
    assert lim.inflight == 2


def test_release_admits_the_next_queued_entry() -> None:
    lim = limiter(1, queue=4, reserve=0.0)
    assert lim.try_acquire(0.0, DEFAULT) is ADMIT
    entry = lim.try_acquire(0.0, DEFAULT)
    assert isinstance(entry, Entry)
    settled = lim.release(0.01, 0.01)
    assert list(settled) == [entry]
    assert entry.status == ADMITTED and entry.inflight == 1
    assert lim.inflight == 1
    assert lim.release(0.02, 0.01) == ()
    assert lim.inflight == 0


def test_queue_timeout_on_release_and_on_expire() -> None:
    lim = limiter(1, queue=4, queue_timeout=0.1, reserve=0.0, codel_interval=10.0)
    lim.try_acquire(0.0, DEFAULT)
    stale = lim.try_acquire(0.0, DEFAULT)
    fresh = lim.try_acquire(0.09, DEFAULT)
    assert isinstance(stale, Entry) and isinstance(fresh, Entry)
    settled = lim.release(0.15, 0.15)
    assert stale.status == REJECTED and stale.reason == "queue_timeout"
    assert fresh.status == ADMITTED
    assert set(settled) == {stale, fresh}
    waiting = lim.try_acquire(0.2, DEFAULT)
    assert isinstance(waiting, Entry)
    assert lim.expire(0.25) == []
    assert lim.expire(0.31) == [waiting]


def test_deadline_rejects_at_once_when_median_service_exceeds_time_left() -> None:
    lim = limiter(1, queue=8, reserve=0.0)
    # An expired deadline is refused even before any service time is known.
    assert isinstance(lim.try_acquire(1.0, DEFAULT, deadline=1.0), Reject)
    for _ in range(10):
        assert lim.try_acquire(0.0, DEFAULT) is ADMIT
        lim.release(0.0, 0.2)
    assert lim.service_times.median == pytest.approx(0.2)
    refused = lim.try_acquire(0.0, DEFAULT, deadline=0.1)
    assert isinstance(refused, Reject) and refused.reason == "deadline"
    assert lim.inflight == 0
    assert lim.try_acquire(0.0, DEFAULT, deadline=0.5) is ADMIT


def test_deadline_counts_the_expected_wait_in_the_queue() -> None:
    lim = limiter(1, queue=8, reserve=0.0)
    for _ in range(10):
        lim.try_acquire(0.0, DEFAULT)
        lim.release(0.0, 0.1)
    assert lim.try_acquire(0.0, DEFAULT) is ADMIT
    # One slot busy, nobody queued: wait ~0.1 + service 0.1 = 0.2.
    assert isinstance(lim.try_acquire(0.0, DEFAULT, deadline=0.25), Entry)
    # Now one queued ahead: ~0.2 wait + 0.1 service does not fit in 0.25.
    refused = lim.try_acquire(0.0, DEFAULT, deadline=0.25)
    assert isinstance(refused, Reject) and refused.reason == "deadline"
    assert isinstance(lim.try_acquire(0.0, DEFAULT, deadline=0.35), Entry)


def test_queued_entry_past_its_deadline_is_refused_as_deadline() -> None:
    lim = limiter(1, queue=8, queue_timeout=1.0, reserve=0.0)
    lim.try_acquire(0.0, DEFAULT)
    entry = lim.try_acquire(0.0, DEFAULT, deadline=0.05)
    assert isinstance(entry, Entry)
    assert lim.expire(0.06) == [entry]
    assert entry.reason == "deadline"


def test_critical_reserve_and_sheddable_refused_first() -> None:
    lim = limiter(10, queue=4, reserve=0.1)
    for _ in range(9):
        assert lim.try_acquire(0.0, DEFAULT) is ADMIT
    # The tenth slot is kept for critical requests.
    assert isinstance(lim.try_acquire(0.0, DEFAULT), Entry)
    assert lim.try_acquire(0.0, CRITICAL) is ADMIT
    # Queue half full: sheddable may no longer wait.
    assert isinstance(lim.try_acquire(0.0, DEFAULT), Entry)
    shed = lim.try_acquire(0.0, SHEDDABLE)
    assert isinstance(shed, Reject) and shed.reason == "priority"
    # Critical entries are served before default ones, whatever the order of arrival.
    late_critical = lim.try_acquire(0.001, CRITICAL)
    assert isinstance(late_critical, Entry)
    settled = lim.release(0.002, 0.002)
    assert list(settled) == [late_critical]


def test_lifo_under_a_standing_queue_serves_the_freshest() -> None:
    lim = limiter(1, queue=10, reserve=0.0, queue_timeout=1.0, codel_target=0.005)
    lim.try_acquire(0.0, DEFAULT)
    old = lim.try_acquire(0.0, DEFAULT)
    newest = lim.try_acquire(0.199, DEFAULT)
    settled = lim.release(0.2, 0.2)
    assert isinstance(newest, Entry) and newest.status == ADMITTED
    assert isinstance(old, Entry) and old.status == REJECTED and old.reason == "queue_timeout"
    assert set(settled) == {old, newest}


def test_sheddable_refused_once_the_queue_stands() -> None:
    lim = limiter(1, queue=100, reserve=0.0, codel_interval=0.1, queue_timeout=1.0)
    lim.try_acquire(0.0, DEFAULT)
    assert isinstance(lim.try_acquire(0.0, SHEDDABLE), Entry)  # a burst: may wait
    lim.try_acquire(0.0, DEFAULT)
    shed = lim.try_acquire(0.2, SHEDDABLE)  # a standing queue: refused
    assert isinstance(shed, Reject) and shed.reason == "priority"


def test_critical_only_slots_are_not_given_to_default_entries() -> None:
    lim = limiter(10, queue=4, reserve=0.2)
    for _ in range(8):
        lim.try_acquire(0.0, DEFAULT)
    waiting = lim.try_acquire(0.0, DEFAULT)
    assert isinstance(waiting, Entry)
    assert lim.try_acquire(0.0, CRITICAL) is ADMIT  # 9 in flight
    assert lim.release(0.001, 0.001) == []  # 8 in flight: still the reserved share
    assert waiting.status == QUEUED
    assert list(lim.release(0.002, 0.001)) == [waiting]  # 7 in flight: room for default


def test_cancel_and_forfeit() -> None:
    lim = limiter(1, queue=4, reserve=0.0)
    lim.try_acquire(0.0, DEFAULT)
    a = lim.try_acquire(0.0, DEFAULT)
    b = lim.try_acquire(0.0, DEFAULT)
    assert isinstance(a, Entry) and isinstance(b, Entry)
    assert lim.cancel(a, 0.01) == ()
    assert a.status == REJECTED and len(lim.queue) == 1
    # b is admitted, then its caller leaves before starting: the slot goes back.
    assert list(lim.release(0.02, 0.02)) == [b]
    assert lim.inflight == 1
    assert lim.cancel(b, 0.03) == ()
    assert lim.inflight == 0


def test_adaptive_limit_is_fed_and_changes_ceiling() -> None:
    lim = Limiter(AimdLimit(initial_limit=4, backoff_ratio=0.5), queue=0, reserve=0.0)
    for _ in range(4):
        assert lim.try_acquire(0.0, DEFAULT) is ADMIT
    lim.release(0.0, 0.01, dropped=True, inflight=4)
    assert lim.limit == 2
    assert isinstance(lim.try_acquire(0.0, DEFAULT), Reject)


def test_unlimited_without_a_limit() -> None:
    lim = Limiter(None, queue=0)
    for _ in range(1000):
        assert lim.try_acquire(0.0, DEFAULT) is ADMIT


def test_retry_after_grows_with_the_queue() -> None:
    lim = limiter(1, queue=10, reserve=0.0, queue_timeout=0.1)
    for _ in range(10):
        lim.try_acquire(0.0, DEFAULT)
        lim.release(0.0, 1.0)
    lim.try_acquire(0.0, DEFAULT)
    short = lim.retry_after()
    for _ in range(5):
        lim.try_acquire(0.0, DEFAULT)
    assert lim.retry_after() > short >= 0.1


ops = st.lists(
    st.tuples(
        st.sampled_from(["acquire", "release", "expire", "cancel", "tick"]),
        st.sampled_from([CRITICAL, DEFAULT, SHEDDABLE]),
        st.one_of(st.none(), st.floats(0.0, 0.3)),
    ),
    max_size=120,
)


@settings(max_examples=150, deadline=None)
@given(limit=st.integers(1, 6), capacity=st.integers(0, 6), script=ops)
def test_invariants_under_any_sequence(limit: int, capacity: int, script: list) -> None:  # type: ignore[type-arg]
    lim = Limiter(FixedLimit(limit), queue=capacity, queue_timeout=0.1, reserve=0.2)
    now = 0.0
    admitted = 0  # requests holding a slot
    queued: list[Entry] = []
    settled_seen: set[Entry] = set()

    def take(settled: object) -> None:
        nonlocal admitted
        for entry in settled:  # type: ignore[attr-defined]
            assert entry not in settled_seen, "an entry is settled once"
            settled_seen.add(entry)
            assert entry.status in (ADMITTED, REJECTED)
            queued.remove(entry)
            if entry.status == ADMITTED:
                admitted += 1

    for op, priority, extra in script:
        if op == "acquire":
            deadline = None if extra is None else now + extra
            d = lim.try_acquire(now, priority, deadline)
            if d is ADMIT:
                admitted += 1
            elif isinstance(d, Entry):
                queued.append(d)
            take(lim.take_swept())
        elif op == "release" and admitted:
            admitted -= 1
            take(lim.release(now, 0.01))
        elif op == "expire":
            take(lim.expire(now))
        elif op == "cancel" and queued:
            entry = queued.pop(0)
            settled_seen.add(entry)
            take(lim.cancel(entry, now))
        elif op == "tick":
            now += extra or 0.05
        assert lim.inflight == admitted
        assert lim.inflight <= limit
        assert len(lim.queue) == len(queued) <= capacity
        assert all(e.status == QUEUED for e in queued)
