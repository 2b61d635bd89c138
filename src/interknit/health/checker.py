"""The active health checker: runs every instance's HTTP or TCP check on time, reports changes.

One scheduler task keeps a single heap of due times for every checked instance, however many
there are; it wakes for the earliest, starts that check as a task once one of
``max_in_flight`` slots is free, and sleeps again. A task per instance sleeping its own
interval would cost thousands of timers and tasks and drift with every slow check.

Timing. An instance's checks sit on a grid of its ``interval``: the first at a random point of
the first interval (as Consul staggers them, so instances registered together are not checked
together), each next one an interval after the previous one's slot, not after it finished, so
slow checks do not make the schedule drift. Each check then starts up to 10% of the interval
late at random, so that instances with one interval do not stay in lock-step. A check still
running when its next slot comes is not doubled: the next check waits for it, and slots that
passed by a whole interval are skipped. *Lag* is how late a check starts against its jittered
due time; it grows when the node is overloaded or every slot is busy, and is what the node's
capacity is judged by.

Results go through each instance's ``CheckMachine``; only a change of status (or a status the
sink has not accepted yet) calls the sink, so a fleet of steady instances writes nothing.

Robustness. Nothing about one instance may stop its checks or anyone else's: an interval
outside ``MIN_INTERVAL``..``MAX_INTERVAL`` (the API refuses such checks, but a ``Check`` can be
built by hand or read from an older store) is scheduled as the nearest bound, and a failure
while handling a result is logged and the instance checked again at its next slot.

Bounds. The node checks whatever API clients register, so two bounds hold whatever they ask
(``[health]``, ``config.py``): no instance is checked more often than ``min_interval`` (the
API refuses shorter intervals; one stored before, or by another node, is scheduled at the
floor), and no more than ``max_per_second`` checks start a second in all (``budget.py``):
a check past the cap starts late, is counted, and the first of them in a minute is logged.
"""

from __future__ import annotations

import asyncio
import heapq
import logging
import math
import random
import time
from collections import deque
from collections.abc import Awaitable, Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from prometheus_client import CollectorRegistry, Counter, Histogram
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from interknit.health.budget import CheckBudget
from interknit.health.machine import CheckMachine
from interknit.health.probes import ProbeResult, http_probe, http_request, tcp_probe
from interknit.logs import LogThrottle, iso_time
from interknit.registry.model import Check, CheckStatus, Instance
from interknit.registry.state import NEVER_CHECKED_OUTPUT

if TYPE_CHECKING:
    from interknit.tls.client import ClientTls

logger = logging.getLogger("interknit.health")

Sink = Callable[[str, str, CheckStatus, str], Awaitable[None]]
Key = tuple[str, str]

DEFAULT_MAX_IN_FLIGHT = 256
JITTER = 0.1  # of the interval
MIN_INTERVAL = 0.01  # the API's floor (registry/schema.py); below it a check is a busy loop
MAX_INTERVAL = 7 * 24 * 3600.0
LAG_WINDOW = 10_000  # recent lags kept for lag_stats()
# What the registry writes as the output of an instance whose check has not run yet
# (registry/state.py); such an instance passes on its first successful check.
RESULTS: tuple[CheckStatus, ...] = ("passing", "warning", "critical")

_LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0)
_LAG_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5)


def schedule_interval(check: Check) -> float:
    """The check's interval, within ``MIN_INTERVAL``..``MAX_INTERVAL`` (NaN: the minimum)."""
    interval = check.interval
    if not interval >= MIN_INTERVAL:
        return MIN_INTERVAL
    return min(interval, MAX_INTERVAL)


def next_slot(previous: float, interval: float, now: float) -> float:
    """The slot after ``previous`` on its grid; slots already passed by a whole interval are
    skipped, so an instance that fell behind runs once now rather than catching up."""
    if not interval >= MIN_INTERVAL:
        interval = MIN_INTERVAL
    due = previous + interval
    behind = now - due
    if behind >= interval:
        due += math.floor(behind / interval) * interval
    return due


def first_slot(now: float, interval: float, rng: random.Random) -> float:
    return now + rng.uniform(0.0, interval)


@dataclass(frozen=True, slots=True)
class LagStats:
    """Lag of recent check starts behind their due times, in seconds."""

    count: int
    mean: float
    p50: float
    p99: float
    max: float


