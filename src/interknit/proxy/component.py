"""The proxy as a part of a node: listeners, their pools and demand control, and reloads.

It reads the registry through three callables (the current state, a way to record ejections,
and the node's event subscription), so the same component runs in the node itself and in a
``--workers`` process that follows a node's watch stream.
"""

from __future__ import annotations

import asyncio
import logging
import os
import time
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import replace
from typing import Any

from prometheus_client import CollectorRegistry

from interknit.demand.metrics import DemandMetrics
from interknit.demand.overload import OverloadMonitor
from interknit.demand.route import DemandAdmissions, RouteLike
from interknit.demand.settings import DemandSettings
from interknit.logs import os_error
from interknit.names import format_hostport
from interknit.proxy.accesslog import open_target
from interknit.proxy.config import ListenerSection
from interknit.proxy.listener import HttpListener, TcpListener, build_listener
from interknit.proxy.observe import ProxyMetrics
from interknit.proxy.outliers import PassiveHealth
from interknit.proxy.pool_feed import RegistryPools, refresh_forever
from interknit.proxy.setup import demand_settings, pool_options
from interknit.proxy.spec import ListenerSpec, RouteSpec
from interknit.proxy.traffic import TrafficHistory
from interknit.registry.model import Event
from interknit.registry.state import RegistryState
from interknit.tls.client import ClientTlsSpec

log = logging.getLogger("interknit.proxy")

Listener = HttpListener | TcpListener


class ListenError(Exception):
    """A listener could not bind; the message names the listener and the address."""


def _access_log_error(index: int, section: ListenerSection, exc: OSError) -> ListenError:
    return ListenError(
        f"listeners[{index}].access_log: cannot open {section.access_log} for listener "
        f"{section.name!r}: {os_error(exc)}"
    )


def _check_access_log(index: int, section: ListenerSection, spec: ListenerSpec) -> None:
    """Raise ListenError when ``spec``'s access log file cannot be opened for appending, so
    that a reload naming one changes nothing."""
    if spec.access_log in ("off", "-"):
        return
    try:
        os.close(open_target(spec.access_log))
    except OSError as exc:
        raise _access_log_error(index, section, exc) from None


