"""The proxy beside HAProxy and nginx, against the same two nginx backends, in one run.

    .venv/bin/python bench/proxy.py [--runs 3] [--duration 5] [--connections 50]

Two nginx backends (one worker each) answer every request with ``200 ok``. wrk (``-t1 -c50
--latency``) measures, in turn and ``--runs`` times over so that drift hits every case alike:
a backend directly; HAProxy 2.6 (``nbthread 1``, keep-alive to the backends, ``http-reuse
safe``); nginx as a proxy (one worker, upstream keepalive); an interknit node whose HTTP
listener routes to a registry service of the two backends (round robin, the realistic path:
routing, balancing, passive health, metrics); and interknit's TCP listener beside HAProxy in
``mode tcp``. Medians of requests per second and of p99 latency are printed with the ratio to
HAProxy (HTTP cases to HAProxy HTTP, the TCP case to HAProxy TCP).

On two or more cores every proxy is pinned to core 1 and wrk plus the backends to core 0
(``taskset``): unpinned, the proxies, wrk and the backends fight over both cores and the
figures are noise. Nothing logs per request (nginx ``access_log off``, HAProxy without
``log``, the node at ``--log-level warning``), so each does only its forwarding.

Last, the node's resident memory (VmRSS) is read with 1,000 client connections open, each
having sent one request and kept the connection alive.

wrk repeats one request; interknit reuses what it parsed of a request head it has seen on a
kept-alive connection. ``--vary-path`` gives every request a path of its own (a wrk Lua
script), which measures every proxy without that.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import re
import resource
import shutil
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import free_port, interknit_process, machine, median, process, rss_kib

NGINX = "/usr/sbin/nginx"
HAPROXY = "/usr/sbin/haproxy"
SERVICE = "bench"
HTTP_GOAL = 0.75  # requests per second, as a share of HAProxy's
P99_GOAL = 2.0  # p99 latency, at most this multiple of HAProxy's
TCP_GOAL = 0.9
RSS_GOAL_MIB = 60
BASELINE = "interknit http (baseline)"


@dataclass(frozen=True)
class Case:
    name: str
    port: int
    # The case whose figures this one is compared with (None: it is a reference itself).
    versus: str | None


@dataclass
class Sample:
    rps: float
    p99_ms: float
    errors: int


# Pinning


@dataclass(frozen=True)
class Pinning:
    proxy: tuple[str, ...]
    load: tuple[str, ...]
    note: str


def pinning() -> Pinning:
    cores = os.cpu_count() or 1
    if cores >= 2 and shutil.which("taskset"):
        return Pinning(
            ("taskset", "-c", "1"),
            ("taskset", "-c", "0"),
            f"pinned with taskset: each proxy on core 1, wrk and the backends on core 0 "
            f"({cores} cores)",
        )
    return Pinning((), (), f"NOT pinned ({cores} core(s) or no taskset): figures are noisy")


# Servers


def nginx_conf(prefix: Path, body: str) -> Path:
    """An nginx config of one worker that writes only inside ``prefix``."""
    user = "user root;\n" if os.geteuid() == 0 else ""
    temp = "\n".join(
        f"    {kind}_temp_path {prefix}/{kind}_temp;"
        for kind in ("client_body", "proxy", "fastcgi", "uwsgi", "scgi")
    )
    conf = prefix / "nginx.conf"
    conf.write_text(
        f"{user}worker_processes 1;\npid {prefix}/nginx.pid;\nerror_log {prefix}/error.log warn;\n"
        f"events {{ worker_connections 8192; }}\n"
        f"http {{\n    access_log off;\n{temp}\n{body}\n}}\n"
    )
    return conf


@contextlib.contextmanager
def nginx(tmp: Path, name: str, body: str, prefix: Sequence[str]) -> Iterator[None]:
    root = tmp / name
    root.mkdir()
    conf = nginx_conf(root, body)
    args = [*prefix, NGINX, "-c", str(conf), "-p", str(root), "-g", "daemon off;"]
    with process(args, log=root / "out.log"):
        yield


def backend_body(port: int) -> str:
    return (
        f"    server {{\n        listen 127.0.0.1:{port};\n        keepalive_requests 10000000;\n"
        f'        location / {{ return 200 "ok"; }}\n    }}'
    )


def nginx_proxy_body(port: int, backends: Sequence[int]) -> str:
    servers = "".join(f"        server 127.0.0.1:{b};\n" for b in backends)
    return (
        f"    upstream backends {{\n{servers}        keepalive 64;\n"
        f"        keepalive_requests 10000000;\n    }}\n"
        f"    server {{\n        listen 127.0.0.1:{port};\n        keepalive_requests 10000000;\n"
        f"        location / {{\n            proxy_pass http://backends;\n"
        f"            proxy_http_version 1.1;\n"
        f'            proxy_set_header Connection "";\n        }}\n    }}'
    )


def haproxy_cfg(path: Path, http_port: int, tcp_port: int, backends: Sequence[int]) -> Path:
    servers = "".join(f"    server b{i} 127.0.0.1:{b}\n" for i, b in enumerate(backends))
    path.write_text(
        "global\n    nbthread 1\n    maxconn 8000\n"
        "defaults\n    timeout connect 2s\n    timeout client 30s\n    timeout server 30s\n"
        f"frontend web\n    mode http\n    bind 127.0.0.1:{http_port}\n"
        "    option http-keep-alive\n    default_backend web\n"
        f"backend web\n    mode http\n    balance roundrobin\n    http-reuse safe\n{servers}"
        f"frontend relay\n    mode tcp\n    bind 127.0.0.1:{tcp_port}\n    default_backend relay\n"
        f"backend relay\n    mode tcp\n    balance roundrobin\n{servers}"
    )
    return path


def interknit_listeners(http_port: int, tcp_port: int) -> str:
    route = f'[[listeners.routes]]\nservice = "{SERVICE}"\nbalance = "round_robin"\n'
    return (
        f'[[listeners]]\nname = "web"\nlisten = "127.0.0.1:{http_port}"\nprotocol = "http"\n'
        f"{route}\n"
        f'[[listeners]]\nname = "relay"\nlisten = "127.0.0.1:{tcp_port}"\nprotocol = "tcp"\n'
        f"{route}"
    )


def register(api: str, backends: Sequence[int]) -> None:
    for i, port in enumerate(backends):
        body = json.dumps({"address": "127.0.0.1", "port": port}).encode()
        req = urllib.request.Request(
            f"{api}/v1/services/{SERVICE}/instances/b{i}", data=body, method="PUT"
        )
        req.add_header("Content-Type", "application/json")
        with urllib.request.urlopen(req, timeout=5) as r:
            assert r.status == 200, r.read()


def wait_ok(name: str, port: int, timeout: float = 15.0) -> None:
    """Until ``GET /`` on ``port`` answers 200 (for a proxy: its backends are known)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with (
            contextlib.suppress(OSError),
            urllib.request.urlopen(f"http://127.0.0.1:{port}/", timeout=1) as r,
        ):
            if r.status == 200:
                return
        time.sleep(0.05)
    raise RuntimeError(f"{name} (127.0.0.1:{port}) did not answer 200")


