"""Instructions per proxied request, counted by callgrind: an A/B of proxy code that a busy
machine cannot blur.

    .venv/bin/python bench/proxy_cost.py [--requests 3000] [--vary-path] [--browser]
        [--access-log] [--connections 8]
    .venv/bin/python bench/proxy_cost.py --ab COMMIT   # this tree against COMMIT's src/

One process runs a minimal backend, an HTTP listener (a static route, round robin, metrics
on, its pool taken from the pools a node gives its listeners, passive outlier detection on as
by default, so that each request picks and reports as in a node; a tree from before
``proxy/pool_feed.py`` has the listener's static pools instead, which do less; with
``--access-log`` its access log written to a file, or for a tree from before the listener's
``access_log`` key, the ``interknit.access`` logger at INFO written to a file as ``interknit
up`` formats it) and closed-loop clients on one uvloop loop, and is run
under ``valgrind --tool=callgrind`` twice, for N and 2N requests: the difference divided by N
is what one more request costs (start-up and warm-up cancel out). Client and backend are the
same few lines in both runs of an A/B, so a difference is the proxy's. Instructions are not
time (a cache miss or a kernel wake-up costs more than its count), so ``bench/proxy.py`` stays
the speed figure; this one says whether a change made the Python do more, on any machine.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
OK = b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nContent-Length: 2\r\n\r\nok"
HEAD = (
    b"GET %s HTTP/1.1\r\nHost: bench.test\r\nUser-Agent: bench/1.0\r\nAccept: */*\r\n"
    b"Accept-Language: en\r\nCookie: session=abc123; theme=dark\r\n\r\n"
)
# --browser: the head bench/proxy.py's browser traffic sends (see BROWSER_HEADERS there).
BROWSER_HEAD = (
    b"GET %s HTTP/1.1\r\nHost: shop.example.com\r\n"
    b"User-Agent: Mozilla/5.0 (X11; Linux x86_64) AppleWebKit/537.36 (KHTML, like Gecko) "
    b"Chrome/120.0.0.0 Safari/537.36\r\n"
    b"Accept: text/html,application/xhtml+xml,application/xml;q=0.9,image/avif,image/webp,"
    b"*/*;q=0.8\r\n"
    b"Accept-Language: en-GB,en;q=0.9,de;q=0.7\r\n"
    b"Accept-Encoding: gzip, deflate, br\r\n"
    b"Referer: https://shop.example.com/\r\n"
    b"Cookie: session=3f9a1c7e5b2d4a6f8e0c1b3d5f7a9c2e; cart=17; theme=dark; "
    b"_ga=GA1.2.1234567890.1700000000; consent=analytics:1,ads:0\r\n"
    b"Sec-Fetch-Dest: document\r\nSec-Fetch-Mode: navigate\r\nSec-Fetch-Site: same-origin\r\n"
    b"Upgrade-Insecure-Requests: 1\r\nCache-Control: max-age=0\r\n\r\n"
)


class Backend(asyncio.Protocol):
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport: asyncio.Transport = transport  # type: ignore[assignment]

    def data_received(self, data: bytes) -> None:
        self.transport.write(OK * data.count(b"\r\n\r\n"))


class Client(asyncio.Protocol):
    """Sends a request, waits for its whole answer, sends the next."""

    def __init__(self, run: Run) -> None:
        self.run = run
        self.buffer = b""

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport: asyncio.Transport = transport  # type: ignore[assignment]
        self.send()

    def send(self) -> None:
        self.transport.write(self.run.next_head())

    def data_received(self, data: bytes) -> None:
        self.buffer += data
        while len(self.buffer) >= len(OK):
            self.buffer = self.buffer[len(OK) :]
            if self.run.answered():
                self.send()


class Run:
    def __init__(self, requests: int, vary: bool, browser: bool) -> None:
        self.left = requests
        self.sent = 0
        self.vary = vary
        self.head = BROWSER_HEAD if browser else HEAD
        self.done = asyncio.get_running_loop().create_future()

    def next_head(self) -> bytes:
        self.sent += 1
        path = b"/item/%d?q=%d" % (self.sent, self.sent * 7) if self.vary else b"/item"
        return self.head % path

    def answered(self) -> bool:
        self.left -= 1
        if self.left <= 0:
            if not self.done.done():
                self.done.set_result(None)
            return False
        return self.left >= 0


async def serve(args: argparse.Namespace, log_path: str) -> None:
    from prometheus_client import CollectorRegistry

    from interknit.balance import make_balancer
    from interknit.proxy import ListenerSpec, RouteSpec, StaticPoolSource
    from interknit.proxy.listener import HttpListener

    loop = asyncio.get_running_loop()
    backend = await loop.create_server(Backend, "127.0.0.1", 0)
    upstream = f"127.0.0.1:{backend.sockets[0].getsockname()[1]}"
    routes = (RouteSpec(servers=(upstream,), name="r"),)
    if "access_log" in ListenerSpec.__dataclass_fields__:
        spec = ListenerSpec(
            name="bench",
            routes=routes,
            access_log=log_path if args.access_log else "off",
            access_log_json=args.log_json,
        )
    else:
        # A tree from before the access_log key: the access log was the logger's, written as
        # `interknit up` set it up (one formatted record per request).
        from interknit.logs import JsonFormatter, LogfmtFormatter

        access = logging.getLogger("interknit.access")
        access.setLevel(logging.INFO if args.access_log else logging.WARNING)
        handler = logging.FileHandler(log_path)
        handler.setFormatter(JsonFormatter() if args.log_json else LogfmtFormatter())
        access.addHandler(handler)
        spec = ListenerSpec(name="bench", routes=routes)
    metrics = CollectorRegistry()
    try:
        from interknit.proxy.outliers import PassiveHealth
        from interknit.proxy.pool_feed import RegistryPools
    except ImportError:  # a tree from before the node's pools: the listener's own
        pools: object = StaticPoolSource(lambda route: make_balancer(route.balance))
    else:
        # The pools a node gives its listeners, passive outlier detection on (the default).

        async def set_ejected(pool: str, key: str, until: float | None) -> None:
            pass

        passive = PassiveHealth(set_ejected, metrics)
        pools = RegistryPools(lambda: None, b"bench", reporter=passive.report)  # type: ignore[arg-type,return-value]
        pools.prepare(routes)
    listener = HttpListener(spec, pools, metrics=metrics)  # type: ignore[arg-type]
    await listener.start()
    run = Run(args.serve, args.vary_path, args.browser)
    for _ in range(args.connections):
        await loop.create_connection(lambda: Client(run), "127.0.0.1", listener.port)
    await run.done
    await listener.stop(0.1)


def count(python: str, src: Path, requests: int, args: argparse.Namespace) -> int:
    """Instructions callgrind counts for a whole run of ``requests``."""
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "callgrind.out"
        command = [
            "valgrind",
            "--tool=callgrind",
            f"--callgrind-out-file={out}",
            python,
            __file__,
            "--serve",
            str(requests),
            "--connections",
            str(args.connections),
        ]
        for flag in ("vary_path", "browser", "access_log", "log_json"):
            if getattr(args, flag):
                command.append("--" + flag.replace("_", "-"))
        env = {**os.environ, "INTERKNIT_BENCH_SRC": str(src), "PYTHONHASHSEED": "0"}
        result = subprocess.run(command, capture_output=True, text=True, env=env, check=True)
        match = re.search(r"Collected : (\d+)", result.stderr)
        assert match, result.stderr[-2000:]
        return int(match.group(1))


def per_request(python: str, src: Path, args: argparse.Namespace) -> float:
    n: int = args.requests
    return (count(python, src, 2 * n, args) - count(python, src, n, args)) / n


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--requests", type=int, default=3000)
    parser.add_argument("--connections", type=int, default=8)
    parser.add_argument("--vary-path", action="store_true", help="a path of its own per request")
    parser.add_argument(
        "--browser", action="store_true", help="a browser's head (13 fields, cookies)"
    )
    parser.add_argument("--access-log", action="store_true", help="the access log on, to a file")
    parser.add_argument("--log-json", action="store_true", help="the access log as JSON lines")
    parser.add_argument("--ab", metavar="COMMIT", help="also count COMMIT's src/ and compare")
    parser.add_argument("--serve", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.serve is not None:
        src = os.environ.get("INTERKNIT_BENCH_SRC")
        if src:
            sys.path.insert(0, src)
        import uvloop

        with tempfile.TemporaryDirectory() as tmp:
            uvloop.run(serve(args, str(Path(tmp) / "access.log")))
        return
    if shutil.which("valgrind") is None:
        sys.exit("valgrind is not installed (apt-get install valgrind)")
    python = sys.executable
    here = per_request(python, ROOT / "src", args)
    traffic = "varied paths" if args.vary_path else "one repeated head"
    traffic += ", a browser's head" if args.browser else ""
    traffic += ", access log on" if args.access_log else ", access log off"
    print(f"this tree: {here:,.0f} instructions per request ({traffic})")
    if args.ab:
        with tempfile.TemporaryDirectory() as tmp:
            subprocess.run(
                f"git -C {ROOT} archive {args.ab} src | tar -x -C {tmp}", shell=True, check=True
            )
            there = per_request(python, Path(tmp) / "src", args)
        print(f"{args.ab}: {there:,.0f} instructions per request")
        print(f"ratio this/{args.ab}: {here / there:.3f}")


if __name__ == "__main__":
    main()
