"""One running ``interknit up``: wires the registry, its API, the status page and the other
components together, and takes them down in order."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import re
import signal
import socket
import time
from collections.abc import Callable, Sequence
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

from aiohttp import web
from prometheus_client import (
    CollectorRegistry,
    GCCollector,
    ProcessCollector,
    disable_created_metrics,
)

from interknit import __version__
from interknit.admin.app import Panels, build_app
from interknit.config import Config, ConfigError, load_config
from interknit.logs import iso_time, os_error
from interknit.names import format_hostport, parse_hostport
from interknit.registry.api import RegistryApi
from interknit.registry.config import ServiceSection, service_tls
from interknit.registry.fastpath import FastApi
from interknit.registry.http_metrics import HttpMetrics
from interknit.registry.metrics import RegistryMetrics, StateCollector
from interknit.registry.model import Event, Instance, InstanceSpec
from interknit.registry.registry import Registry, RegistryBackend, Unavailable
from interknit.registry.state import RegistryError
from interknit.registry.store import SqliteStore, StoreError
from interknit.registry.tokens import Tokens

if TYPE_CHECKING:  # imported when started: a node without listeners never loads the proxy
    from interknit.compat.api import ConsulApi
    from interknit.health import HealthChecker
    from interknit.proxy.component import ProxyComponent
    from interknit.tls.server import ServerTls
    from interknit.workers import Supervisor

log = logging.getLogger("interknit.node")
# Registrations and removals, one line each (a big batch, such as a resync, is summed up).
events_log = logging.getLogger("interknit.events")
_LOGGED_REASONS = {
    "register": "registered",
    "update": "updated",
    "deregister": "deregistered",
    "expire": "removed after staying critical for its deregister_after",
    "lease": "turned critical: its TTL ran out without a heartbeat",
}
_LOG_BATCH = 8


def log_events(events: Sequence[Event]) -> None:
    """What the registry's events say, for operators: who came, who went."""
    if not events_log.isEnabledFor(logging.INFO):
        return
    logged = [e for e in events if e.reason in _LOGGED_REASONS]
    if len(logged) > _LOG_BATCH:
        counts: dict[str, int] = {}
        for event in logged:
            counts[event.reason] = counts.get(event.reason, 0) + 1
        for reason, count in counts.items():
            events_log.info(
                "%d instances %s",
                count,
                _LOGGED_REASONS[reason],
                extra={"event": f"registry.{reason}", "count": count},
            )
        return
    for event in logged:
        inst = event.instance
        events_log.info(
            "%s/%s %s (%s:%d)",
            inst.service,
            inst.id,
            _LOGGED_REASONS[event.reason],
            inst.address,
            inst.port,
            extra={
                "event": f"registry.{event.reason}",
                "service": inst.service,
                "instance": inst.id,
                "address": f"{inst.address}:{inst.port}",
                "revision": event.revision,
            },
        )


class NodeStartError(Exception):
    """The node cannot start (a busy port, an unreadable store); one sentence for the operator."""


def static_instance_id(hostport: str) -> str:
    """A DNS-label id for a static instance: ``127.0.0.1:9001`` -> ``127-0-0-1-9001``."""
    label = re.sub(r"[^a-z0-9]+", "-", hostport.lower()).strip("-")
    return label[:63].strip("-") or "instance"


# meta.owner of the instances a config's [[services]] registers (as ``run:...`` and
# ``agent:...`` name theirs): the node removes them when the config no longer lists them.
CONFIG_OWNER = "config"


def service_spec(section: ServiceSection, hostport: str) -> InstanceSpec:
    host, port = parse_hostport(hostport)
    check = None if section.check is None else section.check.to_check()
    return InstanceSpec(
        address=host,
        port=port,
        zone=section.zone,
        region=section.region,
        weight=section.weight,
        tags=tuple(section.tags),
        meta=(("owner", CONFIG_OWNER),),
        check=check,
    )


def static_instances(services: Sequence[ServiceSection]) -> dict[tuple[str, str], InstanceSpec]:
    """What a config's ``[[services]]`` register, by (service, id)."""
    return {
        (section.name, static_instance_id(hostport)): service_spec(section, hostport)
        for section in services
        for hostport in section.instances
    }