@contextlib.contextmanager
def baseline_env(src: str) -> Iterator[None]:
    """PYTHONPATH set to an older source tree while the baseline node starts."""
    old = os.environ.get("PYTHONPATH")
    os.environ["PYTHONPATH"] = str(Path(src).resolve())
    try:
        yield
    finally:
        if old is None:
            del os.environ["PYTHONPATH"]
        else:
            os.environ["PYTHONPATH"] = old


# Load


_UNITS = {"us": 0.001, "ms": 1.0, "s": 1000.0, "m": 60_000.0}


# For --vary-path: every request a path of its own, so that no request head repeats (interknit
# reuses the parse of a head it has seen before; this measures the path without that).
VARY_PATH_LUA = """
local n = 0
request = function()
    n = n + 1
    return wrk.format(nil, "/p" .. n)
end
"""


def wrk(
    port: int,
    seconds: float,
    connections: int,
    prefix: Sequence[str],
    script: Path | None = None,
) -> Sample:
    args = [
        *prefix,
        "wrk",
        "-t1",
        f"-c{connections}",
        f"-d{seconds:g}s",
        "--latency",
        *(["-s", str(script)] if script is not None else []),
        f"http://127.0.0.1:{port}/",
    ]
    out = subprocess.run(args, capture_output=True, text=True, check=True).stdout
    rps = re.search(r"Requests/sec:\s+([\d.]+)", out)
    p99 = re.search(r"99%\s+([\d.]+)(us|ms|s|m)\b", out)
    if rps is None or p99 is None:
        raise RuntimeError(f"cannot read wrk's output:\n{out}")
    errors = 0
    non2xx = re.search(r"Non-2xx or 3xx responses:\s+(\d+)", out)
    if non2xx:
        errors += int(non2xx.group(1))
    sock = re.search(r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)", out)
    if sock:
        errors += sum(int(g) for g in sock.groups())
    return Sample(float(rps.group(1)), float(p99.group(1)) * _UNITS[p99.group(2)], errors)


