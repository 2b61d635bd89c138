"""The blocking discovery client, for code without an event loop (threads, WSGI, scripts).

It runs one ``AsyncClient`` on a private event loop in a daemon thread and waits for its
answers, so both clients share every rule (cache, stale fallback, failover, balancing) and the
background refreshes and heartbeats keep running between calls. Its methods are safe to call
from any number of threads; do not call them from inside its own loop (a callback of it).
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import AsyncIterator, Container, Coroutine, Generator, Sequence
from concurrent.futures import Future
from types import TracebackType
from typing import Any, TypeVar

from interknit.client.aio import AsyncClient, Registration
from interknit.client.model import Instance, Lookup

T = TypeVar("T")


class Client:
    """A blocking discovery client; the keyword arguments are ``AsyncClient``'s."""

    def __init__(self, nodes: Sequence[str] | str, **options: Any) -> None:
        # Built first: bad options raise here, before a thread exists.
        self._aio = AsyncClient(nodes, **options)
        self._closed = False
        self._loop = asyncio.new_event_loop()
        self._ready = threading.Event()
        self._thread = threading.Thread(target=self._run, name="interknit-client", daemon=True)
        self._thread.start()
        self._ready.wait()

    def _run(self) -> None:
        asyncio.set_event_loop(self._loop)
        self._loop.call_soon(self._ready.set)
        self._loop.run_forever()

    def _call(self, coro: Coroutine[Any, Any, T], timeout: float | None = None) -> T:
        if self._closed:
            coro.close()
            raise RuntimeError("the discovery client is closed")
        future: Future[T] = asyncio.run_coroutine_threadsafe(coro, self._loop)
        try:
            return future.result(timeout)
        except BaseException:
            future.cancel()
            raise

    @property
    def aio(self) -> AsyncClient:
        """The asyncio client underneath (its cache, its node list)."""
        return self._aio

    def __enter__(self) -> Client:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def close(self) -> None:
        """Deregister open registrations, stop the background work and the loop's thread."""
        if self._closed:
            return
        self._call(self._aio.close())
        self._closed = True
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(10)
        self._loop.close()

    def instances(self, service: str, *, healthy: bool = True, tag: str | None = None) -> Lookup:
        """As ``AsyncClient.instances``."""
        return self._call(self._aio.instances(service, healthy=healthy, tag=tag))

    def pick(
        self,
        service: str,
        *,
        key: str | bytes | None = None,
        balance: str = "round_robin",
        tag: str | None = None,
        exclude: Container[str] = (),
    ) -> Instance:
        """As ``AsyncClient.pick``."""
        return self._call(
            self._aio.pick(service, key=key, balance=balance, tag=tag, exclude=exclude)
        )

    def watch(
        self, service: str, *, healthy: bool = True, tag: str | None = None
    ) -> Generator[Lookup, None, None]:
        """As ``AsyncClient.watch``; closing the iterator (or leaving a ``for`` loop) ends the
        watch."""
        stream = self._aio.watch(service, healthy=healthy, tag=tag)
        try:
            while True:
                try:
                    yield self._call(_next(stream))
                except StopAsyncIteration:
                    return
        finally:
            if not self._closed:
                self._call(stream.aclose())

    def register(self, service: str, id: str, **options: Any) -> SyncRegistration:
        """As ``AsyncClient.register``; use it as ``with client.register(...):``."""
        return SyncRegistration(self, self._aio.register(service, id, **options))

    def deregister(self, service: str, id: str) -> None:
        self._call(self._aio.deregister(service, id))


async def _next(stream: AsyncIterator[Lookup]) -> Lookup:
    return await stream.__anext__()


class SyncRegistration:
    """A ``Registration`` driven from blocking code; heartbeats run on the client's loop."""

    def __init__(self, client: Client, registration: Registration) -> None:
        self._client = client
        self.registration = registration

    @property
    def instance(self) -> Instance | None:
        return self.registration.instance

    @property
    def heartbeats(self) -> int:
        return self.registration.heartbeats

    def start(self) -> Instance:
        return self._client._call(self.registration.start())

    def close(self, deregister: bool = True) -> None:
        self._client._call(self.registration.close(deregister))

    def __enter__(self) -> SyncRegistration:
        self.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()
