"""``interknit demo``: a complete local system to try, in one process.

A node on the embedded store (in a fresh temporary data directory), six small backends (two
services, three instances each) registered with HTTP health checks, and a listener on
127.0.0.1:7480 that partitions ``/search`` and ``/signup`` between them. Backends can be stopped
and started from the status page or with ``interknit demo stop|start ID`` to watch failover.
"""

from __future__ import annotations

import asyncio
import json
import socket
import tempfile
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from aiohttp import web

from interknit.config import Config, parse_config
from interknit.node import Node

SERVICES = ("search", "signup")
INSTANCES = 3


@dataclass
class DemoBackend:
    """One sample backend: an aiohttp app that says who it is; stoppable, restartable."""

    service: str
    id: str
    port: int = 0
    requests: int = 0
    runner: web.AppRunner | None = None
    site: web.SockSite | None = None
    _sock: socket.socket | None = field(default=None, repr=False)

    @property
    def running(self) -> bool:
        return self.site is not None

    async def start(self) -> None:
        if self.running:
            return
        app = web.Application()
        app.router.add_get("/health", self._health)
        app.router.add_route("*", "/{tail:.*}", self._handle)
        self.runner = web.AppRunner(app, access_log=None, shutdown_timeout=0.5)
        await self.runner.setup()
        sock = socket.socket()
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(("127.0.0.1", self.port))
        self.port = sock.getsockname()[1]
        self.site = web.SockSite(self.runner, sock)
        await self.site.start()

    async def stop(self) -> None:
        if self.runner is not None:
            await self.runner.cleanup()
        self.runner = None
        self.site = None

    async def _health(self, request: web.Request) -> web.Response:
        return web.Response(text="ok")

    async def _handle(self, request: web.Request) -> web.Response:
        self.requests += 1
        # A little work, so that least_requests and demand control have something to see.
        await asyncio.sleep(0.005)
        body = {"service": self.service, "instance": self.id, "path": request.path_qs}
        return web.json_response(body, headers={"X-Backend": self.id})


def demo_config(data_dir: str, api: str, dns: str, proxy: str) -> Config:
    return parse_config(
        {
            "node": {"name": "demo", "data_dir": data_dir},
            "registry": {"listen": api},
            "dns": {"listen": dns},
            "listeners": [
                {
                    "name": "web",
                    "listen": proxy,
                    # The demo prints its instructions on stdout; its status page shows traffic.
                    "access_log": "off",
                    "routes": [
                        {
                            "match": {"path_prefix": "/search"},
                            "service": "search",
                            "balance": "least_requests",
                            "retries": {"attempts": 2},
                            "timeout": "2s",
                            "outlier": {"consecutive_failures": 3, "base_ejection_time": "10s"},
                            "demand": {"concurrency": "adaptive", "queue": 64},
                        },
                        {
                            "match": {"path_prefix": "/signup"},
                            "service": "signup",
                            "sticky": {"cookie": "ik_affinity"},
                            "timeout": "2s",
                        },
                    ],
                }
            ],
        }
    )


class Demo:
    def __init__(self, api: str, dns: str, proxy: str) -> None:
        self._tmp = tempfile.TemporaryDirectory(prefix="interknit-demo-")
        self.node = Node(demo_config(self._tmp.name, api, dns, proxy), drain_timeout=2.0)
        self.backends = {
            f"{service}-{n}": DemoBackend(service, f"{service}-{n}")
            for service in SERVICES
            for n in range(1, INSTANCES + 1)
        }
        self.node.route_hooks.append(self._routes)
        self.node.panels["demo_backends"] = self._panel

    def _panel(self) -> list[dict[str, Any]]:
        rows = []
        for b in self.backends.values():
            verb = "stop" if b.running else "start"
            rows.append(
                {
                    "backend": b.id,
                    "service": b.service,
                    "port": b.port,
                    "running": b.running,
                    "requests": b.requests,
                    "_actions": [
                        {
                            "label": verb,
                            "method": "PUT",
                            "url": f"/v1/demo/backends/{b.id}",
                            "body": {"running": not b.running},
                        }
                    ],
                }
            )
        return rows

    def _routes(self, app: web.Application) -> None:
        app.router.add_get("/v1/demo/backends", self._list)
        app.router.add_put("/v1/demo/backends/{id}", self._switch)

    async def _list(self, request: web.Request) -> web.Response:
        return web.json_response({"backends": self._panel()})

    async def _switch(self, request: web.Request) -> web.Response:
        backend = self.backends.get(request.match_info["id"])
        if backend is None:
            return web.json_response(
                {"error": f"no demo backend {request.match_info['id']!r}", "detail": None},
                status=404,
            )
        try:
            body = json.loads(await request.read())
            running = body["running"]
            if not isinstance(running, bool):
                raise TypeError
        except (ValueError, KeyError, TypeError):
            return web.json_response(
                {"error": "running: must be true or false", "detail": None}, status=400
            )
        if running:
            await backend.start()
        else:
            await backend.stop()
        return web.json_response({"backend": backend.id, "running": backend.running})

    async def run(self, started: Callable[[Demo], None]) -> None:
        try:
            for backend in self.backends.values():
                await backend.start()

            async def register(node: Node) -> None:
                from interknit.registry.model import Check, InstanceSpec

                check = Check(http="/health", interval=1.0, timeout=0.5, rise=2, fall=2)
                for backend in self.backends.values():
                    spec = InstanceSpec(address="127.0.0.1", port=backend.port, check=check)
                    await node.registry.register(backend.service, backend.id, spec)

            def on_started(node: Node) -> None:
                task = asyncio.get_running_loop().create_task(register(node))
                task.add_done_callback(lambda _: started(self))

            await self.node.run(on_started)
        finally:
            for backend in self.backends.values():
                await backend.stop()
            self._tmp.cleanup()


def instructions(demo: Demo) -> str:
    listen = demo.node.listen
    api = listen.get("api", "")
    proxy = listen.get("proxy.web", "").removeprefix("http://")
    dns_port = listen.get("dns", ":7453").split(" ")[0].rsplit(":", 1)[-1]
    return f"""interknit demo is running.

  status page  {api}/
  proxy        http://{proxy}  (/search -> search-1..3, /signup -> signup-1..3)
  registry     {api}/v1/services
  dns          127.0.0.1:{dns_port}

Try:
  curl -s http://{proxy}/search?q=knit
  curl -si http://{proxy}/signup | grep -i -e set-cookie -e x-backend
  interknit --api {api} instances search
  dig +short -p {dns_port} @127.0.0.1 search.ik.internal
  dig +short -p {dns_port} @127.0.0.1 _signup._tcp.ik.internal SRV
  interknit --api {api} demo stop search-2     # watch it turn critical; traffic moves away
  interknit --api {api} demo start search-2
  interknit --api {api} drain search search-1   # no new work for search-1

Stop with Ctrl-C."""


def run_demo(api: str, dns: str, proxy: str, started: Callable[[Demo], None]) -> None:
    from interknit.cli import run

    run(Demo(api, dns, proxy).run(started))