@dataclass(frozen=True, slots=True)
class TargetStats:
    """What the checker knows about one instance's checks."""

    service: str
    id: str
    status: CheckStatus
    progress: str  # e.g. "passing, 1/3 towards critical"
    checks: int
    last_result: CheckStatus | None
    last_output: str
    last_latency: float | None
    last_lag: float | None
    max_lag: float


class _Target:
    """One checked instance: where to probe, its machine, and its place in the schedule."""

    __slots__ = (
        "address",
        "check",
        "checks",
        "generation",
        "id",
        "key",
        "last_checked",
        "last_lag",
        "last_latency",
        "last_output",
        "last_result",
        "latency",
        "machine",
        "max_lag",
        "nominal",
        "port",
        "reported",
        "request",
        "results",
        "service",
        "unchecked",
    )

    def __init__(self, instance: Instance, check: Check, machine: CheckMachine) -> None:
        self.key: Key = instance.key
        self.service = instance.service
        self.id = instance.id
        self.check = check
        self.machine = machine
        # What the registry holds, as far as we know; a result that leaves the machine at
        # this status is not reported.
        self.reported: CheckStatus = instance.check_status
        # The registry still says no check has run: the first result is written whatever it
        # is, so that an instance that never passed shows why at once.
        self.unchecked = instance.output == NEVER_CHECKED_OUTPUT
        self.generation = 0
        self.nominal = 0.0  # the current slot on the grid, before jitter
        self.checks = 0
        self.last_result: CheckStatus | None = None
        self.last_output = ""
        self.last_latency: float | None = None
        self.last_lag: float | None = None
        self.last_checked: float | None = None  # wall-clock time of the last result
        self.max_lag = 0.0
        # Metric children, looked up once rather than per check.
        self.latency: Any = None
        self.results: dict[CheckStatus, int] = {}
        self.address = ""
        self.port = 0
        self.request = b""
        self.set_address(instance.address, instance.port)

    def set_address(self, address: str, port: int) -> None:
        self.address = address
        self.port = port
        if self.check.http is not None:
            self.request = http_request(address, port, self.check.http)


class HealthMetrics:
    """Check metrics. Per-instance series are one line each (a result counter per result seen,
    the last latency) and are read at scrape time from the targets; the latency histogram is
    per service. A histogram per instance made /metrics megabytes long at thousands of
    instances, and producing it stalled the event loop long enough to delay checks."""

    def __init__(self, registry: CollectorRegistry) -> None:
        self.targets: Callable[[], Iterable[_Target]] = tuple
        self.check_seconds = Histogram(
            "interknit_health_check_seconds",
            "Active check latency by service, from connect to verdict.",
            ["service"],
            buckets=_LATENCY_BUCKETS,
            registry=registry,
        )
        self.transitions = Counter(
            "interknit_health_transitions",
            "Check status changes decided by the active checker, by service and new status.",
            ["service", "to"],
            registry=registry,
        )
        self.lag = Histogram(
            "interknit_health_check_lag_seconds",
            "How late checks start against their due time (scheduler or concurrency bound).",
            buckets=_LAG_BUCKETS,
            registry=registry,
        )
        self.throttled = Counter(
            "interknit_health_checks_throttled",
            "Checks that started late because the node was at [health] max_checks_per_second.",
            registry=registry,
        )
        registry.register(_TargetCollector(lambda: self.targets()))

    def bind(self, target: _Target) -> None:
        target.latency = self.check_seconds.labels(target.service)
        target.results = dict.fromkeys(RESULTS, 0)

    def unbind(self, target: _Target) -> None:
        """Nothing to drop: a removed target is no longer among those collected."""


class _TargetCollector(Collector):
    def __init__(self, targets: Callable[[], Iterable[_Target]]) -> None:
        self._targets = targets

    def collect(self) -> Iterator[Metric]:
        checks = CounterMetricFamily(
            "interknit_health_checks",
            "Active check results, by instance and result (passing, warning, critical).",
            labels=["service", "instance", "result"],
        )
        last = GaugeMetricFamily(
            "interknit_health_check_last_seconds",
            "Latency of the instance's last active check.",
            labels=["service", "instance"],
        )
        for target in list(self._targets()):
            for result, count in target.results.items():
                if count:
                    checks.add_metric([target.service, target.id, result], count)
            if target.last_latency is not None:
                last.add_metric([target.service, target.id], target.last_latency)
        yield checks
        yield last


