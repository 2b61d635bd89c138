"""Who hears of committed changes, the same for both registry backends.

In-process consumers (DNS, health checks, proxy pools) get every batch of events, or a resync
call when the whole copy was replaced; blocking queries and watches wait per service, so a
change of one service wakes only the waiters of that service (and those of every service).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Sequence

from interknit.registry.metrics import RegistryMetrics
from interknit.registry.model import Event

log = logging.getLogger("interknit.registry")

Listener = Callable[[Sequence[Event]], None]
# Called when the local copy was replaced wholesale (a reload, an etcd re-list): consumers
# rebuild from ``registry.state`` instead of applying events.
ResyncListener = Callable[[], None]

_ROUTINE = frozenset({"register", "update", "deregister"})


class Fanout:
    def __init__(self, metrics: RegistryMetrics | None = None) -> None:
        self.metrics = metrics
        self.listeners: list[Listener] = []
        self.resync_listeners: list[ResyncListener] = []
        # Waiters by service; the key None is for waiters on every service.
        self.waiters: dict[str | None, set[asyncio.Future[None]]] = {}
        self.waking = False

    def subscribe(self, listener: Listener, on_resync: ResyncListener | None = None) -> None:
        self.listeners.append(listener)
        if on_resync is not None:
            self.resync_listeners.append(on_resync)

    def publish(self, events: Sequence[Event]) -> None:
        if self.metrics is not None:
            self.metrics.observe(events)
        # Registrations are routine and can come thousands a second: debug. Health changes,
        # expiries and ejections are what an operator looks for: info.
        debug = log.isEnabledFor(logging.DEBUG)
        for event in events:
            routine = event.reason in _ROUTINE
            if routine and not debug:
                continue
            inst = event.instance
            log.log(
                logging.DEBUG if routine else logging.INFO,
                "registry change",
                extra={
                    "event": f"registry.{event.reason}",
                    "service": inst.service,
                    "instance": inst.id,
                    "health": inst.health,
                    "output": inst.output,
                    "revision": event.revision,
                },
            )
        for listener in self.listeners:
            try:
                listener(events)
            except Exception:
                log.exception("registry listener failed")
        touched = {event.instance.service for event in events}
        for key in (*touched, None):
            self._wake(self.waiters.pop(key, None))

    def resynced(self) -> None:
        for listener in self.resync_listeners:
            try:
                listener()
            except Exception:
                log.exception("registry resync listener failed")
        self.wake_waiters()

    def wake_waiters(self) -> None:
        for waiters in self.waiters.values():
            self._wake(waiters)
        self.waiters.clear()

    def wake_all(self) -> None:
        """Answer every waiter now and every later one at once (the node is stopping)."""
        self.waking = True
        self.wake_waiters()

    async def wait(self, service: str | None, changed: Callable[[], bool], timeout: float) -> bool:
        """Wait until ``changed()`` or ``timeout``; woken only by changes of ``service``."""
        if changed() or self.waking:
            return changed()
        fut: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self.waiters.setdefault(service, set()).add(fut)
        try:
            async with asyncio.timeout(timeout):
                await fut
        except TimeoutError:
            pass
        finally:
            waiters = self.waiters.get(service)
            if waiters is not None:
                waiters.discard(fut)
                if not waiters:
                    self.waiters.pop(service, None)
        return changed()

    @staticmethod
    def _wake(waiters: set[asyncio.Future[None]] | None) -> None:
        if waiters:
            for fut in waiters:
                if not fut.done():
                    fut.set_result(None)