async def hold_connections(port: int, count: int) -> list[asyncio.StreamWriter]:
    """``count`` connections, each after one answered request, kept open."""
    request = b"GET / HTTP/1.1\r\nHost: bench\r\n\r\n"

    async def one() -> asyncio.StreamWriter:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(request)
        head = await reader.readuntil(b"\r\n\r\n")
        if not head.startswith(b"HTTP/1.1 200"):
            raise RuntimeError(f"unexpected answer: {head[:40]!r}")
        length = re.search(rb"(?i)content-length:\s*(\d+)", head)
        await reader.readexactly(int(length.group(1)) if length else 0)
        return writer

    writers: list[asyncio.StreamWriter] = []
    for start in range(0, count, 100):
        batch = await asyncio.gather(*(one() for _ in range(min(100, count - start))))
        writers.extend(batch)
    return writers


async def rss_with_connections(pid: int, port: int, count: int) -> tuple[int, int]:
    """The node's VmRSS (KiB) before, and with ``count`` kept-alive client connections."""
    before = rss_kib(pid)
    writers = await hold_connections(port, count)
    await asyncio.sleep(1.0)
    during = rss_kib(pid)
    for w in writers:
        w.close()
    return before, during


def load() -> str:
    """The load average: other work on the machine shows here, and skews the figures."""
    return " ".join(f"{x:.2f}" for x in os.getloadavg())


def raise_fd_limit(need: int) -> None:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < need:
        resource.setrlimit(resource.RLIMIT_NOFILE, (min(need, hard), hard))


# Report


def ratio(value: float, reference: float) -> str:
    return f"{value / reference:.2f}x" if reference > 0 else "-"


