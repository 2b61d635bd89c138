from __future__ import annotations

from interknit.demand.overload import OverloadMonitor


def feed(monitor: OverloadMonitor, start: float, seconds: float, rate: int, shed: float) -> float:
    """``rate`` outcomes a second for ``seconds``, a share ``shed`` of them refused."""
    n = int(seconds * rate)
    every = round(1 / shed) if shed else 0
    for i in range(n):
        monitor.record(start + i / rate, bool(every) and i % every == 0)
    return start + seconds


def test_turns_overloaded_above_threshold() -> None:
    monitor = OverloadMonitor(threshold=0.1, window=5.0, hold=5.0)
    t = feed(monitor, 0.0, 5.0, 100, 0.05)
    assert not monitor.overloaded(t)
    t = feed(monitor, t, 5.0, 100, 0.5)
    assert monitor.overloaded(t)
    ratio, total = monitor.shed_ratio(t)
    assert ratio > 0.4 and total >= 400


def test_few_requests_do_not_flip_it() -> None:
    monitor = OverloadMonitor(min_requests=20)
    for i in range(10):
        monitor.record(i * 0.1, True)
    assert not monitor.overloaded(1.0)


def test_recovers_with_hysteresis() -> None:
    monitor = OverloadMonitor(threshold=0.1, window=2.0, hold=3.0, recover_ratio=0.5)
    t = feed(monitor, 0.0, 2.0, 100, 0.5)
    assert monitor.overloaded(t)
    # Below the threshold but above half of it: stays overloaded however long it lasts.
    t = feed(monitor, t, 10.0, 100, 0.0833)
    assert monitor.overloaded(t)
    # Calm (no shedding): still overloaded until the hold time has passed...
    t = feed(monitor, t, 2.5, 100, 0.0)
    assert monitor.overloaded(t)
    t = feed(monitor, t, 2.0, 100, 0.0)
    assert monitor.overloaded(t) is False
    # A blip of shedding during the hold restarts it.
    t = feed(monitor, t, 2.0, 100, 0.5)
    assert monitor.overloaded(t)
    t = feed(monitor, t, 3.0, 100, 0.0)
    t = feed(monitor, t, 0.5, 100, 0.2)
    assert monitor.overloaded(t)


def test_old_slices_leave_the_window() -> None:
    monitor = OverloadMonitor(window=1.0, buckets=4)
    for i in range(50):
        monitor.record(i * 0.01, True)
    assert monitor.shed_ratio(0.5)[1] == 50
    assert monitor.shed_ratio(10.0) == (0.0, 0)
