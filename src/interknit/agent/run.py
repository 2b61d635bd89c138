"""``interknit run``: the asyncio shell around the supervisor's state machine.

It spawns the child in a process group of its own, reaps it (and any other child, as PID 1
must), runs the checks, listens on the notify socket, turns signals into inputs, and carries
out the machine's actions: registry writes in order on one task, signals at once. The machine
(``supervisor.py``) decides everything else.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
import socket
import subprocess
import tempfile
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from interknit.agent.probe import http_check, tcp_check
from interknit.agent.registry_api import RegistryApi, Reply, instance_path
from interknit.agent.supervisor import Action, Settings, Supervisor, WriteKind, WriteResult
from interknit.durations import format_duration

log = logging.getLogger("interknit.agent.run")

STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT)
FORWARDED = (
    signal.SIGHUP,
    signal.SIGQUIT,
    signal.SIGUSR1,
    signal.SIGUSR2,
    signal.SIGWINCH,
    signal.SIGALRM,
)
MAX_NOTIFY = 4096
# How long the last deregistration may take before the supervisor exits anyway (the lease
# removes the instance in the end).
FINAL_WRITES_TIMEOUT = 10.0


@dataclass(frozen=True, slots=True)
class RunSpec:
    """What to run and how to register it (checked by the CLI)."""

    service: str
    instance_id: str
    address: str
    port: int
    command: Sequence[str]
    settings: Settings
    owner: str
    http_check: str | None = None
    check_timeout: float = 1.0
    tags: Sequence[str] = ()
    weight: int = 1
    zone: str | None = None
    region: str | None = None
    meta: Mapping[str, str] = field(default_factory=dict)

    def body(self) -> dict[str, Any]:
        """The registration: a lease of ``ttl`` that ends the instance when it runs out (the
        supervisor renews it; if the supervisor dies, nothing else will)."""
        body: dict[str, Any] = {
            "address": self.address,
            "port": self.port,
            "weight": self.weight,
            "tags": list(self.tags),
            "meta": {**self.meta, "owner": self.owner},
            "check": {"ttl": format_duration(self.settings.ttl), "deregister_after": "0s"},
        }
        if self.zone:
            body["zone"] = self.zone
        if self.region:
            body["region"] = self.region
        return body


class Runner:
    """One ``interknit run`` from spawn to exit."""

    def __init__(self, spec: RunSpec, api: RegistryApi) -> None:
        self.spec = spec
        self.api = api
        self.loop = asyncio.get_running_loop()
        self.machine = Supervisor(spec.settings, self.loop.time())
        self.child: subprocess.Popen[bytes] | None = None
        self.wake = asyncio.Event()
        self.writes: asyncio.Queue[WriteKind] = asyncio.Queue()
        self.exit_code: int | None = None
        self.tasks: set[asyncio.Task[None]] = set()
        self.last_check_output = ""
        self.notify_dir = tempfile.mkdtemp(prefix="interknit-run-")
        self.notify_path = str(Path(self.notify_dir) / "notify.sock")
        self.notify = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.notify.bind(self.notify_path)
        self.notify.setblocking(False)

    # ------------------------------------------------------------------ main loop

    async def run(self) -> int:
        loop = self.loop
        for sig in STOP_SIGNALS:
            loop.add_signal_handler(sig, self._on_stop, sig)
        for sig in FORWARDED:
            loop.add_signal_handler(sig, self._forward, sig)
        loop.add_signal_handler(signal.SIGCHLD, self._reap)
        loop.add_reader(self.notify.fileno(), self._on_notify)
        writer = asyncio.create_task(self._write_loop(), name="interknit-run-writes")
        try:
            self._perform(self.machine.start(loop.time()))
            while self.exit_code is None:
                self._perform(self.machine.tick(loop.time()))
                if self.exit_code is not None:
                    break
                deadline = self.machine.next_deadline()
                timeout = None if deadline is None else max(0.0, deadline - loop.time())
                self.wake.clear()
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self.wake.wait(), timeout)
            # The deregistration (queued before ``exit``) goes out before we leave.
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self.writes.join(), FINAL_WRITES_TIMEOUT)
            log.info("exiting", extra={"event": "run.exit", "status": self.exit_code})
            return self.exit_code
        finally:
            writer.cancel()
            for task in [writer, *self.tasks]:
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError, Exception):
                    await task
            for sig in (*STOP_SIGNALS, *FORWARDED, signal.SIGCHLD):
                loop.remove_signal_handler(sig)
            loop.remove_reader(self.notify.fileno())
            self.notify.close()
            with contextlib.suppress(OSError):
                os.unlink(self.notify_path)
                os.rmdir(self.notify_dir)

    def _perform(self, actions: list[Action]) -> None:
        for action in actions:
            kind = action.kind
            if kind == "spawn":
                self._spawn()
            elif kind == "check":
                self._spawn_task(self._check())
            elif kind in ("register", "renew", "set_draining", "deregister"):
                self.writes.put_nowait(kind)
            elif kind == "term":
                log.info(
                    "stopping the child",
                    extra={"event": "run.term", "pid": self._pid(), "signal": "SIGTERM"},
                )
                self._signal_group(signal.SIGTERM)
            elif kind == "kill":
                log.warning(
                    "the child outlived its stop timeout",
                    extra={"event": "run.kill", "pid": self._pid(), "signal": "SIGKILL"},
                )
                self._signal_group(signal.SIGKILL)
            elif kind == "exit":
                self.exit_code = action.code
        self.wake.set()

    def _spawn_task(self, coro: Any) -> None:
        task = asyncio.create_task(coro)
        self.tasks.add(task)
        task.add_done_callback(self.tasks.discard)

    def _pid(self) -> int | None:
        return None if self.child is None else self.child.pid

    # ------------------------------------------------------------------ the child

    def _spawn(self) -> None:
        spec = self.spec
        env = {
            **os.environ,
            "PORT": str(spec.port),
            "NOTIFY_SOCKET": self.notify_path,
            "INTERKNIT_SERVICE": spec.service,
            "INTERKNIT_ID": spec.instance_id,
        }
        now = self.loop.time()
        try:
            # A process group of its own: a stop reaches the whole tree the child started, and a
            # Ctrl-C at the terminal reaches the supervisor, which drains first.
            self.child = subprocess.Popen(list(spec.command), env=env, process_group=0)
        except OSError as exc:
            code = 127 if isinstance(exc, FileNotFoundError) else 126
            log.error(
                f"cannot start {spec.command[0]}: {exc.strerror or exc}",
                extra={"event": "run.spawn_failed", "status": code},
            )
            self.child = None
            self._perform(self.machine.on_child_exit(code, now))
            return
        log.info(
            "child started",
            extra={"event": "run.started", "pid": self.child.pid, "port": spec.port},
        )
        self._perform(self.machine.on_spawned(now))
        self._reap()

    def _reap(self) -> None:
        """Collect every child that ended: ours is reported, others (orphans handed to us as
        PID 1) are only buried."""
        while True:
            try:
                pid, status = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                return
            if pid == 0:
                return
            child = self.child
            if child is None or pid != child.pid:
                continue
            code = os.waitstatus_to_exitcode(status)
            child.returncode = code  # reaped here: Popen must not wait for it again
            self.child = None
            log.log(
                logging.INFO if code == 0 else logging.WARNING,
                "child exited",
                extra={"event": "run.child_exited", "pid": pid, "status": code},
            )
            self._perform(self.machine.on_child_exit(code, self.loop.time()))

    def _signal_group(self, sig: signal.Signals) -> None:
        if self.child is None:
            return
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self.child.pid, sig)

    def _forward(self, sig: signal.Signals) -> None:
        if self.child is not None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(self.child.pid, sig)

    def _on_stop(self, sig: signal.Signals) -> None:
        log.info(
            f"got {sig.name}",
            extra={"event": "run.stop", "signal": sig.name, "phase": self.machine.phase},
        )
        self._perform(self.machine.on_stop(self.loop.time()))

    def _on_notify(self) -> None:
        while True:
            try:
                data = self.notify.recv(MAX_NOTIFY)
            except (BlockingIOError, InterruptedError):
                return
            except OSError:
                return
            fields = dict(
                line.partition("=")[::2]
                for line in data.decode("utf-8", "replace").splitlines()
                if "=" in line
            )
            if fields.get("STATUS"):
                log.info("child status", extra={"event": "run.notify", "status": fields["STATUS"]})
            if fields.get("READY") == "1":
                log.info("child says it is ready", extra={"event": "run.notify_ready"})
                self._perform(self.machine.on_notify(True, self.loop.time()))

    async def _check(self) -> None:
        spec = self.spec
        if spec.http_check is not None:
            passed, output = await http_check(
                spec.address, spec.port, spec.http_check, spec.check_timeout
            )
        else:
            passed, output = await tcp_check(spec.address, spec.port, spec.check_timeout)
        if output != self.last_check_output and self.machine.ever_ready:
            log.log(
                logging.INFO if passed else logging.WARNING,
                "check result changed",
                extra={"event": "run.check", "passed": passed, "output": output},
            )
        self.last_check_output = output
        before = self.machine.phase
        self._perform(self.machine.on_check(passed, self.loop.time()))
        after = self.machine.phase
        if before == "starting" and after == "ready":
            log.info("child is ready", extra={"event": "run.ready", "output": output})
        elif before == "ready" and after == "starting":
            log.warning(
                "child failed its checks: taken out until it passes again",
                extra={"event": "run.unready", "output": output},
            )

    # ------------------------------------------------------------------ registry writes

    async def _write_loop(self) -> None:
        spec = self.spec
        warned = False
        while True:
            kind = await self.writes.get()
            try:
                if kind == "register":
                    reply = await self.api.register(spec.service, spec.instance_id, spec.body())
                elif kind == "renew":
                    reply = await self.api.heartbeat(spec.service, spec.instance_id)
                elif kind == "set_draining":
                    reply = await self.api.set_health(spec.service, spec.instance_id, "draining")
                else:
                    reply = await self._deregister()
                result: WriteResult = reply.result
                if result == "failed":
                    if not warned or reply.refused:
                        log.warning(
                            f"registry write failed: {reply.error}",
                            extra={"event": "run.registry_failed", "write": kind},
                        )
                    warned = True
                else:
                    if warned:
                        log.info("registry reachable again", extra={"event": "run.registry_ok"})
                    warned = False
                    if kind in ("register", "set_draining", "deregister"):
                        log.info(
                            f"{kind}: {spec.service}/{spec.instance_id}",
                            extra={
                                "event": f"run.{kind}",
                                "address": f"{spec.address}:{spec.port}",
                                "result": result,
                            },
                        )
                self._perform(self.machine.on_write(kind, result, self.loop.time()))
            finally:
                self.writes.task_done()

    async def _deregister(self) -> Reply:
        """Remove the instance, unless another owner registered the same id since (a
        replacement started with the same ``--id``): never delete what is not ours."""
        spec = self.spec
        reply = await self.api.request("GET", instance_path(spec.service, spec.instance_id))
        if reply.result == "ok" and isinstance(reply.body, dict):
            owner = (reply.body.get("meta") or {}).get("owner")
            if owner != spec.owner:
                log.warning(
                    f"{spec.service}/{spec.instance_id} now belongs to {owner}; left alone",
                    extra={"event": "run.not_owner"},
                )
                return reply
        return await self.api.deregister(spec.service, spec.instance_id)


async def supervise(spec: RunSpec, api: RegistryApi) -> int:
    runner = Runner(spec, api)
    try:
        return await runner.run()
    finally:
        await api.close()