class Node:
    def __init__(
        self,
        config: Config,
        *,
        drain_timeout: float = 10.0,
        config_path: str | os.PathLike[str] | None = None,
        workers: int = 1,
        log_json: bool = False,
        log_level: str = "info",
    ) -> None:
        # The *_created series double every counter's output for no operator benefit.
        disable_created_metrics()  # type: ignore[no-untyped-call]
        self.config = config
        self.config_path = None if config_path is None else Path(config_path)
        self.drain_timeout = drain_timeout
        self.metrics = CollectorRegistry(auto_describe=True)
        # The process's memory, CPU and file descriptors, and how often the collector runs.
        ProcessCollector(registry=self.metrics)
        GCCollector(registry=self.metrics)
        self.registry_metrics = RegistryMetrics(self.metrics)
        self.registry: RegistryBackend = self._make_registry(config)
        self.metrics.register(
            StateCollector(lambda: self.registry.state, lambda: self.registry.stale)
        )
        self.panels: Panels = {}
        self.listen: dict[str, str] = {}
        self._runner: web.AppRunner | None = None
        self._api_server: asyncio.Server | None = None
        self._api_fast: FastApi | None = None
        self.api_tls: ServerTls | None = None
        self._ready = False
        self.started_at = time.time()
        self._stopping = False
        self._stop_hooks: list[Callable[[], Any]] = []
        self._overloaded: Callable[[], bool] = lambda: False
        self.proxy: ProxyComponent | None = None
        self.health: HealthChecker | None = None
        self.workers = workers
        self.reuse_port = workers > 1
        # How the node logs (--log-json, --log-level): its access logs too, and its workers.
        self.log_json = log_json
        self.log_level = log_level
        self._supervisor: Supervisor | None = None
        # Extra HTTP routes on the node's API (the demo's backend switches).
        self.route_hooks: list[Callable[[web.Application], None]] = []

    def _make_registry(self, config: Config) -> RegistryBackend:
        section = config.registry
        if section.backend == "embedded":
            return Registry(
                SqliteStore(config.node.data_dir),
                history_size=section.history,
                metrics=self.registry_metrics,
            )
        try:
            from interknit.registry.etcd import EtcdRegistry
        except ImportError:
            raise NodeStartError(
                "the etcd backend needs the etcd extra: pip install 'interknit[etcd]'"
            ) from None
        tls = None
        if section.etcd_tls is not None:
            from interknit.registry.etcd_client import EtcdTls

            files = section.etcd_tls

            def read(path: str | None) -> bytes | None:
                return None if path is None else Path(path).read_bytes()

            try:
                tls = EtcdTls(ca=read(files.ca), cert=read(files.cert), key=read(files.key))
            except OSError as exc:
                raise NodeStartError(
                    f"registry.etcd_tls: cannot read {exc.filename}: {exc.strerror}"
                ) from None
        try:
            return EtcdRegistry(
                section.etcd,
                tls=tls,
                node_name=config.node.name,
                data_dir=config.node.data_dir,
                prefix=section.etcd_prefix,
                node_ttl=section.node_ttl,
                request_timeout=section.etcd_timeout,
                history_size=section.history,
                metrics=self.registry_metrics,
            )
        except ValueError as exc:
            raise NodeStartError(f"registry.etcd: {exc}") from None

    def info(self) -> dict[str, Any]:
        return {
            "name": self.config.node.name,
            "version": __version__,
            "revision": self.registry.state.revision,
            "stale": self.registry.stale,
            "backend": self.config.registry.backend,
            "listen": self.listen,
        }

    def _cluster(self) -> dict[str, Any]:
        """The nodes sharing this registry: on etcd every node that holds a lease, else this
        one alone on its embedded store."""
        found = self.registry.cluster()
        if found is not None:
            return found
        return {
            "backend": "embedded",
            "nodes": [
                {
                    "node": self.config.node.name,
                    "this_node": True,
                    "started": iso_time(self.started_at),
                    "instances": sum(1 for _ in self.registry.state.all_instances()),
                }
            ],
        }

    def readiness(self) -> tuple[bool, str]:
        if self._stopping:
            return False, "stopping"
        if not self._ready:
            return False, "starting"
        if self._overloaded():
            return False, "overloaded"
        return True, "ready"

    async def _start_registry(self) -> None:
        try:
            await self.registry.start()
        except StoreError as exc:
            raise NodeStartError(str(exc)) from None
        self.registry.subscribe(log_events)

    async def start(self) -> None:
        # On etcd the API listens first: while the node waits for etcd (up to its start
        # timeout) it answers at once, stale, writes refused with 503 and /v1/health "starting",
        # rather than not at all. The embedded store loads before anything can be asked of it.
        shared = self.config.registry.backend == "etcd"
        if not shared:
            await self._start_registry()
        self.panels["cluster"] = self._cluster
        tokens = self.config.registry.tokens
        api = RegistryApi(
            self.registry,
            self.registry_metrics,
            min_check_interval=self.config.health.min_interval,
        )
        token_check = Tokens(tokens.read, tokens.write)
        http_metrics = HttpMetrics(self.metrics)
        app = build_app(
            api,
            self.metrics,
            token_check,
            self.info,
            self.panels,
            self.readiness,
            http_metrics,
        )
        consul = self._consul_api(app)
        for add in self.route_hooks:
            add(app)
        runner = web.AppRunner(app, access_log=None, shutdown_timeout=self.drain_timeout)
        await runner.setup()
        self._runner = runner
        host, port = parse_hostport(self.config.registry.listen, port_zero=True)
        sock = bind_tcp(host, port, "the registry API")
        # The hot API requests are answered by the fast path; it hands a connection to the
        # aiohttp application at the first request it does not answer itself.
        assert runner.server is not None
        fast = FastApi(
            api,
            runner.server,
            token_check,
            http_metrics,
            max_connections=self.config.registry.max_connections,
        )
        self._api_fast = fast
        tls: dict[str, Any] = {}
        section = self.config.registry.tls
        if section is not None:
            from interknit.tls.server import ServerTls

            self.api_tls = ServerTls(section.to_spec(("http/1.1",)))
            tls = {
                "ssl": self.api_tls.context,
                "ssl_handshake_timeout": API_HANDSHAKE_TIMEOUT,
                "ssl_shutdown_timeout": API_HANDSHAKE_TIMEOUT,
            }
        self._api_server = await asyncio.get_running_loop().create_server(fast, sock=sock, **tls)
        bound = sock.getsockname()
        scheme = "https" if section is not None else "http"
        self.listen["api"] = f"{scheme}://{format_hostport(host, bound[1])}"
        if consul is not None:
            consul.api_port = bound[1]
        if shared:
            await self._start_registry()
        await self._register_static_services()
        await self._start_health()
        await self._start_dns()
        await self._start_proxy()
        if self.workers > 1 and self.config_path is not None:
            from interknit.workers import Supervisor

            self._warn_per_process_limits()
            supervisor = Supervisor(
                self.workers - 1,
                str(self.config_path),
                self.listen["api"],
                log_json=self.log_json,
                log_level=self.log_level,
            )
            await supervisor.start()
            self._supervisor = supervisor
            self.listen["workers"] = f"{self.workers} proxy processes (SO_REUSEPORT)"

            async def stop_workers() -> None:
                await supervisor.stop(self.drain_timeout + 5)

            self.on_stop(stop_workers)
        # Last, so that its stop runs first: the VIPs are handed over before anything drains.
        await self._start_vip()
        self._ready = True
        log.info("node started", extra={"event": "node.started", **self.listen})

    def _warn_per_process_limits(self) -> None:
        """Demand limits are per process (docs/demand.md, "With --workers N"): say so once."""
        for index, listener in enumerate(self.config.listeners):
            for number, route in enumerate(listener.routes):
                demand = route.demand
                if demand is None:
                    continue
                limits = [
                    key
                    for key in ("rate", "client_rate", "concurrency")
                    if getattr(demand, key) is not None
                ]
                if limits:
                    log.warning(
                        "demand limits are per process: with --workers %d this route admits"
                        " up to %d times its %s",
                        self.workers,
                        self.workers,
                        ", ".join(limits),
                        extra={
                            "event": "node.per_process_limits",
                            "route": f"listeners[{index}].routes[{number}]",
                            "workers": self.workers,
                        },
                    )

    def _consul_api(self, app: web.Application) -> ConsulApi | None:
        """Consul's HTTP API subset and Prometheus http_sd on the registry's listener."""
        section = self.config.compat
        if not section.enabled:
            return None
        from interknit.compat.api import ConsulApi

        host, port = parse_hostport(self.config.registry.listen, port_zero=True)
        address = section.node_address
        if address is None:
            address = "127.0.0.1" if host in ("0.0.0.0", "::") else host
        consul = ConsulApi(
            self.registry,
            section,
            node_name=self.config.node.name,
            node_address=address,
            api_port=port,
            metrics=self.registry_metrics,
            min_check_interval=self.config.health.min_interval,
        )
        consul.add_routes(app)
        self.listen["consul"] = "Consul HTTP API subset and /v1/prometheus/targets on the API"
        return consul

    async def _register_static_services(self) -> None:
        shared = self.config.registry.backend == "etcd"
        try:
            await self._sync_static_services()
        except Unavailable:
            if not shared:
                raise
            # etcd is away: the loop below registers them once it is back.
        except RegistryError as exc:
            raise NodeStartError(str(exc)) from None
        if shared:
            # On etcd a static instance belongs to the node that registered it and goes with
            # that node's lease; every node re-registers them (a local no-op while unchanged),
            # so another node takes them over when the owner dies.
            task = asyncio.create_task(self._keep_static_services(), name="static-services")
            self.on_stop(task.cancel)

    async def _sync_static_services(self) -> None:
        """Register what ``[[services]]`` lists, and deregister the instances the config
        registered before (``meta.owner = "config"``) that it no longer lists. On etcd only
        those this node owns: another node whose config still lists one keeps it."""
        wanted = static_instances(self.config.services)
        for (service, instance_id), spec in wanted.items():
            try:
                await self.registry.register(service, instance_id, spec)
            except Unavailable:
                raise
            except RegistryError as exc:
                raise RegistryError(
                    f"cannot register static instance {spec.address}:{spec.port} of"
                    f" {service}: {exc}"
                ) from None
        state = self.registry.state
        gone = [
            inst
            for inst in state.all_instances()
            if inst.spec.meta_dict.get("owner") == CONFIG_OWNER
            and inst.key not in wanted
            and self.registry.owns(inst.service, inst.id)
        ]
        for inst in gone:
            with contextlib.suppress(RegistryError):
                await self.registry.deregister(inst.service, inst.id)
            log.info(
                "static instance removed: the config no longer lists it",
                extra={"event": "node.static_removed", "service": inst.service, "id": inst.id},
            )

    async def _keep_static_services(self, every: float = 3.0) -> None:
        while True:
            await asyncio.sleep(every)
            with contextlib.suppress(RegistryError):
                await self._sync_static_services()

    async def _start_health(self) -> None:
        """Active checks for every instance with an HTTP or TCP check, results to the registry."""
        from interknit.health import HealthChecker
        from interknit.tls.client import ClientTls

        tls = {
            name: ClientTls(replace(spec, alpn=("http/1.1",)))
            for name, spec in service_tls(self.config.services).items()
        }
        section = self.config.health
        checker = HealthChecker(
            self.registry.set_check_status,
            registry=self.metrics,
            service_tls=tls,
            min_interval=section.min_interval,
            max_per_second=section.max_checks_per_second,
        )
        # On etcd every node sees every instance, but only the owning node checks it.
        owns = self.registry.owns

        def mine() -> list[Instance]:
            return [i for i in self.registry.state.all_instances() if owns(i.service, i.id)]

        checker.sync(mine())

        def apply(events: Sequence[Event]) -> None:
            for event in events:
                inst = event.instance
                if event.type == "put" and owns(inst.service, inst.id):
                    checker.update(inst)
                else:
                    checker.remove(inst.service, inst.id)

        self.registry.subscribe(apply, lambda: checker.sync(mine()))
        checker.start()
        self.on_stop(checker.stop)
        self.health = checker
        self.panels["checks"] = checker.describe

    async def _start_dns(self) -> None:
        section = self.config.dns
        if not section.enabled:
            return
        from interknit.dns.setup import answers_panel, build_server

        server = build_server(section, self.config.services, self.metrics)
        state = self.registry.state
        server.sync(list(state.all_instances()), state.revision, initial=True)
        try:
            await server.start()
        except OSError as exc:
            raise NodeStartError(
                f"cannot listen on {section.listen} for DNS (dns.listen): {os_error(exc)}"
            ) from None

        def resync() -> None:
            server.sync(list(self.registry.state.all_instances()), self.registry.state.revision)

        self.registry.subscribe(server.apply_all, resync)
        self.on_stop(server.stop)
        host, _ = parse_hostport(section.listen, port_zero=True)
        self.listen["dns"] = f"{format_hostport(host, server.port)} (udp+tcp, zone {section.zone})"
        self.panels["dns"] = lambda: answers_panel(self.registry.state, section.zone)

    async def _start_proxy(self) -> None:
        if not self.config.listeners:
            return
        from interknit.proxy.component import ListenError, ProxyComponent

        proxy = ProxyComponent(
            self.config.listeners,
            state=lambda: self.registry.state,
            set_ejected=self.registry.set_ejected,
            metrics=self.metrics,
            secret=self._sticky_secret(),
            reuse_port=self.reuse_port,
            access_log_json=self.log_json,
            service_tls=service_tls(self.config.services),
        )
        self.registry.subscribe(proxy.on_events, proxy.on_resync)
        try:
            await proxy.start()
        except ListenError as exc:
            await proxy.stop()
            raise NodeStartError(str(exc)) from None
        self.proxy = proxy
        self._overloaded = proxy.overloaded
        self.listen.update(proxy.listen)
        self.panels.update(proxy.panels())
        self.on_stop(proxy.stop)

    async def _start_vip(self) -> None:
        if not self.config.vip.enabled:
            return
        from interknit.vip.component import VipComponent, VipStartError

        vip = VipComponent(self.config.vip, self.registry, self.config.node.name, self.metrics)
        try:
            await vip.start()
        except VipStartError as exc:
            await vip.stop()
            raise NodeStartError(str(exc)) from None
        self.panels["vips"] = vip.panel
        self.panels["vip_nodes"] = vip.nodes_panel
        self.listen["vip"] = f"{vip.address}:{self.config.vip.port} (udp adverts)"
        self.on_stop(vip.stop)

    def _sticky_secret(self) -> bytes:
        """A per-node key for sticky cookies, kept in data_dir so cookies survive restarts."""
        path = Path(self.config.node.data_dir) / "sticky.key"
        try:
            secret = path.read_bytes()
            if len(secret) >= 16:
                return secret
        except OSError:
            pass
        secret = os.urandom(32)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(secret)
        path.chmod(0o600)
        return secret

    def on_stop(self, hook: Callable[[], Any]) -> None:
        self._stop_hooks.append(hook)

    async def stop(self) -> None:
        """Stop accepting, let in-flight requests finish, close the store."""
        if self._stopping:
            return
        self._stopping = True
        log.info("node stopping", extra={"event": "node.stopping"})
        for hook in reversed(self._stop_hooks):
            result = hook()
            if asyncio.iscoroutine(result):
                await result
        if self._api_server is not None:
            self._api_server.close()
        if self._api_fast is not None:
            await self._api_fast.stop(self.drain_timeout)
        if self._runner is not None:
            await self._runner.cleanup()
        await self.registry.close()
        log.info("node stopped", extra={"event": "node.stopped"})

    async def reload(self) -> bool:
        """Re-read the config file and apply its listeners and routes without dropping open
        connections. A bad file changes nothing and is logged with the key at fault."""
        if self.config_path is None:
            return False
        self.check_api_tls(force=True)
        try:
            config = load_config(self.config_path)
        except ConfigError as exc:
            log.error(
                "config reload refused", extra={"event": "node.reload_failed", "error": str(exc)}
            )
            return False
        unchanged = ("node", "registry", "dns", "compat", "vip")
        for section in unchanged:
            if getattr(config, section) != getattr(self.config, section):
                log.warning(
                    "config section changed; it takes effect at the next restart",
                    extra={"event": "node.reload_partial", "section": section},
                )
        from interknit.proxy.component import ListenError

        try:
            if self.proxy is not None:
                await self.proxy.reload(config.listeners)
                for key in [k for k in self.listen if k.startswith("proxy.")]:
                    del self.listen[key]
                self.listen.update(self.proxy.listen)
            elif config.listeners:
                self.config = self.config.model_copy(update={"listeners": config.listeners})
                await self._start_proxy()
        except ListenError as exc:
            log.error(
                "config reload failed", extra={"event": "node.reload_failed", "error": str(exc)}
            )
            return False
        self.config = self.config.model_copy(
            update={"listeners": config.listeners, "services": config.services}
        )
        try:
            await self._sync_static_services()
        except RegistryError as exc:
            log.error(
                "static instances not updated",
                extra={"event": "node.reload_failed", "error": str(exc)},
            )
        log.info("config reloaded", extra={"event": "node.reloaded"})
        return True

    def reopen_logs(self) -> None:
        """SIGUSR1 (logrotate): open the access log files anew, here and in every worker."""
        if self._supervisor is not None:
            self._supervisor.signal_all(signal.SIGUSR1)
        if self.proxy is not None:
            self.proxy.reopen_access_logs()
        log.info("access logs reopened", extra={"event": "node.logs_reopened"})

    async def _watch_config(self, every: float = 1.0) -> None:
        """Reload when the config file changes, as SIGHUP does."""
        assert self.config_path is not None
        last = _mtime(self.config_path)
        while True:
            await asyncio.sleep(every)
            self.check_api_tls()
            now = _mtime(self.config_path)
            if now != last:
                # A file being written in place changes more than once: reload once it has
                # stood still for a moment, not from a half-written (perhaps empty) file.
                await asyncio.sleep(min(every, 0.2))
                if _mtime(self.config_path) != now:
                    continue
                last = now
                await self.reload()

    def check_api_tls(self, force: bool = False) -> None:
        """The API's certificate files changed (or ``force``, on SIGHUP): new handshakes get
        them, open connections stay; ticket keys rotate."""
        tls = self.api_tls
        if tls is None:
            return
        tls.rotate_tickets()
        if not force and not tls.files_changed():
            return
        from interknit.tls.files import TlsFileError

        try:
            tls.reload(tls.spec)
        except TlsFileError as exc:
            tls.stamps = tls.current_stamps()
            log.error(
                "tls reload refused: registry.tls.%s",
                exc,
                extra={"event": "node.tls_refused", "error": f"registry.tls.{exc}"},
            )
            return
        log.info("registry API certificates reloaded", extra={"event": "node.tls_reload"})

    async def run(self, started: Callable[[Node], None] | None = None) -> None:
        """Start, run until SIGINT or SIGTERM, reload on SIGHUP, then stop gracefully."""
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, stop.set)
        reloads: set[asyncio.Task[bool]] = set()

        def on_hup() -> None:
            if self._supervisor is not None:
                self._supervisor.signal_all(signal.SIGHUP)
            task = loop.create_task(self.reload())
            reloads.add(task)
            task.add_done_callback(reloads.discard)

        loop.add_signal_handler(signal.SIGHUP, on_hup)
        loop.add_signal_handler(signal.SIGUSR1, self.reopen_logs)
        watcher = None
        try:
            await self.start()
            if self.config_path is not None:
                watcher = loop.create_task(self._watch_config(), name="config-watch")
            if started is not None:
                started(self)
            await stop.wait()
        finally:
            if watcher is not None:
                watcher.cancel()
            await self.stop()


def _mtime(path: Path) -> float | None:
    try:
        return path.stat().st_mtime
    except OSError:
        return None


# An API client that has not finished its handshake by then is cut (and one whose close_notify
# does not come).
API_HANDSHAKE_TIMEOUT = 10.0


def bind_tcp(host: str, port: int, what: str, reuse_port: bool = False) -> socket.socket:
    """A listening TCP socket, or a NodeStartError that says which part could not listen."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if reuse_port:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        sock.bind((host, port))
        sock.listen(1024)
        sock.setblocking(False)
    except OSError as exc:
        sock.close()
        raise NodeStartError(
            f"cannot listen on {format_hostport(host, port)} for {what}: {os_error(exc)}"
        ) from None
    return sock
