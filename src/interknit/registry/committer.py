"""The store's own thread: group commit without a round trip through the event loop.

Writes queue their rows here as the event loop applies them. The thread takes everything queued
since its last commit, commits it in one transaction, and hands the batch back to the loop to
be answered, then at once takes whatever queued meanwhile. When the loop had to hand each batch
to an executor and wait for it to come back before starting the next, every commit also paid a
thread wake-up and a loop wake-up (about 0.6 ms here, longer than the fsync itself).

If a commit fails, every batch queued behind it fails too (their writes rest on it), and the
thread takes nothing more until ``resume`` (the registry reloads the state from the store first).
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Callable

from interknit.registry.model import Event
from interknit.registry.store import Batch, Store


class Pending:
    """One batch: the rows to write (the last word per instance), the events to publish once
    they are on the disk, and the writes waiting for that."""

    __slots__ = ("events", "rows", "waiters")

    def __init__(self) -> None:
        # (service, id) -> the record to write, or None to delete the row.
        self.rows: dict[tuple[str, str], bytes | None] = {}
        self.events: list[Event] = []
        self.waiters: list[asyncio.Future[None]] = []

    def batch(self) -> Batch:
        upserts = [(k[0], k[1], rec) for k, rec in self.rows.items() if rec is not None]
        deletes = [k for k, rec in self.rows.items() if rec is None]
        return Batch(upserts, deletes, self.events[-1].revision)


Done = Callable[[Pending, BaseException | None], None]


class Committer:
    def __init__(self, store: Store, loop: asyncio.AbstractEventLoop, done: Done) -> None:
        self._store = store
        self._loop = loop
        self._done = done
        self._mutex = threading.Lock()
        # Held while the thread has nothing to do; released to wake it. A bare lock, not a
        # Condition: waking through Condition.notify cost several times more.
        self._wakeup = threading.Lock()
        self._wakeup.acquire()
        self._pending = Pending()
        self._waiting = False  # the thread sleeps on ``_wakeup``
        self._kick_scheduled = False
        self._failed = False
        self._stopping = False
        self._thread = threading.Thread(target=self._run, name="interknit-store", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def add(self, events: list[Event], waiter: asyncio.Future[None]) -> None:
        """Queue ``events`` (possibly none) and the write that waits for them (event loop)."""
        rows = {}
        for event in events:
            inst = event.instance
            rows[inst.key] = inst.to_record() if event.type == "put" else None
        with self._mutex:
            pending = self._pending
            pending.rows.update(rows)
            pending.events += events
            pending.waiters.append(waiter)
            waiting = self._waiting
        if waiting and not self._kick_scheduled:
            # Wake the thread once this turn of the loop is done: the writes of the same turn
            # go in one commit, and the switch to the woken thread does not cut into the turn.
            self._kick_scheduled = True
            self._loop.call_soon(self._kick)

    def _kick(self) -> None:
        self._kick_scheduled = False
        self._wake()

    def _wake(self) -> None:
        with self._mutex:
            if self._waiting:
                self._waiting = False
                self._wakeup.release()

    def drop(self) -> Pending:
        """Take what queued behind a failed commit, to fail it (event loop)."""
        with self._mutex:
            dropped, self._pending = self._pending, Pending()
        return dropped

    def resume(self) -> None:
        """Take writes again after a failure (the state now matches the store)."""
        with self._mutex:
            self._failed = False
        self._wake()

    def stop(self) -> None:
        """Commit what is queued, then end the thread (blocking: call it off the loop)."""
        with self._mutex:
            self._stopping = True
        self._wake()
        self._thread.join()

    def _run(self) -> None:
        while True:
            with self._mutex:
                idle = not self._pending.waiters or self._failed
                if idle:
                    if self._stopping:
                        return
                    self._waiting = True
                else:
                    pending, self._pending = self._pending, Pending()
            if idle:
                self._wakeup.acquire()
                continue
            error: BaseException | None = None
            if pending.rows:
                try:
                    self._store.commit(pending.batch())
                except Exception as exc:
                    # A StoreError is the disk saying no; anything else is a bug, but it must
                    # not end the thread and leave every later write waiting forever.
                    error = exc
            if error is not None:
                with self._mutex:
                    self._failed = True
            try:
                self._loop.call_soon_threadsafe(self._done, pending, error)
            except RuntimeError:
                return  # the loop is closed: nobody is waiting any more
