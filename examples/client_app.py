"""A small service that uses interknit's discovery client.

It serves ``GET /`` (who am I) on a port of its own, registers itself in interknit with a TTL
that it renews in the background, and, with ``--call SERVICE``, calls an instance of another
service once a second, chosen by the client-side balancer. Stop it with Ctrl-C: it deregisters
on the way out.

    interknit up &
    python examples/client_app.py --service clock &
    python examples/client_app.py --service greeter --call clock --count 5

While every registry node is down it keeps calling the instances it last saw, and says so.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import signal
import socket
import sys
from typing import Any

import aiohttp
from aiohttp import web

from interknit.client import AsyncClient, DiscoveryError, url


async def serve(service: str, instance_id: str, host: str, port: int) -> web.AppRunner:
    async def whoami(request: web.Request) -> web.Response:
        return web.json_response({"service": service, "id": instance_id})

    app = web.Application()
    app.router.add_get("/", whoami)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    await web.TCPSite(runner, host, port).start()
    return runner


async def call_loop(client: AsyncClient, target: str, count: int, every: float) -> None:
    done = 0
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=2)) as http:
        while count <= 0 or done < count:
            tried: set[str] = set()
            try:
                # Two attempts: a retry goes to another instance.
                for _ in range(2):
                    instance = await client.pick(target, exclude=tried)
                    tried.add(instance.id)
                    try:
                        async with http.get(url(instance, "/")) as resp:
                            answer = await resp.json()
                        lookup = await client.instances(target)
                        note = " (registry unreachable: cached answer)" if lookup.stale else ""
                        print(f"called {target}: {answer}{note}", flush=True)
                        done += 1
                        break
                    except (aiohttp.ClientError, TimeoutError) as exc:
                        print(f"{instance.id} failed: {exc!r}", flush=True)
            except DiscoveryError as exc:
                print(f"cannot find {target}: {exc}", flush=True)
            await asyncio.sleep(every)


def free_port(host: str) -> int:
    with socket.socket() as sock:
        sock.bind((host, 0))
        return int(sock.getsockname()[1])


async def main() -> int:
    parser = argparse.ArgumentParser(description="A small service that uses interknit discovery.")
    parser.add_argument("--service", required=True, help="the service this app is")
    parser.add_argument("--id", default=None, help="instance id (default: SERVICE-PID)")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=0, help="0 picks a free port")
    parser.add_argument(
        "--api",
        default=os.environ.get("INTERKNIT_API", "http://127.0.0.1:7470"),
        help="registry nodes, comma separated (INTERKNIT_API)",
    )
    parser.add_argument("--ttl", default="3s", help="lease renewed in the background")
    parser.add_argument("--call", default=None, help="a service to call once a second")
    parser.add_argument("--count", type=int, default=0, help="stop after N calls (0: never)")
    parser.add_argument("--every", type=float, default=1.0, help="seconds between calls")
    args = parser.parse_args()

    instance_id = args.id or f"{args.service}-{os.getpid()}"
    port = args.port or free_port(args.host)
    runner = await serve(args.service, instance_id, args.host, port)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)

    async with (
        AsyncClient(args.api) as client,
        client.register(args.service, instance_id, address=args.host, port=port, ttl=args.ttl),
    ):
        print(f"{instance_id} serving on {args.host}:{port}, registered", flush=True)
        waiters: list[asyncio.Task[Any]] = [asyncio.create_task(stop.wait())]
        if args.call:
            waiters.append(
                asyncio.create_task(call_loop(client, args.call, args.count, args.every))
            )
        await asyncio.wait(waiters, return_when=asyncio.FIRST_COMPLETED)
        for task in waiters:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
    print(f"{instance_id} deregistered", flush=True)
    await runner.cleanup()
    return 0


if __name__ == "__main__":
    sys.exit(asyncio.run(main()))
