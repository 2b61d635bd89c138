"""``interknit up --workers N``: N proxy processes share each listener with SO_REUSEPORT.

The node itself is the first worker. The other N-1 are ``interknit worker`` processes that run
only the proxy, each following the node's registry through its watch stream, so the kernel
spreads connections over N event loops on N cores while the registry stays one.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
import sys
from collections.abc import Sequence
from pathlib import Path

from prometheus_client import CollectorRegistry

from interknit import heap
from interknit.config import Config, ConfigError, load_config
from interknit.proxy.component import ListenError, ProxyComponent
from interknit.registry.config import service_tls
from interknit.registry.follower import Follower, local_ejections
from interknit.registry.model import Event
from interknit.tls.client import client_context

log = logging.getLogger("interknit.workers")


def _token(config: Config) -> str | None:
    tokens = config.registry.tokens
    found = tokens.read or tokens.write
    return found[0] if found else None


async def run_worker(config_path: str, api: str, log_json: bool = False) -> None:
    """One proxy-only worker: follow the node, serve the listeners, drain on SIGTERM; reload
    on SIGHUP and reopen its access logs on SIGUSR1, as the node does."""
    config = load_config(config_path)
    client_tls = config.registry.client_tls
    follower = Follower(
        api,
        _token(config),
        ssl_context=None if client_tls is None else client_context(client_tls.to_spec()),
    )
    await follower.start()
    secret_path = Path(config.node.data_dir) / "sticky.key"
    secret = secret_path.read_bytes() if secret_path.exists() else b"interknit-worker"
    proxy: ProxyComponent | None = None

    def apply(events: Sequence[Event]) -> None:
        if proxy is not None:
            proxy.on_events(events)

    proxy = ProxyComponent(
        config.listeners,
        state=lambda: follower.state,
        set_ejected=local_ejections(follower, apply),
        metrics=CollectorRegistry(auto_describe=True),
        secret=secret,
        reuse_port=True,
        access_log_json=log_json,
        service_tls=service_tls(config.services),
    )
    follower.subscribe(proxy.on_events, proxy.on_resync)
    await proxy.start()
    heap.settle()
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)

    async def reload() -> None:
        try:
            fresh = load_config(config_path)
        except ConfigError as exc:
            log.error(
                "config reload refused", extra={"event": "worker.reload_failed", "error": str(exc)}
            )
            return
        assert proxy is not None
        try:
            await proxy.reload(fresh.listeners)
        except ListenError as exc:
            log.error(
                "config reload failed", extra={"event": "worker.reload_failed", "error": str(exc)}
            )

    reloads: set[asyncio.Task[None]] = set()

    def on_hup() -> None:
        task = loop.create_task(reload())
        reloads.add(task)
        task.add_done_callback(reloads.discard)

    loop.add_signal_handler(signal.SIGHUP, on_hup)

    def on_usr1() -> None:
        assert proxy is not None
        proxy.reopen_access_logs()
        log.info("access logs reopened", extra={"event": "worker.logs_reopened"})

    loop.add_signal_handler(signal.SIGUSR1, on_usr1)
    try:
        await stop.wait()
    finally:
        await proxy.stop()
        await follower.close()


class Supervisor:
    """Starts the extra workers, restarts one that dies, and stops them all on the way out."""

    def __init__(
        self,
        count: int,
        config_path: str,
        api: str,
        *,
        log_json: bool = False,
        log_level: str = "info",
    ) -> None:
        self.count = count
        self.config_path = config_path
        self.api = api
        # The node's own logging options, so that a worker logs (and writes access lines) alike.
        self.options = ["--log-level", log_level, *(["--log-json"] if log_json else [])]
        self.procs: list[asyncio.subprocess.Process | None] = [None] * count
        self._tasks: list[asyncio.Task[None]] = []
        self._stopping = False

    async def start(self) -> None:
        for index in range(self.count):
            self._tasks.append(asyncio.create_task(self._keep(index), name=f"worker-{index}"))

    async def _keep(self, index: int) -> None:
        while not self._stopping:
            proc = await asyncio.create_subprocess_exec(
                sys.executable,
                "-m",
                "interknit",
                "worker",
                "-c",
                self.config_path,
                "--node-api",
                self.api,
                *self.options,
            )
            self.procs[index] = proc
            log.info("worker started", extra={"event": "worker.started", "pid": proc.pid})
            code = await proc.wait()
            if not self._stopping:
                log.error(
                    "worker exited; restarting",
                    extra={"event": "worker.exited", "pid": proc.pid, "code": code},
                )
                await asyncio.sleep(1.0)

    def signal_all(self, sig: int) -> None:
        for proc in self.procs:
            if proc is not None and proc.returncode is None:
                with contextlib.suppress(ProcessLookupError):
                    proc.send_signal(sig)

    async def stop(self, timeout: float) -> None:
        self._stopping = True
        self.signal_all(signal.SIGTERM)
        for proc in self.procs:
            if proc is None:
                continue
            try:
                async with asyncio.timeout(timeout):
                    await proc.wait()
            except TimeoutError:
                proc.kill()
                await proc.wait()
        for task in self._tasks:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