def report(
    cases: Sequence[Case],
    samples: dict[str, list[Sample]],
    rss: tuple[int, int] | None,
    held: int,
    pin: Pinning,
    args: argparse.Namespace,
) -> None:
    rps = {c.name: median([s.rps for s in samples[c.name]]) for c in cases}
    p99 = {c.name: median([s.p99_ms for s in samples[c.name]]) for c in cases}
    print()
    print(f"command: {' '.join(sys.argv)}")
    print(f"machine: {machine()}")
    print(f"load average (1, 5, 15 min) at the end: {load()}")
    print(f"pinning: {pin.note}")
    print(
        f"wrk -t1 -c{args.connections} -d{args.duration:g}s --latency; medians of {args.runs} "
        f'run(s); backends: 2 x nginx (1 worker, return 200 "ok")'
        + ("; every request a path of its own (--vary-path)" if args.vary_path else "")
    )
    print()
    header = f"{'case':<34} {'req/s':>9} {'p99 ms':>8} {'req/s ratio':>11} {'p99 ratio':>9} "
    print(header + f"{'errors':>6}")
    print("-" * (len(header) + 6))
    for c in cases:
        ref = c.versus
        r_rps = ratio(rps[c.name], rps[ref]) if ref else "-"
        r_p99 = ratio(p99[c.name], p99[ref]) if ref else "-"
        errors = sum(s.errors for s in samples[c.name])
        print(
            f"{c.name:<34} {rps[c.name]:>9.0f} {p99[c.name]:>8.2f} {r_rps:>11} {r_p99:>9} "
            f"{errors:>6}"
        )
    print("(ratios: HTTP cases to HAProxy HTTP, the TCP relay to HAProxy mode tcp)")
    print()
    http_r = rps["interknit http"] / rps["haproxy http"]
    p99_r = p99["interknit http"] / p99["haproxy http"]
    tcp_r = rps["interknit tcp"] / rps["haproxy tcp"]

    def verdict(ok: bool) -> str:
        return "met" if ok else "NOT met"

    print(
        f"goal HTTP >= {HTTP_GOAL}x HAProxy req/s and p99 <= {P99_GOAL:g}x: "
        f"{http_r:.2f}x, p99 {p99_r:.2f}x -> {verdict(http_r >= HTTP_GOAL and p99_r <= P99_GOAL)}"
    )
    print(f"goal TCP >= {TCP_GOAL}x HAProxy mode tcp: {tcp_r:.2f}x -> {verdict(tcp_r >= TCP_GOAL)}")
    if rss is not None:
        before, during = rss
        print(
            f"interknit node RSS: {before / 1024:.1f} MiB idle after the runs, "
            f"{during / 1024:.1f} MiB with {held} open keep-alive connections -> "
            f"{verdict(during / 1024 < RSS_GOAL_MIB)} (goal < {RSS_GOAL_MIB} MiB)"
        )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--duration", type=float, default=5.0, help="seconds per wrk run")
    parser.add_argument("--connections", type=int, default=50)
    parser.add_argument("--hold", type=int, default=1000, help="connections for the RSS figure")
    parser.add_argument(
        "--only", default="", help="comma-separated case names to run (default: all)"
    )
    parser.add_argument(
        "--vary-path",
        action="store_true",
        help="give every request a path of its own (no request head repeats)",
    )
    parser.add_argument(
        "--baseline",
        default="",
        help="a copy of an older src/ tree: adds an 'interknit http (baseline)' case, a second "
        "node run from it (PYTHONPATH), so that a change is measured against it in one run",
    )
    args = parser.parse_args()
    for tool in (NGINX, HAPROXY):
        if not Path(tool).exists():
            raise SystemExit(f"{tool} is not installed (apt-get install nginx haproxy)")
    if shutil.which("wrk") is None:
        raise SystemExit("wrk is not installed (apt-get install wrk)")
    raise_fd_limit(args.hold + 256)
    pin = pinning()
    print(f"pinning: {pin.note}; load average {load()}", flush=True)

    backends = [free_port(), free_port()]
    names = ("haproxy", "haproxy_tcp", "nginx", "ik", "ik_tcp", "base", "base_tcp")
    ports = {name: free_port() for name in names}
    cases = [
        Case("direct to a backend", backends[0], None),
        Case("haproxy http", ports["haproxy"], None),
        Case("nginx proxy", ports["nginx"], "haproxy http"),
        Case("interknit http", ports["ik"], "haproxy http"),
        *([Case(BASELINE, ports["base"], "haproxy http")] if args.baseline else []),
        Case("haproxy tcp", ports["haproxy_tcp"], None),
        Case("interknit tcp", ports["ik_tcp"], "haproxy tcp"),
    ]
    only = {n.strip() for n in args.only.split(",") if n.strip()}
    run_cases = [c for c in cases if not only or c.name in only]

    with contextlib.ExitStack() as stack:
        tmp = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="proxy-bench-")))
        for i, port in enumerate(backends):
            stack.enter_context(nginx(tmp, f"backend{i}", backend_body(port), pin.load))
        stack.enter_context(
            nginx(tmp, "proxy", nginx_proxy_body(ports["nginx"], backends), pin.proxy)
        )
        cfg = haproxy_cfg(tmp / "haproxy.cfg", ports["haproxy"], ports["haproxy_tcp"], backends)
        stack.enter_context(process([*pin.proxy, HAPROXY, "-f", str(cfg), "-db"]))
        api, node = stack.enter_context(
            interknit_process(
                interknit_listeners(ports["ik"], ports["ik_tcp"]),
                prefix=pin.proxy,
                options=["--log-level", "warning"],
            )
        )
        register(api, backends)
        if args.baseline:
            with baseline_env(args.baseline):
                base_api, _ = stack.enter_context(
                    interknit_process(
                        interknit_listeners(ports["base"], ports["base_tcp"]),
                        prefix=pin.proxy,
                        options=["--log-level", "warning"],
                    )
                )
            register(base_api, backends)
        for c in cases:
            wait_ok(c.name, c.port)
        print(f"interknit node pid {node.pid}; warming up", flush=True)
        script = None
        if args.vary_path:
            script = tmp / "vary-path.lua"
            script.write_text(VARY_PATH_LUA)
        for c in run_cases:
            wrk(c.port, 1, args.connections, pin.load, script)

        samples: dict[str, list[Sample]] = {c.name: [] for c in cases}
        for run in range(args.runs):
            for c in run_cases:
                s = wrk(c.port, args.duration, args.connections, pin.load, script)
                samples[c.name].append(s)
                print(
                    f"run {run + 1}/{args.runs} {c.name:<26} {s.rps:>9.0f} req/s "
                    f"p99 {s.p99_ms:.2f} ms errors {s.errors} load {load()}",
                    flush=True,
                )
        rss = None
        if args.hold > 0:
            rss = asyncio.run(rss_with_connections(node.pid, ports["ik"], args.hold))
        if only:
            for c in cases:
                if not samples[c.name]:
                    samples[c.name].append(Sample(float("nan"), float("nan"), 0))
        report(cases, samples, rss, args.hold, pin, args)


if __name__ == "__main__":
    main()
