"""The asyncio discovery client: lookups with a cache, client-side balancing, watches and
self-registration, over the registry's HTTP API, across a list of registry nodes.

Discovery is itself a service that can fail or be overloaded, so this client never makes a
caller wait on it more than it must: answers are cached for ``cache_ttl`` and kept current by a
background blocking query per service looked up; when no node answers, the cached answer is
served marked ``stale`` (up to ``max_stale``) instead of raising.

The decisions live in sans-IO objects (``Cache``, ``NodeList``, ``Picker``, ``SseParser``);
this module only moves bytes and sleeps.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import random
import ssl
import time
from collections.abc import AsyncGenerator, Callable, Container, Mapping, Sequence
from dataclasses import dataclass
from types import TracebackType
from typing import Any
from urllib.parse import quote

import aiohttp

from interknit.balance import POLICIES
from interknit.client.cache import CACHE_TTL, IDLE_AFTER, MAX_STALE, Cache
from interknit.client.errors import (
    DiscoveryError,
    DiscoveryUnavailable,
    NoInstances,
    RequestRejected,
)
from interknit.client.model import Instance, Lookup, Query, parse_instance, parse_instances
from interknit.client.nodes import MAX_RETRY_AFTER, RETRY_AFTER, NodeList
from interknit.client.picker import Picker
from interknit.client.sse import SseParser
from interknit.durations import format_duration, parse_duration
from interknit.tls.client import api_context

log = logging.getLogger("interknit.client")

TIMEOUT = 2.0
REFRESH_WAIT = 10.0
# The registry sends a keepalive comment every 15 s on an idle watch; three missed ones and
# the stream is taken for dead.
WATCH_READ_TIMEOUT = 45.0
# The registry adds up to 1/16 of ``wait`` as jitter to a blocking query.
_JITTER = 1.0 / 16.0

Params = Mapping[str, str] | Callable[[str], Mapping[str, str]]


@dataclass(frozen=True, slots=True)
class Answer:
    """One HTTP answer from one registry node."""

    node: str
    status: int
    headers: Mapping[str, str]
    body: bytes

    @property
    def node_stale(self) -> bool:
        return self.headers.get("X-Interknit-Stale") == "1"

    def json(self) -> Any:
        return json.loads(self.body) if self.body else None

    def rejected(self) -> RequestRejected:
        message, detail = f"HTTP {self.status}", None
        with contextlib.suppress(ValueError, AttributeError, TypeError):
            data = self.json()
            message, detail = str(data.get("error", message)), data.get("detail")
        return RequestRejected(self.status, message, detail)


def _describe(exc: BaseException) -> str:
    text = str(exc)
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


def _seconds(value: float | str) -> float:
    return parse_duration(value) if isinstance(value, str) else float(value)


class AsyncClient:
    """A discovery client for one asyncio loop. Use it as ``async with AsyncClient(...)`` or
    call ``close()``; one client per process is the intended use (it shares one connection pool
    and one cache among all callers)."""

    def __init__(
        self,
        nodes: Sequence[str] | str,
        *,
        token: str | None = None,
        cache_ttl: float | str = CACHE_TTL,
        max_stale: float | str = MAX_STALE,
        timeout: float | str = TIMEOUT,
        refresh: bool = True,
        refresh_wait: float | str = REFRESH_WAIT,
        idle_after: float | str = IDLE_AFTER,
        retry_after: float | str = RETRY_AFTER,
        clock: Callable[[], float] = time.monotonic,
        wall: Callable[[], float] = time.time,
        rng: random.Random | None = None,
        cacert: str | None = None,
        cert: str | None = None,
        key: str | None = None,
        ssl_context: ssl.SSLContext | None = None,
    ) -> None:
        # Global: what the client is and how patient it is.
        # https:// nodes: trust ``cacert`` (else the system's roots), present ``cert``/``key``
        # to nodes that ask for a client certificate; or a ready ``ssl_context``.
        self._ssl = ssl_context if ssl_context is not None else api_context(cacert, cert, key)
        self.nodes = NodeList(nodes, _seconds(retry_after), MAX_RETRY_AFTER)
        self.cache = Cache(_seconds(cache_ttl), _seconds(max_stale), _seconds(idle_after))
        self.timeout = _seconds(timeout)
        self.refresh = refresh
        self.refresh_wait = max(_seconds(refresh_wait), 0.01)
        self._token = token
        # ``clock`` measures ages (monotonic); ``wall`` is the registry's clock, which
        # ``ejected_until`` is written in.
        self._clock = clock
        self._wall = wall
        self._rng = rng if rng is not None else random.Random()
        self._picker = Picker(rng)
        # IO state.
        self._session: aiohttp.ClientSession | None = None
        self._refreshers: dict[Query, asyncio.Task[None]] = {}
        self._fetches: dict[Query, asyncio.Task[Lookup]] = {}
        self._registrations: set[Registration] = set()
        self._stale_logged: set[Query] = set()
        self._closed = False

    async def __aenter__(self) -> AsyncClient:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.close()

    async def close(self) -> None:
        """Stop background refreshes, close open registrations (deregistering them) and the
        connection pool."""
        for registration in list(self._registrations):
            await registration.close()
        self._closed = True
        tasks = [*self._refreshers.values(), *self._fetches.values()]
        for task in tasks:
            task.cancel()
        for task in tasks:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task
        self._refreshers.clear()
        self._fetches.clear()
        if self._session is not None:
            await self._session.close()
            self._session = None

    # ------------------------------------------------------------------ lookups

    async def instances(
        self, service: str, *, healthy: bool = True, tag: str | None = None
    ) -> Lookup:
        """The instances of ``service`` (only passing ones unless ``healthy=False``; only those
        tagged ``tag`` if given).

        A fresh cached answer is returned at once. Otherwise the registry nodes are asked in
        turn; if none answers, the cached answer is returned with ``stale=True`` as long as it
        is younger than ``max_stale``. Raises ``DiscoveryUnavailable`` only when there is no
        such answer, and ``RequestRejected`` when the registry refuses the question (a service
        name that is not a DNS label). An unknown service is an empty answer, not an error.
        """
        return await self._lookup(Query(service, healthy, tag))

    async def _lookup(self, query: Query, subsets: bool = False) -> Lookup:
        hit = self.cache.fresh(query, self._clock())
        if hit is not None:
            self._ensure_refresher(query)
            return hit
        # Concurrent callers for the same query share one request.
        task = self._fetches.get(query)
        if task is None:
            task = asyncio.create_task(
                self._fetch(query, subsets), name=f"interknit-lookup-{query.service}"
            )
            self._fetches[query] = task
            task.add_done_callback(lambda _t: self._fetches.pop(query, None))
        return await asyncio.shield(task)

    async def pick(
        self,
        service: str,
        *,
        key: str | bytes | None = None,
        balance: str = "round_robin",
        tag: str | None = None,
        exclude: Container[str] = (),
    ) -> Instance:
        """One instance of ``service`` to call, chosen by the proxy's balancer ``balance``.

        ``key`` feeds the hashing policies (``ring_hash``, ``maglev``, ``source_ip``): the same
        key goes to the same instance while the set is unchanged. ``exclude`` holds instance
        ids a retry should avoid. Like the proxy, it balances over passing and warning
        instances, never draining or ejected ones, and over all but those in maintenance when
        fewer than half are usable (panic). Raises ``NoInstances`` when nothing is usable.
        """
        if balance not in POLICIES:
            raise ValueError(f"unknown balance policy {balance!r}; one of {', '.join(POLICIES)}")
        query = Query(service, healthy=False, tag=tag)
        lookup = await self._lookup(query, subsets=True)
        hash_key = key.encode() if isinstance(key, str) else key
        chosen = self._picker.pick(query, balance, lookup, self._wall(), hash_key, exclude)
        if chosen is None:
            raise NoInstances(service, lookup.stale)
        return chosen

    async def _fetch(self, query: Query, subsets: bool) -> Lookup:
        # With a usable cached answer to fall back on, nodes known to be down are not retried
        # in the caller's time: the background refresher does that.
        has_fallback = self.cache.fallback(query, self._clock(), subsets) is not None
        try:
            answer = await self._request(
                "GET",
                self._service_path(query.service),
                params=query.params(),
                include_resting=not has_fallback,
                prefer_fresh=True,
            )
        except DiscoveryUnavailable as exc:
            cached = self.cache.fallback(query, self._clock(), subsets)
            if cached is None:
                raise
            if query not in self._stale_logged:
                # Once per outage, not once per call: callers may look up at a high rate.
                self._stale_logged.add(query)
                log.warning(
                    "event=client.stale service=%s age=%.1f reason=%r",
                    query.service,
                    cached.age,
                    exc,
                )
            self._ensure_refresher(query)
            return cached
        self._stale_logged.discard(query)
        lookup = self._store(query, answer, used=True)
        self._ensure_refresher(query)
        return lookup

    def _store(self, query: Query, answer: Answer, used: bool) -> Lookup:
        if answer.status == 404:
            # An unknown service: nothing to call, and that is an answer, not a failure.
            revision = int(answer.headers.get("X-Interknit-Revision", "0") or 0)
            instances: tuple[Instance, ...] = ()
        elif answer.status == 200:
            data = answer.json()
            revision = int(data["revision"])
            instances = parse_instances(data["instances"])
        else:
            raise answer.rejected()
        return self.cache.store(
            query,
            instances,
            revision,
            self._clock(),
            node=answer.node,
            node_stale=answer.node_stale,
            used=used,
        )

    @staticmethod
    def _service_path(service: str) -> str:
        return f"/v1/services/{quote(service, safe='')}"

    # ------------------------------------------------------------------ background refresh

    def _ensure_refresher(self, query: Query) -> None:
        if not self.refresh or self._closed:
            return
        task = self._refreshers.get(query)
        if task is None or task.done():
            self._refreshers[query] = asyncio.create_task(
                self._refresh_loop(query), name=f"interknit-refresh-{query.service}"
            )

    async def _refresh_loop(self, query: Query) -> None:
        """Keep one cached answer current with blocking queries until nobody asks for it."""
        failures = 0
        wait = self.refresh_wait
        path = self._service_path(query.service)
        # The node whose answer this loop received last, while it keeps answering.
        last_ok: str | None = None

        def params(node: str) -> Mapping[str, str]:
            p = query.params()
            entry = self.cache.entry(query)
            # A revision means something only to the node (or store) that gave it, and only a
            # node that just answered is worth a long wait: any other is asked to answer now.
            blocking = entry is not None and entry.node == node and node == last_ok
            if blocking:
                assert entry is not None
                p["index"] = str(entry.revision)
                p["wait"] = format_duration(wait)
            # While that query is connected, any change reaches us as it happens.
            self.cache.set_live(query, blocking)
            return p

        try:
            while not self._closed:
                self.cache.prune(self._clock())
                if self.cache.idle(query, self._clock()):
                    return
                if last_ok is None and self.cache.is_fresh(query, self._clock()):
                    # The foreground lookup that started this loop just asked.
                    entry = self.cache.entry(query)
                    last_ok = None if entry is None else entry.node
                try:
                    answer = await self._request(
                        "GET",
                        path,
                        params=params,
                        timeout=wait * (1 + _JITTER) + self.timeout,
                        prefer_fresh=False,
                    )
                    self._store(query, answer, used=False)
                    self._stale_logged.discard(query)
                    last_ok = answer.node
                except DiscoveryUnavailable:
                    last_ok = None
                    self.cache.set_live(query, False)
                    failures += 1
                    delay = min(self.nodes.retry_after * 2 ** (failures - 1), MAX_RETRY_AFTER)
                    await asyncio.sleep(delay * self._rng.uniform(0.5, 1.0))
                    continue
                except (RequestRejected, ValueError, KeyError) as exc:
                    log.warning("event=client.refresh_failed service=%s error=%r", query, exc)
                    last_ok = None
                    self.cache.set_live(query, False)
                    await asyncio.sleep(self.cache.ttl)
                    continue
                failures = 0
        finally:
            self.cache.set_live(query, False)
            if self._refreshers.get(query) is asyncio.current_task():
                del self._refreshers[query]

    # ------------------------------------------------------------------ watch

    async def watch(
        self, service: str, *, healthy: bool = True, tag: str | None = None
    ) -> AsyncGenerator[Lookup, None]:
        """Yield the instances of ``service`` now and again after every change.

        Follows the registry's watch stream (``GET /v1/watch``) on one node, moving to the next
        node when it breaks. While no node can be reached it yields the last answer once more
        marked ``stale``, and raises ``DiscoveryUnavailable`` when that answer grows older than
        ``max_stale`` (or at once when there never was one).
        """
        query = Query(service, healthy, tag)
        members: dict[str, Instance] = {}
        revision = 0
        node: str | None = None
        confirmed_at: float | None = None
        last: tuple[tuple[Instance, ...], bool] | None = None
        failures = 0

        def view(stale: bool, source: str | None) -> Lookup | None:
            nonlocal last
            instances = tuple(members[k] for k in sorted(members) if query.matches(members[k]))
            if last is not None and last == (instances, stale):
                return None
            last = (instances, stale)
            return Lookup(service, instances, revision, stale, 0.0, source)

        while True:
            for url in self.nodes.order(self._clock()):
                params = {"service": service}
                if url == node and confirmed_at is not None:
                    params["since"] = str(revision)
                try:
                    timeout = aiohttp.ClientTimeout(
                        total=None, connect=self.timeout, sock_read=WATCH_READ_TIMEOUT
                    )
                    session = self._http()
                    async with session.get(
                        url + "/v1/watch", params=params, timeout=timeout
                    ) as resp:
                        if resp.status >= 500:
                            self.nodes.failed(url, self._clock(), f"HTTP {resp.status}")
                            continue
                        if resp.status != 200:
                            body = await resp.read()
                            raise Answer(url, resp.status, resp.headers, body).rejected()
                        self.nodes.succeeded(url)
                        node = url
                        failures = 0
                        parser = SseParser()
                        async for chunk in resp.content.iter_any():
                            for event in parser.feed(chunk):
                                data = json.loads(event.data)
                                if event.event == "resync":
                                    members = {i.id: i for i in parse_instances(data["instances"])}
                                elif event.event == "put":
                                    inst = parse_instance(data["instance"])
                                    members[inst.id] = inst
                                elif event.event == "delete":
                                    members.pop(str(data["id"]), None)
                                else:
                                    continue
                                revision = int(data["revision"])
                                confirmed_at = self._clock()
                                out = view(False, url)
                                if out is not None:
                                    yield out
                            if parser.comments:
                                confirmed_at = self._clock()
                    # The node closed the stream (it is shutting down): try the next one.
                    self.nodes.failed(url, self._clock(), "watch stream ended")
                except (aiohttp.ClientError, TimeoutError, OSError, ValueError) as exc:
                    self.nodes.failed(url, self._clock(), _describe(exc))
            # No node would keep a stream open.
            failures += 1
            now = self._clock()
            if confirmed_at is None:
                cached = self.cache.fallback(query, now)
                if cached is None:
                    raise DiscoveryUnavailable(
                        f"no registry node answered the watch of {service!r}", self.nodes.errors()
                    )
                members = {i.id: i for i in cached.instances}
                revision = cached.revision
                confirmed_at = now - cached.age
                node = cached.node
            elif now - confirmed_at > self.cache.max_stale:
                raise DiscoveryUnavailable(
                    f"no registry node answered for {now - confirmed_at:.0f}s", self.nodes.errors()
                )
            out = view(True, None)
            if out is not None:
                yield out
            delay = min(self.nodes.retry_after * 2 ** (failures - 1), MAX_RETRY_AFTER)
            await asyncio.sleep(delay * self._rng.uniform(0.5, 1.0))

    # ------------------------------------------------------------------ registration

    def register(
        self,
        service: str,
        id: str,
        *,
        address: str,
        port: int,
        ttl: float | str | None = 10.0,
        http_check: str | None = None,
        tcp_check: bool = False,
        interval: float | str | None = None,
        deregister_after: float | str | None = None,
        tags: Sequence[str] = (),
        zone: str | None = None,
        region: str | None = None,
        weight: int = 1,
        meta: Mapping[str, str] | None = None,
    ) -> Registration:
        """A registration of this process as an instance; ``async with`` it (or ``start()`` and
        ``close()`` it). With a ``ttl`` (the default, 10 s) it heartbeats every ttl/3 in the
        background and re-registers if the registry forgot it; ``http_check``/``tcp_check``
        make the node check it instead. Leaving deregisters it."""
        check: dict[str, Any]
        if http_check is not None:
            check = {"http": http_check}
        elif tcp_check:
            check = {"tcp": True}
        elif ttl is not None:
            check = {"ttl": format_duration(_seconds(ttl))}
        else:
            raise ValueError("a registration needs a ttl, an http_check or a tcp_check")
        if interval is not None and "ttl" not in check:
            check["interval"] = format_duration(_seconds(interval))
        if deregister_after is not None:
            check["deregister_after"] = format_duration(_seconds(deregister_after))
        body: dict[str, Any] = {
            "address": address,
            "port": port,
            "weight": weight,
            "tags": list(tags),
            "meta": dict(meta or {}),
            "check": check,
        }
        if zone is not None:
            body["zone"] = zone
        if region is not None:
            body["region"] = region
        heartbeat = _seconds(ttl) / 3 if "ttl" in check and ttl is not None else None
        return Registration(self, service, id, body, heartbeat)

    async def deregister(self, service: str, id: str) -> None:
        """Remove an instance; removing one that is not there is not an error."""
        answer = await self._request(
            "DELETE", f"{self._service_path(service)}/instances/{quote(id, safe='')}"
        )
        if answer.status not in (200, 404):
            raise answer.rejected()

    # ------------------------------------------------------------------ HTTP

    def _http(self) -> aiohttp.ClientSession:
        if self._closed:
            raise RuntimeError("the discovery client is closed")
        if self._session is None:
            headers = {"User-Agent": "interknit-client"}
            if self._token is not None:
                headers["Authorization"] = f"Bearer {self._token}"
            # No connection limit: each background blocking query holds one connection.
            self._session = aiohttp.ClientSession(
                connector=aiohttp.TCPConnector(
                    limit=0, ssl=self._ssl if self._ssl is not None else True
                ),
                headers=headers,
            )
        return self._session

    async def _request(
        self,
        method: str,
        path: str,
        *,
        params: Params | None = None,
        body: Any = None,
        timeout: float | None = None,
        include_resting: bool = True,
        prefer_fresh: bool = False,
    ) -> Answer:
        """Ask the nodes in turn until one answers below 500; raise ``DiscoveryUnavailable``
        when none does. With ``prefer_fresh``, an answer a node marks stale is kept only until
        another node gives a fresh one."""
        session = self._http()
        # A blocking query may wait long for its answer, but not for its connection.
        client_timeout = aiohttp.ClientTimeout(total=timeout or self.timeout, connect=self.timeout)
        stale_answer: Answer | None = None
        for url in self.nodes.order(self._clock(), include_resting):
            query = params(url) if callable(params) else params
            try:
                async with session.request(
                    method, url + path, params=query, json=body, timeout=client_timeout
                ) as resp:
                    raw = await resp.read()
                    answer = Answer(url, resp.status, resp.headers, raw)
            except (aiohttp.ClientError, TimeoutError, OSError) as exc:
                self.nodes.failed(url, self._clock(), _describe(exc))
                continue
            if answer.status >= 500:
                self.nodes.failed(url, self._clock(), f"HTTP {answer.status}")
                continue
            self.nodes.succeeded(url)
            if prefer_fresh and answer.node_stale and answer.status == 200:
                stale_answer = stale_answer or answer
                continue
            return answer
        if stale_answer is not None:
            self.nodes.succeeded(stale_answer.node)
            return stale_answer
        raise DiscoveryUnavailable(
            "no registry node answered ("
            + "; ".join(f"{u}: {e}" for u, e in self.nodes.errors().items())
            + ")",
            self.nodes.errors(),
        )


class Registration:
    """One instance registered by this process, kept alive while the registration is open."""

    def __init__(
        self,
        client: AsyncClient,
        service: str,
        id: str,
        body: Mapping[str, Any],
        heartbeat: float | None,
    ) -> None:
        self.client = client
        self.service = service
        self.id = id
        self.body = dict(body)
        # Seconds between heartbeats (ttl/3: two can be lost before the lease runs out).
        self.heartbeat_every = heartbeat
        self.instance: Instance | None = None
        self.heartbeats = 0
        self.registrations = 0
        self.last_error: str | None = None
        self._task: asyncio.Task[None] | None = None
        self._path = f"/v1/services/{quote(service, safe='')}/instances/{quote(id, safe='')}"

    async def __aenter__(self) -> Registration:
        await self.start()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.close()

    async def start(self) -> Instance:
        """Register now (raising if no node takes it) and start heartbeating."""
        instance = await self._register()
        self.client._registrations.add(self)
        if self.heartbeat_every is not None and self._task is None:
            self._task = asyncio.create_task(
                self._heartbeat_loop(), name=f"interknit-heartbeat-{self.service}-{self.id}"
            )
        return instance

    async def close(self, deregister: bool = True) -> None:
        """Stop heartbeating and (by default) deregister; a registry that cannot be reached
        is logged, not raised: the lease runs out on its own."""
        self.client._registrations.discard(self)
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
        if deregister and not self.client._closed:
            try:
                await self.client.deregister(self.service, self.id)
            except DiscoveryError as exc:
                log.warning(
                    "event=client.deregister_failed service=%s instance=%s error=%r",
                    self.service,
                    self.id,
                    exc,
                )

    async def _register(self) -> Instance:
        answer = await self.client._request("PUT", self._path, body=self.body)
        if answer.status != 200:
            raise answer.rejected()
        self.instance = parse_instance(answer.json())
        self.registrations += 1
        return self.instance

    async def _heartbeat_loop(self) -> None:
        assert self.heartbeat_every is not None
        delay = self.heartbeat_every
        while True:
            await asyncio.sleep(delay)
            delay = self.heartbeat_every
            try:
                answer = await self.client._request("PUT", self._path + "/heartbeat")
                if answer.status == 404:
                    # The registry forgot us (expired, or a node with its own store): say it
                    # again.
                    await self._register()
                elif answer.status != 200:
                    raise answer.rejected()
                else:
                    self.instance = parse_instance(answer.json())
                self.heartbeats += 1
                self.last_error = None
            except DiscoveryUnavailable as exc:
                self.last_error = str(exc)
                # Retry sooner: the lease allows about two missed heartbeats.
                delay = self.heartbeat_every / 2
                log.warning(
                    "event=client.heartbeat_failed service=%s instance=%s error=%r",
                    self.service,
                    self.id,
                    exc,
                )
            except RequestRejected as exc:
                self.last_error = str(exc)
                log.error(
                    "event=client.heartbeat_refused service=%s instance=%s error=%r",
                    self.service,
                    self.id,
                    exc,
                )
                if exc.status == 409:
                    return
            except (ValueError, KeyError, TypeError) as exc:
                # A malformed answer; the lease is what matters, so keep heartbeating.
                self.last_error = repr(exc)
                log.warning(
                    "event=client.heartbeat_failed service=%s instance=%s error=%r",
                    self.service,
                    self.id,
                    exc,
                )
