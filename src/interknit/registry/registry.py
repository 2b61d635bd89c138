"""The registry's IO shell: serialises writes, makes them durable, runs lease timers, wakes
watchers.

Every write is a small function over ``RegistryState``, applied on the event loop as it comes.
Its events queue for the store's thread (``committer.py``), which commits everything queued
since its last commit in one transaction; only then are the writes answered and the watchers
woken. Reads go to the in-memory state and never wait for the disk.

Two states. Writes are made on the *writer's* state (``_writer``), which runs ahead of the
disk by the commits in flight: a write must see the writes queued before it. Readers see
``state``, which holds only what is on the disk: it takes each commit's events when the commit
is done, in the same callback that answers its writes and tells DNS, the proxy and the
watchers. So an instance is never listed before it is durable, nor before the rest of the node
knows it, and a commit that fails changes nothing any reader has seen.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Protocol

from interknit.registry.committer import Committer, Pending, Waiter
from interknit.registry.fanout import Fanout, Listener, ResyncListener
from interknit.registry.metrics import RegistryMetrics
from interknit.registry.model import CheckStatus, Event, Instance, InstanceSpec
from interknit.registry.state import DEFAULT_HISTORY, RegistryError, RegistryState
from interknit.registry.store import Store, StoreError

log = logging.getLogger("interknit.registry")

# A write: given the writer's state and the time, change the state and return (result, events).
Op = Callable[[RegistryState, float], tuple[Any, list[Event]]]


def _settle(fut: asyncio.Future[None], error: BaseException | None) -> None:
    """The waiter of a write that a coroutine awaits."""
    if fut.done():
        return
    if error is None:
        fut.set_result(None)
    else:
        fut.set_exception(error)


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

    def owns(self, service: str, instance_id: str) -> bool:
        """True if this node runs the instance's active checks (on etcd each instance has one
        owning node; the embedded store's one node owns every instance)."""
        ...

    def cluster(self) -> dict[str, Any] | None:
        """The nodes sharing this registry, for the status page; None: this node alone on its
        own store."""
        ...

    def changed_since(self, service: str | None, revision: int) -> bool: ...

    async def wait_for_change(self, service: str | None, revision: int, timeout: float) -> bool: ...


class Unavailable(RegistryError):
    """The store cannot take writes now; nothing was changed."""

    status = 503
    outcome = "none"


class OutcomeUnknown(Unavailable):
    """The store did not confirm the write in time, and may have applied it (or may yet: on
    etcd, a member that got the request can still propose it). A registration, heartbeat or
    health change is safe to send again: the same write again changes nothing."""

    outcome = "unknown"