class ProxyComponent:
    def __init__(
        self,
        sections: Sequence[ListenerSection],
        *,
        state: Callable[[], RegistryState],
        set_ejected: Callable[[str, str, float | None], Awaitable[None]],
        metrics: CollectorRegistry,
        secret: bytes,
        reuse_port: bool = False,
        access_log_json: bool = False,
        service_tls: Mapping[str, ClientTlsSpec] | None = None,
    ) -> None:
        self.sections = list(sections)
        self.reuse_port = reuse_port
        self.access_log_json = access_log_json
        # [[services]] upstream_tls: how routes to a service reach it, unless they say.
        self.service_tls = dict(service_tls or {})
        self.passive = PassiveHealth(set_ejected, metrics)
        self._options = pool_options(sections)
        self._settings = demand_settings(sections)
        self.pools = RegistryPools(
            state, secret, reporter=self.passive.report, options=self._options
        )
        settings = self._settings

        def settings_for(route: RouteLike) -> DemandSettings | None:
            return settings.get(route) if isinstance(route, RouteSpec) else None

        self.admissions = DemandAdmissions(
            settings_for, metrics=DemandMetrics(metrics), overload=OverloadMonitor()
        )
        self.metrics = ProxyMetrics.for_registry(metrics)
        self.traffic = TrafficHistory(self.metrics)
        self._sampler: asyncio.Task[None] | None = None
        self.listeners: dict[str, Listener] = {}
        self.listen: dict[str, str] = {}
        self._refresher: asyncio.Task[None] | None = None
        self._tls_watch: asyncio.Task[None] | None = None

    # ------------------------------------------------------------------ registry feed

    def on_events(self, events: Sequence[Event]) -> None:
        self.pools.apply(events)

    def on_resync(self) -> None:
        self.pools.resync()

    def overloaded(self) -> bool:
        return self.admissions.overloaded()

    def panels(self) -> dict[str, Callable[[], Any]]:
        return {
            "traffic": lambda: self.traffic.describe(time.time()),
            "pools": self.pools.describe,
            "demand": self.admissions.describe,
        }

    async def _sample_traffic(self) -> None:
        while True:
            await asyncio.sleep(self.traffic.every)
            self.traffic.sample(time.time())

    # ------------------------------------------------------------------ lifecycle

    def _spec(self, section: ListenerSection) -> ListenerSpec:
        spec = section.to_spec()
        if self.reuse_port or self.access_log_json:
            spec = replace(
                spec,
                reuse_port=spec.reuse_port or self.reuse_port,
                access_log_json=self.access_log_json,
            )
        return spec

    async def start(self) -> None:
        specs = [self._spec(s) for s in self.sections]
        self.pools.prepare([route for spec in specs for route in spec.routes])
        for index, (section, spec) in enumerate(zip(self.sections, specs, strict=True)):
            await self._open(section, spec, index)
        self._refresher = asyncio.create_task(
            refresh_forever(self.pools, self.passive.expire), name="pool-refresh"
        )
        self.traffic.sample(time.time())
        self._sampler = asyncio.create_task(self._sample_traffic(), name="traffic-sampler")
        if (
            any(s.tls is not None for s in specs)
            or any(r.upstream_tls is not None for s in specs for r in s.routes)
            or self.service_tls
        ):
            self._tls_watch = asyncio.create_task(self._watch_tls(), name="tls-watch")

    async def _watch_tls(self, every: float = 1.0) -> None:
        """Certificates and keys that change on disk reload without dropping a connection
        (as a SIGHUP would); ticket keys rotate."""
        while True:
            await asyncio.sleep(every)
            for section in self.sections:
                listener = self.listeners.get(section.name)
                if listener is None:
                    continue
                listener.rotate_tickets()
                self._log_tls(section, listener.check_tls_files())

    def _log_tls(self, section: ListenerSection, changed: str | None) -> None:
        if changed is None:
            return
        names = [s.name for s in self.sections]
        index = names.index(section.name) if section.name in names else 0
        if ":" in changed:
            log.error(
                "tls reload refused: listeners[%d].%s",
                index,
                changed,
                extra={"event": "proxy.tls_refused", "listener": section.name},
            )
        else:
            log.info(
                "tls reloaded: %s of listener %s",
                changed,
                section.name,
                extra={"event": "proxy.tls_reload", "listener": section.name},
            )

    async def _open(self, section: ListenerSection, spec: ListenerSpec, index: int) -> None:
        listener = build_listener(
            spec,
            self.pools,
            admission=self.admissions,
            metrics=self.metrics,
            service_tls=self.service_tls,
        )
        try:
            await listener.start()
        except OSError as exc:
            if listener.access is None and spec.access_log != "off":
                # The access log is opened first: the socket was never bound.
                raise _access_log_error(index, section, exc) from None
            if listener.access is not None:
                listener.access.close()
            reason = os_error(exc)
            raise ListenError(
                f"cannot listen on {section.listen} for listener {section.name!r}: {reason}"
            ) from None
        self.listeners[spec.name] = listener
        self.listen[f"proxy.{spec.name}"] = (
            f"{spec.protocol}://{format_hostport(spec.host, listener.port)}"
        )

    async def reload(self, sections: Sequence[ListenerSection]) -> None:
        """Apply a new ``[[listeners]]`` list: routes swap in place on listeners that keep their
        address, so open connections are not dropped; others are opened or drained."""
        new_specs = {s.name: (i, s, self._spec(s)) for i, s in enumerate(sections)}
        for index, section, spec in new_specs.values():
            _check_access_log(index, section, spec)
        self._options.clear()
        self._options.update(pool_options(sections))
        self._settings.clear()
        self._settings.update(demand_settings(sections))
        self.pools.prepare([r for _, _, spec in new_specs.values() for r in spec.routes])
        closing = []
        for name, listener in list(self.listeners.items()):
            found = new_specs.get(name)
            if found is not None and listener.same_socket(found[2]):
                index, section, spec = found
                try:
                    listener.update(spec)
                except OSError as exc:  # the access log, which opened a moment ago
                    raise _access_log_error(index, section, exc) from None
                # A reload (SIGHUP) re-reads every certificate, changed on disk or not.
                self._log_tls(section, listener.check_tls_files(force=True))
                continue
            closing.append(self.listeners.pop(name))
            self.listen.pop(f"proxy.{name}", None)
        # Close moved listeners first so that a listener may take over a freed address.
        await asyncio.gather(*(lst.stop(self._drain(self.sections)) for lst in closing))
        for name, (index, section, spec) in new_specs.items():
            if name not in self.listeners:
                await self._open(section, spec, index)
        self.sections = list(sections)
        routes = [r for _, _, spec in new_specs.values() for r in spec.routes]
        self.admissions.retain(routes)
        self.passive.retain(set(self.pools.pools()))
        log.info(
            "listeners reloaded",
            extra={"event": "proxy.reload", "listeners": sorted(self.listeners)},
        )

    def reopen_access_logs(self) -> None:
        """Open every access log's file anew (SIGUSR1: logrotate renamed them)."""
        for listener in self.listeners.values():
            listener.reopen_access_log()

    @staticmethod
    def _drain(sections: Sequence[ListenerSection]) -> float:
        return max((s.drain_timeout for s in sections), default=10.0)

    async def stop(self) -> None:
        for task in (self._refresher, self._sampler, self._tls_watch):
            if task is not None:
                task.cancel()
        drain = self._drain(self.sections)
        await asyncio.gather(*(lst.stop(drain) for lst in self.listeners.values()))
        await self.passive.close()