class HealthChecker:
    """Runs active checks for the instances it is given and reports status changes to a sink.

    ``sink(service, id, status, output)`` is awaited only when an instance's check status
    changes; it is normally the registry's ``set_check_status``. A sink that raises is logged
    and the change is offered again after the next check.
    """

    def __init__(
        self,
        sink: Sink,
        registry: CollectorRegistry | None = None,
        max_in_flight: int = DEFAULT_MAX_IN_FLIGHT,
        rng: random.Random | None = None,
        service_tls: Mapping[str, ClientTls] | None = None,
        *,
        min_interval: float = 0.0,
        max_per_second: float | None = None,
    ) -> None:
        if max_in_flight < 1:
            raise ValueError("max_in_flight must be at least 1")
        self.min_interval = min_interval
        self.budget = None if max_per_second is None else CheckBudget(max_per_second)
        self._throttled_seq = -1  # the heap entry last counted as throttled
        self._throttle_log = LogThrottle(every=60.0, burst=1)
        # Global
        self._sink = sink
        # Services whose instances speak TLS ([[services]] upstream_tls): HTTP checks in https.
        self.service_tls = dict(service_tls or {})
        self._rng = rng if rng is not None else random.Random()
        self.metrics = HealthMetrics(registry if registry is not None else CollectorRegistry())
        self.max_in_flight = max_in_flight
        self._slots = asyncio.Semaphore(max_in_flight)
        self._in_flight = 0
        # Targets and their schedule: heap of (due, seq, target, generation); an entry whose
        # generation is not the target's current one is stale and skipped.
        self._targets: dict[Key, _Target] = {}
        self.metrics.targets = self._targets.values
        self._heap: list[tuple[float, int, _Target, int]] = []
        self._seq = 0
        # Scheduler
        self._runner: asyncio.Task[None] | None = None
        self._tasks: set[asyncio.Task[None]] = set()
        self._waiter: asyncio.Future[None] | None = None
        self._waiting_until = math.inf
        self._lags: deque[float] = deque(maxlen=LAG_WINDOW)

    # ------------------------------------------------------------------ lifecycle

    def start(self) -> None:
        """Start the scheduler on the running loop (targets may be added before or after)."""
        if self._runner is None or self._runner.done():
            self._runner = asyncio.get_running_loop().create_task(
                self._run(), name="interknit-health-scheduler"
            )

    async def stop(self) -> None:
        """Stop scheduling and cancel checks in flight; no sink call happens after this."""
        tasks = list(self._tasks)
        if self._runner is not None:
            tasks.append(self._runner)
            self._runner = None
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        self._tasks.clear()

    # ------------------------------------------------------------------ targets

    def update(self, instance: Instance) -> None:
        """Add an instance or take its changes; instances without an active check are dropped.

        A known instance whose check is unchanged keeps its machine and its schedule (a new
        address is used from its next check); the status it carries is taken as what the
        registry holds. A new check, or a new instance, gets a machine started from the
        instance's status, so health survives a restart of the node.
        """
        check = instance.check
        if check is None or not check.active:
            self.remove(instance.service, instance.id)
            return
        target = self._targets.get(instance.key)
        if target is not None and target.check == check:
            if (target.address, target.port) != (instance.address, instance.port):
                target.set_address(instance.address, instance.port)
            target.reported = instance.check_status
            target.unchecked = instance.output == NEVER_CHECKED_OUTPUT
            return
        loop = asyncio.get_running_loop()
        now = loop.time()
        checked = not (
            instance.check_status == "critical" and instance.output == NEVER_CHECKED_OUTPUT
        )
        machine = CheckMachine(
            check.rise, check.fall, instance.check_status, checked=checked, since=now
        )
        fresh = _Target(instance, check, machine)
        if target is not None:
            fresh.generation = target.generation + 1
            self.metrics.unbind(target)
        self.metrics.bind(fresh)
        self._targets[fresh.key] = fresh
        fresh.nominal = first_slot(now, self._interval(check), self._rng)
        self._schedule(fresh)

    def remove(self, service: str, instance_id: str) -> None:
        target = self._targets.pop((service, instance_id), None)
        if target is not None:
            target.generation += 1  # a check in flight for it is discarded
            self.metrics.unbind(target)

    def sync(self, instances: Iterable[Instance]) -> None:
        """Make the checked set exactly ``instances`` (after a resync of the registry)."""
        seen: set[Key] = set()
        for instance in instances:
            seen.add(instance.key)
            self.update(instance)
        for key in [k for k in self._targets if k not in seen]:
            self.remove(*key)

    # ------------------------------------------------------------------ reads

    def __len__(self) -> int:
        return len(self._targets)

    def __contains__(self, key: object) -> bool:
        return key in self._targets

    @property
    def in_flight(self) -> int:
        return self._in_flight

    def status(self, service: str, instance_id: str) -> CheckStatus | None:
        target = self._targets.get((service, instance_id))
        return None if target is None else target.machine.status

    def target_stats(self, service: str, instance_id: str) -> TargetStats | None:
        t = self._targets.get((service, instance_id))
        if t is None:
            return None
        return TargetStats(
            service=t.service,
            id=t.id,
            status=t.machine.status,
            progress=t.machine.describe(),
            checks=t.checks,
            last_result=t.last_result,
            last_output=t.last_output,
            last_latency=t.last_latency,
            last_lag=t.last_lag,
            max_lag=t.max_lag,
        )

    def describe(self) -> list[dict[str, Any]]:
        """One row per checked instance for the status page: its last check (result, output,
        how long it took, when) and its status and how long it has held it (since this node
        started checking it)."""
        loop_now = asyncio.get_running_loop().time()
        wall_now = time.time()
        rows = []
        for t in sorted(self._targets.values(), key=lambda t: t.key):
            check = t.check
            since = wall_now - (loop_now - t.machine.since)
            rows.append(
                {
                    "service": t.service,
                    "id": t.id,
                    "check": f"http {check.http}" if check.http is not None else check.kind,
                    "status": t.machine.status,
                    "progress": t.machine.describe(),
                    "in_state_s": round(wall_now - since, 1),
                    "state_since": iso_time(since),
                    "last_result": t.last_result,
                    "last_output": t.last_output,
                    "last_duration_ms": None
                    if t.last_latency is None
                    else round(t.last_latency * 1000, 2),
                    "last_checked": None if t.last_checked is None else iso_time(t.last_checked),
                    "checks": t.checks,
                }
            )
        return rows

    def lag_stats(self) -> LagStats:
        """Lag over the last ``LAG_WINDOW`` check starts, across all instances."""
        lags = sorted(self._lags)
        if not lags:
            return LagStats(0, 0.0, 0.0, 0.0, 0.0)
        n = len(lags)
        return LagStats(
            count=n,
            mean=sum(lags) / n,
            p50=lags[min(n - 1, int(0.5 * n))],
            p99=lags[min(n - 1, int(0.99 * n))],
            max=lags[-1],
        )

    # ------------------------------------------------------------------ scheduler

    def _interval(self, check: Check) -> float:
        return max(schedule_interval(check), self.min_interval)

    def _schedule(self, target: _Target) -> None:
        interval = self._interval(target.check)
        due = target.nominal + self._rng.uniform(0.0, JITTER * interval)
        self._seq += 1
        heapq.heappush(self._heap, (due, self._seq, target, target.generation))
        waiter = self._waiter
        if waiter is not None and due < self._waiting_until and not waiter.done():
            waiter.set_result(None)

    def _current(self, target: _Target, generation: int) -> bool:
        return target.generation == generation and self._targets.get(target.key) is target

    async def _sleep(self, until: float) -> None:
        """Sleep until ``until`` or until something is scheduled earlier."""
        loop = asyncio.get_running_loop()
        waiter: asyncio.Future[None] = loop.create_future()
        self._waiter = waiter
        self._waiting_until = until
        handle = None if until == math.inf else loop.call_at(until, _wake, waiter)
        try:
            await waiter
        finally:
            self._waiter = None
            self._waiting_until = math.inf
            if handle is not None:
                handle.cancel()

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        heap = self._heap
        while True:
            if not heap:
                await self._sleep(math.inf)
                continue
            due, _, target, generation = heap[0]
            if not self._current(target, generation):
                heapq.heappop(heap)
                continue
            now = loop.time()
            if due > now:
                await self._sleep(due)
                continue
            if self.budget is not None:
                wait = self.budget.wait(now)
                if wait > 0.0:
                    self._throttled(heap[0][1], now)
                    await self._sleep(now + wait)
                    continue
            heapq.heappop(heap)
            await self._slots.acquire()
            if not self._current(target, generation):
                self._slots.release()
                continue
            self._record_lag(target, max(0.0, loop.time() - due))
            self._in_flight += 1
            task = loop.create_task(self._check(target, generation))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)

    async def _check(self, target: _Target, generation: int) -> None:
        try:
            result = await self._probe(target)
        finally:
            self._in_flight -= 1
            self._slots.release()
        if not self._current(target, generation):
            return  # removed or changed while the check ran
        try:
            await self._handle(target, result)
        except Exception:  # a bug, not a check result: the instance is still checked
            logger.exception(
                "could not handle the check result of %s/%s; checking it again at its next slot",
                target.service,
                target.id,
                extra={"service": target.service, "instance": target.id},
            )
        if self._current(target, generation):
            target.nominal = next_slot(
                target.nominal, self._interval(target.check), asyncio.get_running_loop().time()
            )
            self._schedule(target)

    async def _handle(self, target: _Target, result: ProbeResult) -> None:
        self._record(target, result)
        now = asyncio.get_running_loop().time()
        old = target.machine.status
        changed = target.machine.on_result(result.status, now)
        if changed is not None:
            self._log_transition(target, old, changed, result)
        status = target.machine.status
        if status != target.reported or target.unchecked:
            try:
                await self._sink(target.service, target.id, status, result.output)
            except Exception:
                logger.exception(
                    "could not report %s/%s as %s; will retry after the next check",
                    target.service,
                    target.id,
                    status,
                    extra={"service": target.service, "instance": target.id},
                )
            else:
                target.reported = status
                target.unchecked = False

    async def _probe(self, target: _Target) -> ProbeResult:
        check = target.check
        try:
            if check.http is not None:
                return await http_probe(
                    target.address,
                    target.port,
                    check.http,
                    check.timeout,
                    request=target.request,
                    tls=self.service_tls.get(target.service),
                )
            return await tcp_probe(target.address, target.port, check.timeout)
        except Exception as exc:  # a probe never raises; this is a bug, not a check result
            logger.exception("health probe failed for %s/%s", target.service, target.id)
            return ProbeResult("critical", f"probe error: {type(exc).__name__}: {exc}", 0.0)

    def _throttled(self, seq: int, now: float) -> None:
        if seq == self._throttled_seq:
            return  # the same check, still waiting
        self._throttled_seq = seq
        self.metrics.throttled.inc()
        held = self._throttle_log.allow(now)
        if held is not None:
            assert self.budget is not None
            logger.warning(
                "health checks are held to %g a second ([health] max_checks_per_second): "
                "checks start late",
                self.budget.rate,
                extra={"event": "health.throttled", "suppressed": held},
            )

    def _record_lag(self, target: _Target, lag: float) -> None:
        target.last_lag = lag
        if lag > target.max_lag:
            target.max_lag = lag
        self._lags.append(lag)
        self.metrics.lag.observe(lag)

    def _record(self, target: _Target, result: ProbeResult) -> None:
        target.checks += 1
        target.last_checked = time.time()
        target.last_result = result.status
        target.last_output = result.output
        target.last_latency = result.latency
        target.latency.observe(result.latency)
        target.results[result.status] += 1

    def _log_transition(
        self, target: _Target, old: CheckStatus, new: CheckStatus, result: ProbeResult
    ) -> None:
        self.metrics.transitions.labels(target.service, new).inc()
        level = logging.WARNING if new == "critical" else logging.INFO
        logger.log(
            level,
            "%s/%s is now %s: %s",
            target.service,
            target.id,
            new,
            result.output,
            extra={
                "event": "health.transition",
                "service": target.service,
                "instance": target.id,
                "health": new,
                "previous": old,
                "output": result.output,
                "latency": result.latency,
                "check": target.check.kind,
            },
        )


def _wake(waiter: asyncio.Future[None]) -> None:
    if not waiter.done():
        waiter.set_result(None)
