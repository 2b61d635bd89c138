from __future__ import annotations

from interknit.demand.queue import (
    CRITICAL,
    DEFAULT,
    REJECTED,
    SHEDDABLE,
    AdaptiveQueue,
    Entry,
    parse_priority,
)


def fill(queue: AdaptiveQueue, times: list[float], priority: int = DEFAULT) -> list[Entry]:
    entries = []
    for t in times:
        entry = Entry(priority, None, t)
        assert queue.push(entry, t)
        entries.append(entry)
    return entries


def test_fifo_while_the_queue_drains() -> None:
    queue = AdaptiveQueue(10, timeout=1.0, target=0.005, interval=0.1)
    a, b, c = fill(queue, [0.0, 0.01, 0.02])
    out: list[Entry] = []
    assert not queue.congested(0.05)
    assert queue.pop(0.05, out) is a
    assert queue.pop(0.05, out) is b
    assert queue.pop(0.05, out) is c
    assert queue.pop(0.05, out) is None
    assert out == []


def test_switches_to_lifo_with_codel_target_when_standing() -> None:
    queue = AdaptiveQueue(10, timeout=1.0, target=0.005, interval=0.1)
    fill(queue, [0.0, 0.05])
    late = fill(queue, [0.149, 0.150])
    assert queue.congested(0.150)
    out: list[Entry] = []
    # Newest first; everything older than the 5 ms target is shed as queue_timeout.
    assert queue.pop(0.152, out) is late[1]
    assert [e.enqueued_at for e in out] == [0.0, 0.05]
    assert all(e.status == REJECTED and e.reason == "queue_timeout" for e in out)
    assert queue.pop(0.152, out) is late[0]
    # Empty again: back to FIFO, and the busy period starts afresh.
    assert not queue.congested(0.2)
    first, _ = fill(queue, [0.2, 0.21])
    assert queue.pop(0.25, out) is first


def test_fifo_timeout_sheds_entries_waiting_too_long() -> None:
    queue = AdaptiveQueue(10, timeout=0.1, interval=10.0)
    old, new = fill(queue, [0.0, 0.05])
    out: list[Entry] = []
    assert queue.pop(0.12, out) is new
    assert out == [old] and old.reason == "queue_timeout"


def test_bounded_capacity() -> None:
    queue = AdaptiveQueue(2)
    fill(queue, [0.0, 0.0])
    assert not queue.push(Entry(DEFAULT, None, 0.0), 0.0)
    assert len(queue) == 2
    assert not AdaptiveQueue(0).push(Entry(DEFAULT, None, 0.0), 0.0)


def test_priority_lanes_serve_critical_first() -> None:
    queue = AdaptiveQueue(10, timeout=1.0)
    shed = fill(queue, [0.0], SHEDDABLE)[0]
    default = fill(queue, [0.01], DEFAULT)[0]
    critical = fill(queue, [0.02], CRITICAL)[0]
    out: list[Entry] = []
    assert queue.count_at_or_above(CRITICAL) == 1
    assert queue.count_at_or_above(DEFAULT) == 2
    assert queue.count_at_or_above(SHEDDABLE) == 3
    assert queue.pop(0.03, out, critical_only=True) is critical
    assert queue.pop(0.03, out, critical_only=True) is None
    assert queue.pop(0.03, out) is default
    assert queue.pop(0.03, out) is shed


def test_deadline_expiry_and_remove() -> None:
    queue = AdaptiveQueue(10, timeout=1.0, interval=10.0)
    soon = Entry(DEFAULT, 0.05, 0.0)
    later = Entry(DEFAULT, 0.5, 0.0)
    gone = Entry(DEFAULT, None, 0.0)
    for e in (soon, later, gone):
        queue.push(e, 0.0)
    assert queue.next_expiry(0.0) == 0.05
    assert queue.remove(gone, 0.01)
    assert not queue.remove(gone, 0.01)
    out: list[Entry] = []
    queue.expire(0.06, out)
    assert out == [soon] and soon.reason == "deadline"
    assert len(queue) == 1
    # A popped entry whose deadline passed is refused, not admitted.
    assert queue.pop(0.6, out) is None
    assert out[-1] is later and later.reason == "deadline"
    assert queue.next_expiry(0.6) is None


def test_parse_priority() -> None:
    assert parse_priority("critical") == CRITICAL
    assert parse_priority(b" Sheddable ") == SHEDDABLE
    assert parse_priority("default") == DEFAULT
    assert parse_priority("urgent") is None
    assert parse_priority(None) is None