class Registry:
    def __init__(
        self,
        store: Store,
        *,
        history_size: int = DEFAULT_HISTORY,
        clock: Callable[[], float] = time.time,
        metrics: RegistryMetrics | None = None,
    ) -> None:
        # What readers see: what is on the disk.
        self.state = RegistryState(history_size)
        # What writes are made on: ``state`` plus the commits in flight (no history needed).
        self._writer = RegistryState(1)
        self._store = store
        self._clock = clock
        self._metrics = metrics
        # Loading and closing the store; commits run on the committer's own thread.
        self._executor = ThreadPoolExecutor(1, thread_name_prefix="interknit-store-io")
        self._committer: Committer | None = None
        # Writes queued for the disk and not yet answered: while there are any, a write that
        # changes nothing waits for them too.
        self._unanswered = 0
        self._reloading = False
        self._loop: asyncio.AbstractEventLoop = None  # type: ignore[assignment]
        self._tasks: list[asyncio.Task[None]] = []
        self._fanout = Fanout(metrics)
        self._answered_hooks: list[Callable[[], None]] = []
        self._timer_wake: asyncio.Event | None = None
        self._timer_due = 0.0  # when the timers task wakes by itself
        self._closed = False

    @property
    def stale(self) -> bool:
        """The embedded store is always current; the etcd backend overrides this."""
        return False

    # ------------------------------------------------------------------ lifecycle

    async def start(self) -> None:
        loop = self._loop = asyncio.get_running_loop()
        snapshot = await loop.run_in_executor(self._executor, self._store.load)
        now = self._clock()
        self.state.restore(snapshot.instances, snapshot.revision, now)
        self._writer.restore(snapshot.instances, snapshot.revision, now)
        self._committer = Committer(self._store, loop, self._committed)
        self._committer.start()
        self._timer_wake = asyncio.Event()
        self._tasks = [asyncio.create_task(self._timers(), name="registry-timers")]
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
        for task in self._tasks:
            task.cancel()
        for task in self._tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await task
        loop = asyncio.get_running_loop()
        if self._committer is not None:
            # Commits what is queued; the answers arrive as callbacks on this loop.
            self._committer.stop()
            await loop.run_in_executor(self._executor, self._committer.join)
            self._committer.close()
        self._fanout.wake_waiters()
        await loop.run_in_executor(self._executor, self._store.close)
        self._executor.shutdown(wait=True)

    def subscribe(self, listener: Listener, on_resync: ResyncListener | None = None) -> None:
        """Call ``listener`` with every batch of committed events (in-process consumers), and
        ``on_resync`` whenever the whole state was replaced."""
        self._fanout.subscribe(listener, on_resync)

    # ------------------------------------------------------------------ writes
    #
    # A write changes the in-memory state at once, on the event loop, and then waits until the
    # commit that carries its events is on the disk. The ``*_nowait`` forms return the result
    # and whether ``then`` was queued to be called once the commit is on the disk (False:
    # nothing to wait for, answer at once), so that the API's hot path answers from a callback
    # instead of a task per request.

    def register_nowait(
        self, service: str, instance_id: str, spec: InstanceSpec, then: Waiter
    ) -> tuple[tuple[Instance, int], bool]:
        return self.write(self._register_op(service, instance_id, spec), then)

    def deregister_nowait(self, service: str, instance_id: str, then: Waiter) -> tuple[int, bool]:
        return self.write(self._deregister_op(service, instance_id), then)

    def heartbeat_nowait(
        self, service: str, instance_id: str, then: Waiter
    ) -> tuple[tuple[Instance, int], bool]:
        return self.write(self._heartbeat_op(service, instance_id), then)

    def on_answered(self, hook: Callable[[], None]) -> None:
        """Call ``hook`` on the loop after the waiters of each commit have been told: the fast
        path sends the answers they queued then, together, instead of a turn later."""
        self._answered_hooks.append(hook)

    async def register(
        self, service: str, instance_id: str, spec: InstanceSpec
    ) -> tuple[Instance, int]:
        result: tuple[Instance, int] = await self.submit(
            self._register_op(service, instance_id, spec)
        )
        return result

    async def deregister(self, service: str, instance_id: str) -> int:
        result: int = await self.submit(self._deregister_op(service, instance_id))
        return result

    async def heartbeat(self, service: str, instance_id: str) -> tuple[Instance, int]:
        result: tuple[Instance, int] = await self.submit(self._heartbeat_op(service, instance_id))
        return result

    @staticmethod
    def _register_op(service: str, instance_id: str, spec: InstanceSpec) -> Op:
        def op(state: RegistryState, now: float) -> tuple[Any, list[Event]]:
            events = state.register(service, instance_id, spec, now)
            return _current(state, service, instance_id), events

        return op

    @staticmethod
    def _deregister_op(service: str, instance_id: str) -> Op:
        def op(state: RegistryState, now: float) -> tuple[Any, list[Event]]:
            events = state.deregister(service, instance_id)
            return state.revision, events

        return op

    @staticmethod
    def _heartbeat_op(service: str, instance_id: str) -> Op:
        def op(state: RegistryState, now: float) -> tuple[Any, list[Event]]:
            events = state.heartbeat(service, instance_id, now)
            return _current(state, service, instance_id), events

        return op

    async def set_operator(
        self, service: str, instance_id: str, status: str
    ) -> tuple[Instance, int]:
        def op(state: RegistryState, now: float) -> tuple[Any, list[Event]]:
            events = state.set_operator(service, instance_id, status)
            return _current(state, service, instance_id), events

        result: tuple[Instance, int] = await self.submit(op)
        return result

    async def set_check_status(
        self, service: str, instance_id: str, status: CheckStatus, output: str
    ) -> None:
        def op(state: RegistryState, now: float) -> tuple[Any, list[Event]]:
            return None, state.set_check_status(service, instance_id, status, output, now)

        await self.submit(op)

    async def set_ejected(self, service: str, instance_id: str, until: float | None) -> None:
        def op(state: RegistryState, now: float) -> tuple[Any, list[Event]]:
            return None, state.set_ejected(service, instance_id, until)

        await self.submit(op)

    async def submit(self, op: Op) -> Any:
        """``write`` for a coroutine: apply ``op`` and wait until it is on the disk. One op is
        one commit however many events it makes, so no reader sees the state between them."""
        fut: asyncio.Future[None] = self._loop.create_future()
        result, queued = self.write(op, functools.partial(_settle, fut))
        if queued:
            await fut
        return result

    def write(self, op: Op, then: Waiter) -> tuple[Any, bool]:
        """Apply ``op`` to the state now; return its result and whether ``then`` waits for the
        commit that makes it durable (else there is nothing to wait for). A write that changed
        nothing still waits for the commits before it: it may repeat a write that is not on the
        disk yet, and must not be answered first."""
        committer = self._committer
        if self._closed or committer is None:
            raise Unavailable("the registry is shutting down")
        if self._reloading:
            raise Unavailable("the registry is reloading its store after a failed commit")
        # A RegistryError raised here has changed nothing: the state checks before it writes.
        result, events = op(self._writer, self._clock())
        if not events and not self._unanswered:
            return result, False
        self._unanswered += 1
        committer.add(events, then)
        return result, True

    def _committed(self, pending: Pending, error: BaseException | None) -> None:
        """A batch came back from the committer (on the event loop)."""
        self._unanswered -= len(pending.waiters)
        if error is None:
            # What readers see moves to what is on the disk now. Then answer, then tell the
            # watchers, DNS and the proxy: nothing else runs on the loop in between, so no one
            # can see the answer before the rest know, and the answers do not wait for the
            # listeners (about 40 us a commit of sixteen).
            self.state.take_committed(pending.events)
            self._tell(pending.waiters, None)
            if pending.events:
                if self._metrics is not None:
                    self._metrics.commits.inc()
                    self._metrics.committed_events.inc(len(pending.events))
                self._publish(pending.events)
            return
        log.error(
            "store commit failed",
            extra={"event": "store.error", "error": str(error)},
            exc_info=(type(error), error, error.__traceback__)
            if not isinstance(error, StoreError)
            else None,
        )
        # Writes queued behind this batch rest on it: they fail with it, and no write is
        # taken until memory matches the store again.
        assert self._committer is not None
        later = self._committer.drop()
        self._unanswered -= len(later.waiters)
        failure = Unavailable(f"the store could not take the write: {error}")
        self._tell([*pending.waiters, *later.waiters], failure)
        self._reloading = True
        self._tasks.append(self._loop.create_task(self._reload(), name="registry-reload"))

    def _tell(self, waiters: list[Waiter], error: BaseException | None) -> None:
        for waiter in waiters:
            try:
                waiter(error)
            except Exception:  # one broken answer must not keep the others waiting
                log.exception("answering a committed write failed")
        for hook in self._answered_hooks:
            try:
                hook()
            except Exception:
                log.exception("after-commit hook failed")

    async def _reload(self) -> None:
        """Undo in the writer's state what the store refused. Readers never saw it; they are
        told to rebuild only if the disk turns out to hold something else than they saw."""
        try:
            snapshot = await self._loop.run_in_executor(self._executor, self._store.load)
        except StoreError:
            log.exception("store reload failed; writes stay refused")
            return
        now = self._clock()
        self._writer.restore(snapshot.instances, snapshot.revision, now)
        self._reloading = False
        assert self._committer is not None
        self._committer.resume()
        if snapshot.revision != self.state.revision:
            self.state.restore(snapshot.instances, snapshot.revision, now)
            self._fanout.resynced()

    def _publish(self, events: list[Event]) -> None:
        self._fanout.publish(events)
        # Wake the timers only for a deadline sooner than the one they sleep until: most
        # writes push a lease further out, and a wakeup per commit is wasted work.
        if self._timer_wake is not None:
            deadline = self._writer.next_deadline()
            if deadline is not None and deadline < self._timer_due:
                self._timer_wake.set()

    # ------------------------------------------------------------------ timers

    async def _timers(self) -> None:
        assert self._timer_wake is not None
        while True:
            deadline = self._writer.next_deadline()
            # One reading of the clock: with two, the wake-up time came out a little after the
            # deadline, so every commit saw that same deadline as sooner and woke the timers.
            now = self._clock()
            wake_at = now + 3600.0 if deadline is None else min(max(deadline, now), now + 3600.0)
            delay = wake_at - now
            self._timer_due = wake_at
            self._timer_wake.clear()
            # asyncio.timeout, not wait_for: in 3.11 wait_for returns a wake-up that lands in
            # the same turn as a cancel and swallows the cancel, and close() then hung.
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(delay):
                    await self._timer_wake.wait()
            due = self._writer.next_deadline()
            if due is not None and due <= self._clock():
                try:
                    await self.submit(lambda state, now: (None, state.tick(now)))
                except RegistryError:
                    await asyncio.sleep(1.0)

    # ------------------------------------------------------------------ watching

    def wake_all(self) -> None:
        """Answer every blocking query now and every later one at once (the node is stopping:
        a graceful stop must not wait out their ``wait``)."""
        self._fanout.wake_all()

    def owns(self, service: str, instance_id: str) -> bool:
        """One node, one store: this node checks every instance."""
        return True

    def cluster(self) -> dict[str, Any] | None:
        return None

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


def _current(state: RegistryState, service: str, instance_id: str) -> tuple[Instance, int]:
    inst = state.get(service, instance_id)
    assert inst is not None
    return inst, state.revision
