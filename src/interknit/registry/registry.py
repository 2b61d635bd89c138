"""The registry's IO shell: serialises writes, makes them durable, runs lease timers, wakes
watchers.

Every write is a small function over ``RegistryState``. Writes queue up; one writer task applies
all queued writes to the state, commits their events to the store in one transaction on the
store's own thread, and only then answers the callers and wakes watchers. Reads go to the
in-memory state and never wait for the disk.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Protocol, TypeVar

from interknit.registry.fanout import Fanout, Listener, ResyncListener
from interknit.registry.metrics import RegistryMetrics
from interknit.registry.model import CheckStatus, Event, Instance, InstanceSpec
from interknit.registry.state import DEFAULT_HISTORY, RegistryError, RegistryState
from interknit.registry.store import Store, StoreError

log = logging.getLogger("interknit.registry")

T = TypeVar("T")
# A write: given the time, change the state and return (result, events).
Op = Callable[[float], tuple[Any, list[Event]]]


class RegistryBackend(Protocol):
    """What the API, DNS, health checks and the proxy use of a registry. The embedded
    ``Registry`` below and ``etcd.EtcdRegistry`` both have it."""

    @property
    def state(self) -> RegistryState: ...

    @property
    def stale(self) -> bool: ...

    async def start(self) -> None: ...

    async def close(self) -> None: ...

    def subscribe(self, listener: Listener, on_resync: ResyncListener | None = None) -> None: ...

    async def register(
        self, service: str, instance_id: str, spec: InstanceSpec
    ) -> tuple[Instance, int]: ...

    async def deregister(self, service: str, instance_id: str) -> int: ...

    async def heartbeat(self, service: str, instance_id: str) -> tuple[Instance, int]: ...

    async def set_operator(
        self, service: str, instance_id: str, status: str
    ) -> tuple[Instance, int]: ...

    async def set_check_status(
        self, service: str, instance_id: str, status: CheckStatus, output: str
    ) -> None: ...

    async def set_ejected(self, service: str, instance_id: str, until: float | None) -> None: ...

    def wake_all(self) -> None: ...

    def changed_since(self, service: str | None, revision: int) -> bool: ...

    async def wait_for_change(self, service: str | None, revision: int, timeout: float) -> bool: ...


class Unavailable(RegistryError):
    """The store cannot take writes now; nothing was changed."""

    status = 503


class Registry:
    def __init__(
        self,
        store: Store,
        *,
        history_size: int = DEFAULT_HISTORY,
        clock: Callable[[], float] = time.time,
        metrics: RegistryMetrics | None = None,
    ) -> None:
        self.state = RegistryState(history_size)
        self._store = store
        self._clock = clock
        self._metrics = metrics
        self._executor = ThreadPoolExecutor(1, thread_name_prefix="interknit-store")
        self._pending: list[tuple[Op, asyncio.Future[Any]]] = []
        self._wake: asyncio.Event | None = None
        self._tasks: list[asyncio.Task[None]] = []
        self._fanout = Fanout(metrics)
        self._timer_wake: asyncio.Event | None = None
        self._closed = False

    @property
    def stale(self) -> bool:
        """The embedded store is always current; the etcd backend overrides this."""
        return False

    # ------------------------------------------------------------------ lifecycle

    async def start(self) -> None:
        loop = asyncio.get_running_loop()
        snapshot = await loop.run_in_executor(self._executor, self._store.load)
        self.state.restore(snapshot.instances, snapshot.revision, self._clock())
        self._wake = asyncio.Event()
        self._timer_wake = asyncio.Event()
        self._tasks = [
            asyncio.create_task(self._writer(), name="registry-writer"),
            asyncio.create_task(self._timers(), name="registry-timers"),
        ]
        log.info(
            "registry loaded",
            extra={
                "event": "registry.loaded",
                "instances": len(snapshot.instances),
                "revision": snapshot.revision,
            },
        )

    async def close(self) -> None:
        """Finish queued writes, stop the timers, close the store."""
        if self._closed:
            return
        self._closed = True
        # Let the writer drain what is queued before it is cancelled.
        for _ in range(100):
            if not self._pending:
                break
            await asyncio.sleep(0.01)
        for task in self._tasks:
            task.cancel()
        for task in self._tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await task
        self._fanout.wake_waiters()
        loop = asyncio.get_running_loop()
        await loop.run_in_executor(self._executor, self._store.close)
        self._executor.shutdown(wait=True)

    def subscribe(self, listener: Listener, on_resync: ResyncListener | None = None) -> None:
        """Call ``listener`` with every batch of committed events (in-process consumers), and
        ``on_resync`` whenever the whole state was replaced."""
        self._fanout.subscribe(listener, on_resync)

    # ------------------------------------------------------------------ writes

    async def register(
        self, service: str, instance_id: str, spec: InstanceSpec
    ) -> tuple[Instance, int]:
        def op(now: float) -> tuple[Any, list[Event]]:
            events = self.state.register(service, instance_id, spec, now)
            return self._current(service, instance_id), events

        result: tuple[Instance, int] = await self._submit(op)
        return result

    async def deregister(self, service: str, instance_id: str) -> int:
        def op(now: float) -> tuple[Any, list[Event]]:
            events = self.state.deregister(service, instance_id)
            return self.state.revision, events

        revision: int = await self._submit(op)
        return revision

    async def heartbeat(self, service: str, instance_id: str) -> tuple[Instance, int]:
        def op(now: float) -> tuple[Any, list[Event]]:
            events = self.state.heartbeat(service, instance_id, now)
            return self._current(service, instance_id), events

        result: tuple[Instance, int] = await self._submit(op)
        return result

    async def set_operator(
        self, service: str, instance_id: str, status: str
    ) -> tuple[Instance, int]:
        def op(now: float) -> tuple[Any, list[Event]]:
            events = self.state.set_operator(service, instance_id, status)
            return self._current(service, instance_id), events

        result: tuple[Instance, int] = await self._submit(op)
        return result

    async def set_check_status(
        self, service: str, instance_id: str, status: CheckStatus, output: str
    ) -> None:
        def op(now: float) -> tuple[Any, list[Event]]:
            return None, self.state.set_check_status(service, instance_id, status, output, now)

        await self._submit(op)

    async def set_ejected(self, service: str, instance_id: str, until: float | None) -> None:
        def op(now: float) -> tuple[Any, list[Event]]:
            return None, self.state.set_ejected(service, instance_id, until)

        await self._submit(op)

    def _current(self, service: str, instance_id: str) -> tuple[Instance, int]:
        inst = self.state.get(service, instance_id)
        assert inst is not None
        return inst, self.state.revision

    async def _submit(self, op: Op) -> Any:
        if self._closed or self._wake is None:
            raise Unavailable("the registry is shutting down")
        fut: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        self._pending.append((op, fut))
        self._wake.set()
        return await fut

    async def _writer(self) -> None:
        assert self._wake is not None
        loop = asyncio.get_running_loop()
        while True:
            await self._wake.wait()
            self._wake.clear()
            while self._pending:
                batch, self._pending = self._pending, []
                await self._apply(loop, batch)

    async def _apply(
        self, loop: asyncio.AbstractEventLoop, batch: list[tuple[Op, asyncio.Future[Any]]]
    ) -> None:
        now = self._clock()
        events: list[Event] = []
        outcomes: list[tuple[asyncio.Future[Any], Any, BaseException | None]] = []
        for op, fut in batch:
            try:
                result, evs = op(now)
            except RegistryError as exc:
                outcomes.append((fut, None, exc))
                continue
            events.extend(evs)
            outcomes.append((fut, result, None))
        if events:
            try:
                await loop.run_in_executor(
                    self._executor, self._store.commit, events, self.state.revision
                )
            except StoreError as exc:
                log.error("store commit failed", extra={"event": "store.error", "error": str(exc)})
                await self._reload(loop)
                failure = Unavailable(f"the store could not take the write: {exc}")
                for fut, _, _ in outcomes:
                    if not fut.done():
                        fut.set_exception(failure)
                return
            if self._metrics is not None:
                self._metrics.commits.inc()
                self._metrics.committed_events.inc(len(events))
            self._publish(events)
        for fut, result, error in outcomes:
            if fut.done():
                continue
            if error is not None:
                fut.set_exception(error)
            else:
                fut.set_result(result)

    async def _reload(self, loop: asyncio.AbstractEventLoop) -> None:
        """Undo in memory what the store refused, so memory never runs ahead of the disk."""
        try:
            snapshot = await loop.run_in_executor(self._executor, self._store.load)
        except StoreError:
            log.exception("store reload failed")
            return
        self.state.restore(snapshot.instances, snapshot.revision, self._clock())
        self._fanout.resynced()

    def _publish(self, events: list[Event]) -> None:
        self._fanout.publish(events)
        if self._timer_wake is not None:
            self._timer_wake.set()

    # ------------------------------------------------------------------ timers

    async def _timers(self) -> None:
        assert self._timer_wake is not None
        while True:
            deadline = self.state.next_deadline()
            delay = 3600.0 if deadline is None else max(0.0, deadline - self._clock())
            self._timer_wake.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._timer_wake.wait(), timeout=min(delay, 3600.0))
            due = self.state.next_deadline()
            if due is not None and due <= self._clock():
                try:
                    await self._submit(lambda now: (None, self.state.tick(now)))
                except RegistryError:
                    await asyncio.sleep(1.0)

    # ------------------------------------------------------------------ watching

    def wake_all(self) -> None:
        """Answer every blocking query now and every later one at once (the node is stopping:
        a graceful stop must not wait out their ``wait``)."""
        self._fanout.wake_all()

    def changed_since(self, service: str | None, revision: int) -> bool:
        if service is None:
            return self.state.revision > revision
        return self.state.service_revision(service) > revision

    async def wait_for_change(self, service: str | None, revision: int, timeout: float) -> bool:
        """Wait until ``service`` (or anything, for None) changes after ``revision``.

        Only changes of that service wake the waiter: a watcher of one service is not woken by
        the churn of all the others.
        """
        return await self._fanout.wait(
            service, lambda: self.changed_since(service, revision), timeout
        )
