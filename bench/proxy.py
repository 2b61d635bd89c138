"""The proxy beside HAProxy and nginx, against the same two nginx backends, in one run.

    .venv/bin/python bench/proxy.py [--runs 3] [--duration 5] [--connections 50]
        [--traffic browser|path|repeat] [--no-access-log] [--log-json] [--workers 2]

Two nginx backends (one worker each) answer every request with ``200 ok``. wrk (``-t1 -c50
--latency``) measures, in turn and ``--runs`` times over so that drift hits every case alike:
a backend directly; HAProxy 2.6 (``nbthread 1``, keep-alive to the backends, ``http-reuse
safe``); nginx as a proxy (one worker, upstream keepalive); an interknit node whose HTTP
listener routes to a registry service of the two backends (round robin, the realistic path:
routing, balancing, passive health, metrics); and interknit's TCP listener beside HAProxy in
``mode tcp``. Medians of requests per second and of p99 latency are printed with the ratio to
HAProxy (HTTP cases to HAProxy HTTP, the TCP case to HAProxy TCP).

**Traffic** (``--traffic``). ``browser``, the default and the headline: a wrk Lua script gives
every request a path and query of its own (no request head ever repeats) and the head a
browser sends: 13 fields with a user agent, cookies, Accept-*, Referer and the Sec-Fetch
fields, about 750 bytes. ``path``: wrk's plain head (Host only) with a path of its own per
request. ``repeat``: wrk's one request, the same bytes every time, which interknit's head cache
answers without parsing (see docs/proxy.md, "Two shortcuts"): no user's traffic looks like it.

**Access logs.** HAProxy and nginx log nothing (no ``log``, ``access_log off``). interknit's
``web`` listener writes its access log to a file (the default; ``--no-access-log`` turns it
off, ``--log-json`` makes it JSON lines): that is the case named ``interknit http``. The same
node's ``web-nolog`` listener (``access_log = "off"``) is the case ``interknit http (no log)``,
which prices the log.

**Pinning.** On two or more cores every proxy is pinned to core 1 and wrk plus the backends to
core 0 (``taskset``): unpinned, the proxies, wrk and the backends fight over both cores and the
figures are noise. On a small machine core 0 is then the limit: wrk and two nginx backends
there answer a bounded number of requests per second whatever the proxy, so requests per
second cannot tell the proxies apart. Two more figures can: each proxy's **CPU time per
request** (user + system time of its processes from ``/proc/PID/stat`` over the run, divided by
the requests wrk counted), and each core's **busy share** over the run (``/proc/stat``): where
the load core is (nearly) full, the client side is the limit, and a proxy's capacity on its
core is 1 / its CPU per request.

**Workers** (``--workers N``, default 2; 1 skips it). After the pinned runs every process is
unpinned (``taskset -a -p``) and wrk runs unpinned too: HAProxy with ``nbthread 1`` and with
``nbthread N``, interknit's node alone and ``interknit up --workers N``, all on the same
cores as the scheduler likes. For each, the share of another core it gains is its requests per
second with N over those with one, minus one (N=2: 100% would be perfect scaling).

Last, the node's resident memory (VmRSS) is read with 1,000 client connections open, each
having sent one request and kept the connection alive.
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
from dataclasses import dataclass, field
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import free_port, interknit_process, machine, median, process, rss_kib

NGINX = "/usr/sbin/nginx"
HAPROXY = "/usr/sbin/haproxy"
SERVICE = "bench"
HTTP_GOAL = 0.75  # requests per second (or capacity), as a share of HAProxy's
P99_GOAL = 1.5  # p99 latency, at most this multiple of HAProxy's
TCP_GOAL = 0.9
LOG_COST_GOAL = 0.10  # the access log may cost this share of CPU per request, at most
RSS_GOAL_MIB = 60
CLIENT_BOUND = 0.95  # a core this busy is the limit
BASELINE = "interknit http (baseline)"
NO_LOG = "interknit http (no log)"
CLOCK_TICK = os.sysconf("SC_CLK_TCK")


@dataclass(frozen=True)
class Case:
    name: str
    port: int
    # The case whose figures this one is compared with (None: it is a reference itself).
    versus: str | None
    # The process whose CPU time (with its children's) is the proxy's; None: not measured.
    pid: int | None = None
    # Unpinned (the workers section): wrk runs unpinned too.
    unpinned: bool = False


@dataclass
class Sample:
    rps: float
    p99_ms: float
    errors: int
    requests: int = 0
    cpu_us: float = float("nan")  # the proxy's CPU time per request, microseconds
    user_us: float = float("nan")  # of which in user space
    # Over the run, in cores: the proxy's processes, the load's (wrk and the backends), and
    # everything else on the machine (other work skews the figures).
    busy: tuple[float, ...] = ()


@dataclass
class Samples:
    runs: list[Sample] = field(default_factory=list)

    def median(self, attr: str) -> float:
        values = [getattr(s, attr) for s in self.runs]
        return median(values) if values else float("nan")

    def busy(self) -> tuple[float, ...]:
        if not self.runs or not self.runs[0].busy:
            return ()
        return tuple(median([s.busy[i] for s in self.runs]) for i in range(3))


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


def tree(pid: int) -> list[int]:
    """``pid`` and its descendants (nginx's workers, interknit's worker processes)."""
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        with contextlib.suppress(OSError, ValueError, IndexError):
            stat = (entry / "stat").read_text()
            ppid = int(stat[stat.rindex(")") + 2 :].split()[1])
            children.setdefault(ppid, []).append(int(entry.name))
    out, todo = [], [pid]
    while todo:
        current = todo.pop()
        out.append(current)
        todo.extend(children.get(current, ()))
    return out


def unpin(pid: int) -> None:
    """Let ``pid``, its threads and its descendants run on every core."""
    cores = f"0-{(os.cpu_count() or 1) - 1}"
    for member in tree(pid):
        subprocess.run(
            ["taskset", "-a", "-p", "-c", cores, str(member)], capture_output=True, check=False
        )


# CPU accounting


def cpu_times(pid: int) -> tuple[float, float]:
    """User and system time of ``pid`` and its descendants (all threads), in seconds."""
    user = system = 0
    for member in tree(pid):
        with contextlib.suppress(OSError, ValueError, IndexError):
            stat = Path(f"/proc/{member}/stat").read_text()
            fields = stat[stat.rindex(")") + 2 :].split()
            user += int(fields[11])  # utime, field 14
            system += int(fields[12])  # stime, field 15
    return user / CLOCK_TICK, system / CLOCK_TICK


def cpu_seconds(pid: int) -> float:
    return sum(cpu_times(pid))


def machine_busy() -> float:
    """Seconds of CPU the whole machine has spent busy since boot (all cores)."""
    values = [int(v) for v in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    return (sum(values) - values[3] - values[4]) / CLOCK_TICK  # all but idle and iowait


def children_cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


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
def nginx(tmp: Path, name: str, body: str, prefix: Sequence[str]) -> Iterator[int]:
    root = tmp / name
    root.mkdir()
    conf = nginx_conf(root, body)
    args = [*prefix, NGINX, "-c", str(conf), "-p", str(root), "-g", "daemon off;"]
    with process(args, log=root / "out.log") as proc:
        yield proc.pid


def backend_body(port: int) -> str:
    return (
        f"    server {{\n        listen 127.0.0.1:{port};\n        keepalive_requests 10000000;\n"
        f"        large_client_header_buffers 4 16k;\n"
        f'        location / {{ return 200 "ok"; }}\n    }}'
    )


def nginx_proxy_body(port: int, backends: Sequence[int]) -> str:
    servers = "".join(f"        server 127.0.0.1:{b};\n" for b in backends)
    return (
        f"    upstream backends {{\n{servers}        keepalive 64;\n"
        f"        keepalive_requests 10000000;\n    }}\n"
        f"    server {{\n        listen 127.0.0.1:{port};\n        keepalive_requests 10000000;\n"
        f"        large_client_header_buffers 4 16k;\n"
        f"        location / {{\n            proxy_pass http://backends;\n"
        f"            proxy_http_version 1.1;\n"
        f'            proxy_set_header Connection "";\n        }}\n    }}'
    )


def haproxy_cfg(
    path: Path, http_port: int, tcp_port: int | None, backends: Sequence[int], threads: int = 1
) -> Path:
    servers = "".join(f"    server b{i} 127.0.0.1:{b}\n" for i, b in enumerate(backends))
    text = (
        f"global\n    nbthread {threads}\n    maxconn 8000\n"
        "defaults\n    timeout connect 2s\n    timeout client 30s\n    timeout server 30s\n"
        f"frontend web\n    mode http\n    bind 127.0.0.1:{http_port}\n"
        "    option http-keep-alive\n    default_backend web\n"
        f"backend web\n    mode http\n    balance roundrobin\n    http-reuse safe\n{servers}"
    )
    if tcp_port is not None:
        text += (
            f"frontend relay\n    mode tcp\n    bind 127.0.0.1:{tcp_port}\n"
            "    default_backend relay\n"
            f"backend relay\n    mode tcp\n    balance roundrobin\n{servers}"
        )
    path.write_text(text)
    return path


def interknit_listeners(
    http_port: int,
    tcp_port: int | None,
    access_log: str | None,
    no_log_port: int | None = None,
) -> str:
    """The node's listeners: ``web`` (its access log ``access_log``; None: the key is left
    out, for a baseline tree from before it), ``web-nolog`` without one, and ``relay``."""
    route = f'[[listeners.routes]]\nservice = "{SERVICE}"\nbalance = "round_robin"\n'
    log = "" if access_log is None else f'access_log = "{access_log}"\n'
    out = f'[[listeners]]\nname = "web"\nlisten = "127.0.0.1:{http_port}"\n{log}{route}\n'
    if no_log_port is not None:
        out += (
            f'[[listeners]]\nname = "web-nolog"\nlisten = "127.0.0.1:{no_log_port}"\n'
            f'access_log = "off"\n{route}\n'
        )
    if tcp_port is not None:
        out += (
            f'[[listeners]]\nname = "relay"\nlisten = "127.0.0.1:{tcp_port}"\n'
            f'protocol = "tcp"\n{log}{route}'
        )
    return out


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


@dataclass
class WrkOutput:
    """What wrk printed: its rate, p99, request count and error counts."""

    rps: float
    p99_ms: float
    requests: int
    non2xx: int = 0
    connect: int = 0
    read: int = 0
    write: int = 0
    timeout: int = 0


def read_wrk(out: str) -> WrkOutput:
    rps = re.search(r"Requests/sec:\s+([\d.]+)", out)
    p99 = re.search(r"99%\s+([\d.]+)(us|ms|s|m)\b", out)
    total = re.search(r"(\d+) requests in", out)
    if rps is None or p99 is None or total is None:
        raise RuntimeError(f"cannot read wrk's output:\n{out}")
    got = WrkOutput(
        float(rps.group(1)), float(p99.group(1)) * _UNITS[p99.group(2)], int(total.group(1))
    )
    non2xx = re.search(r"Non-2xx or 3xx responses:\s+(\d+)", out)
    if non2xx:
        got.non2xx = int(non2xx.group(1))
    sock = re.search(r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)", out)
    if sock:
        got.connect, got.read, got.write, got.timeout = (int(g) for g in sock.groups())
    return got


# --traffic path: every request a path of its own, wrk's plain head otherwise.
VARY_PATH_LUA = """
local n = 0
request = function()
    n = n + 1
    return wrk.format(nil, "/p" .. n)
end
"""

# --traffic browser: what a browser sends for a page of a shop, every path and query its own.
BROWSER_HEADERS = {
    "Host": "shop.example.com",
    "User-Agent": "Mozilla/5.0 (X11; Linux x86_64) AppleWebKit/537.36 (KHTML, like Gecko) "
    "Chrome/120.0.0.0 Safari/537.36",
    "Accept": "text/html,application/xhtml+xml,application/xml;q=0.9,image/avif,image/webp,"
    "*/*;q=0.8",
    "Accept-Language": "en-GB,en;q=0.9,de;q=0.7",
    "Accept-Encoding": "gzip, deflate, br",
    "Referer": "https://shop.example.com/",
    "Cookie": "session=3f9a1c7e5b2d4a6f8e0c1b3d5f7a9c2e; cart=17; theme=dark; "
    "_ga=GA1.2.1234567890.1700000000; consent=analytics:1,ads:0",
    "Sec-Fetch-Dest": "document",
    "Sec-Fetch-Mode": "navigate",
    "Sec-Fetch-Site": "same-origin",
    "Upgrade-Insecure-Requests": "1",
    "Cache-Control": "max-age=0",
    "Connection": "keep-alive",
}


def browser_lua() -> str:
    fields = "\n".join(
        f"wrk.headers[{json.dumps(k)}] = {json.dumps(v)}" for k, v in BROWSER_HEADERS.items()
    )
    return (
        fields
        + """
local sections = {"shoes", "shirts", "bags", "hats", "socks", "coats", "belts", "watches"}
local n = 0
request = function()
    n = n + 1
    local path = string.format("/shop/%s/item/%d?colour=%d&size=%d&ref=home&page=%d",
        sections[n % 8 + 1], n, n % 13, n % 7, n % 50)
    return wrk.format("GET", path)
end
"""
    )


TRAFFIC = {
    "browser": "a browser's head (13 fields, cookies, ~750 bytes), every path and query its own",
    "path": "wrk's plain head, every path its own",
    "repeat": "one request repeated byte for byte (interknit's head cache answers it)",
}


def wrk(
    port: int,
    seconds: float,
    connections: int,
    prefix: Sequence[str],
    script: Path | None = None,
    pid: int | None = None,
    load_pids: Sequence[int] = (),
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
    user_before, system_before = cpu_times(pid) if pid is not None else (0.0, 0.0)
    load_before = sum(cpu_seconds(p) for p in load_pids) + children_cpu()
    machine_before = machine_busy()
    started = time.monotonic()
    out = subprocess.run(args, capture_output=True, text=True, check=True).stdout
    took = time.monotonic() - started
    user_after, system_after = cpu_times(pid) if pid is not None else (float("nan"),) * 2
    user = user_after - user_before
    cpu = user + system_after - system_before
    load_cpu = sum(cpu_seconds(p) for p in load_pids) + children_cpu() - load_before
    others = machine_busy() - machine_before - load_cpu - (cpu if pid is not None else 0.0)
    busy = (cpu / took if pid is not None else float("nan"), load_cpu / took, others / took)
    got = read_wrk(out)
    errors = got.non2xx + got.connect + got.read + got.write + got.timeout
    requests = got.requests
    return Sample(
        got.rps,
        got.p99_ms,
        errors,
        requests,
        cpu / requests * 1e6 if requests and pid is not None else float("nan"),
        user / requests * 1e6 if requests and pid is not None else float("nan"),
        busy,
    )


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
    return f"{value / reference:.2f}x" if reference > 0 and value == value else "-"


def verdict(ok: bool) -> str:
    return "met" if ok else "NOT met"


def limit(busy: tuple[float, ...], pinned: bool) -> str:
    """Which side a run was bound by: the load (wrk and the backends, one core when pinned),
    the proxy (one core when pinned), or every core; else other work on the machine."""
    if not busy:
        return "-"
    proxy, load, _ = busy
    if pinned:
        if load >= CLIENT_BOUND:
            return "client"
        return "proxy" if proxy >= CLIENT_BOUND else "others"
    cores = os.cpu_count() or 1
    return "cores" if proxy + load >= CLIENT_BOUND * cores else "others"


def table(
    cases: Sequence[Case], samples: dict[str, Samples], pinned: bool
) -> dict[str, dict[str, float]]:
    figures: dict[str, dict[str, float]] = {}
    for c in cases:
        s = samples[c.name]
        figures[c.name] = {k: s.median(k) for k in ("rps", "p99_ms", "cpu_us", "user_us")}
    header = (
        f"{'case':<34} {'req/s':>8} {'p99 ms':>7} {'req/s':>6} {'p99':>6} "
        f"{'CPU us/req':>10} {'user':>5} {'capacity':>8} {'busy: proxy/load/others':>23} "
        f"{'bound':>7} {'errors':>6}"
    )
    print(header)
    print(f"{'':<34} {'':>8} {'':>7} {'ratio':>6} {'ratio':>6} {'':>10} {'':>5} {'ratio':>8}")
    print("-" * len(header))
    for c in cases:
        f = figures[c.name]
        ref = figures[c.versus] if c.versus else None
        busy = samples[c.name].busy()
        cpu = f["cpu_us"]
        capacity = ratio(ref["cpu_us"], cpu) if ref is not None else "-"
        print(
            f"{c.name:<34} {f['rps']:>8.0f} {f['p99_ms']:>7.2f} "
            f"{ratio(f['rps'], ref['rps']) if ref else '-':>6} "
            f"{ratio(f['p99_ms'], ref['p99_ms']) if ref else '-':>6} "
            f"{cpu:>10.1f} {f['user_us']:>5.1f} {capacity:>8} "
            f"{'/'.join(f'{b:.0%}' for b in busy) or '-':>23} {limit(busy, pinned):>7} "
            f"{sum(s.errors for s in samples[c.name].runs):>6}"
        )
    return figures


def report(
    cases: Sequence[Case],
    worker_cases: Sequence[Case],
    samples: dict[str, Samples],
    rss: tuple[int, int] | None,
    pin: Pinning,
    args: argparse.Namespace,
) -> None:
    print()
    print(f"command: {' '.join(sys.argv)}")
    print(f"machine: {machine()}")
    print(f"load average (1, 5, 15 min) at the end: {load()}")
    print(f"pinning: {pin.note}")
    print(
        f"wrk -t1 -c{args.connections} -d{args.duration:g}s --latency; medians of {args.runs} "
        f'run(s); backends: 2 x nginx (1 worker, return 200 "ok")'
    )
    print(f"traffic: {TRAFFIC[args.traffic]} (--traffic {args.traffic})")
    log_kind = "JSON lines" if args.log_json else "text lines"
    print(
        "access logs: HAProxy and nginx none; 'interknit http' "
        + (f"writes its access log to a file ({log_kind})" if args.access_log else "none")
        + (
            f"; '{NO_LOG}' is the same node's listener with access_log = \"off\""
            if args.access_log
            else ""
        )
    )
    print()
    figures = table(cases, samples, pinned=bool(pin.proxy))
    print(
        "(ratios: HTTP cases to HAProxy HTTP, the TCP relay to HAProxy mode tcp; CPU us/req: "
        "the proxy's user+system time per request, user: of which in user space;\n capacity: "
        "the reference's CPU per request over this one's, what each could serve with a core of "
        "its own; busy: the CPU (in "
        "cores)\n of the proxy, of the load (wrk and the backends) and of everything else on "
        "the machine over the run;\n bound 'client' where the load used its whole core, so "
        "that req/s says little and CPU per request tells the proxies apart; 'others' where\n "
        "neither was full: other work took the CPU)"
    )
    print()

    def get(name: str, key: str) -> float:
        return figures.get(name, {}).get(key, float("nan"))

    ik, ha = "interknit http", "haproxy http"
    http_r = get(ik, "rps") / get(ha, "rps")
    cap_r = get(ha, "cpu_us") / get(ik, "cpu_us")
    p99_r = get(ik, "p99_ms") / get(ha, "p99_ms")
    what = "with its access log" if args.access_log else "without an access log"
    if http_r == http_r:
        print(
            f"goal HTTP ({args.traffic} traffic, interknit {what}) >= {HTTP_GOAL}x HAProxy and "
            f"p99 <= {P99_GOAL:g}x: req/s {http_r:.2f}x, capacity (CPU per request) "
            f"{cap_r:.2f}x, p99 {p99_r:.2f}x -> req/s {verdict(http_r >= HTTP_GOAL)}, capacity "
            f"{verdict(cap_r >= HTTP_GOAL)}, p99 {verdict(p99_r <= P99_GOAL)}"
        )
    if args.access_log and get(NO_LOG, "rps") == get(NO_LOG, "rps"):
        cost = get(ik, "cpu_us") / get(NO_LOG, "cpu_us") - 1
        print(
            f"goal access log costs <= {LOG_COST_GOAL:.0%}: CPU per request {cost:+.1%} "
            f"({get(ik, 'cpu_us'):.1f} against {get(NO_LOG, 'cpu_us'):.1f} us), req/s "
            f"{ratio(get(ik, 'rps'), get(NO_LOG, 'rps'))} of the no-log listener's -> "
            f"{verdict(cost <= LOG_COST_GOAL)}"
        )
    tcp_r = get("interknit tcp", "rps") / get("haproxy tcp", "rps")
    tcp_cap = get("haproxy tcp", "cpu_us") / get("interknit tcp", "cpu_us")
    if tcp_r == tcp_r:
        print(
            f"goal TCP >= {TCP_GOAL}x HAProxy mode tcp: req/s {tcp_r:.2f}x, capacity "
            f"{tcp_cap:.2f}x -> {verdict(tcp_r >= TCP_GOAL)}"
        )
    if rss is not None:
        before, during = rss
        print(
            f"interknit node RSS: {before / 1024:.1f} MiB idle after the runs, "
            f"{during / 1024:.1f} MiB with {args.hold} open keep-alive connections -> "
            f"{verdict(during / 1024 < RSS_GOAL_MIB)} (goal < {RSS_GOAL_MIB} MiB)"
        )
    if worker_cases:
        n = args.workers
        print()
        print(
            f"Workers: every process unpinned (taskset -a -p), wrk too; HAProxy nbthread 1 and "
            f"{n}, interknit alone and --workers {n}"
        )
        print()
        wf = table(worker_cases, samples, pinned=False)
        h1, hn, i1, i_n = (c.name for c in worker_cases)
        gain_h = wf[hn]["rps"] / wf[h1]["rps"] - 1
        gain_i = wf[i_n]["rps"] / wf[i1]["rps"] - 1
        print(
            "(bound 'cores' where the proxy and the load used every core)\n"
            f"share of {n - 1} more core(s) gained: "
            f"HAProxy {gain_h:.0%}, interknit {gain_i:.0%}; interknit --workers {n} against "
            f"HAProxy nbthread {n}: req/s {ratio(wf[i_n]['rps'], wf[hn]['rps'])}, "
            f"CPU per request {ratio(wf[i_n]['cpu_us'], wf[hn]['cpu_us'])}"
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
    parser.add_argument("--traffic", choices=sorted(TRAFFIC), default="browser")
    parser.add_argument(
        "--access-log",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="interknit's 'web' listener writes its access log to a file (default: on)",
    )
    parser.add_argument("--log-json", action="store_true", help="the access log as JSON lines")
    parser.add_argument(
        "--workers",
        type=int,
        default=2,
        help="the unpinned section: HAProxy nbthread N against interknit --workers N (1: skip)",
    )
    parser.add_argument(
        "--baseline",
        default="",
        help="a copy of an older src/ tree: adds an 'interknit http (baseline)' case, a second "
        "node run from it (PYTHONPATH), so that a change is measured against it in one run; it "
        "logs as that tree does at --log-level info when the access log is on",
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
    names = (
        "haproxy",
        "haproxy_tcp",
        "haproxy_n",
        "nginx",
        "ik",
        "ik_nolog",
        "ik_tcp",
        "ik_n",
        "base",
        "base_tcp",
    )
    ports = {name: free_port() for name in names}
    node_options = ["--log-json"] if args.log_json else []
    with contextlib.ExitStack() as stack:
        tmp = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="proxy-bench-")))
        backend_pids = [
            stack.enter_context(nginx(tmp, f"backend{i}", backend_body(port), pin.load))
            for i, port in enumerate(backends)
        ]
        nginx_pid = stack.enter_context(
            nginx(tmp, "proxy", nginx_proxy_body(ports["nginx"], backends), pin.proxy)
        )
        cfg = haproxy_cfg(tmp / "haproxy.cfg", ports["haproxy"], ports["haproxy_tcp"], backends)
        haproxy_pid = stack.enter_context(process([*pin.proxy, HAPROXY, "-f", str(cfg), "-db"])).pid
        access = str(tmp / "access.log") if args.access_log else "off"
        api, node = stack.enter_context(
            interknit_process(
                interknit_listeners(
                    ports["ik"],
                    ports["ik_tcp"],
                    access,
                    ports["ik_nolog"] if args.access_log else None,
                ),
                prefix=pin.proxy,
                options=node_options,
            )
        )
        register(api, backends)
        cases = [
            Case("direct to a backend", backends[0], None),
            Case("haproxy http", ports["haproxy"], None, haproxy_pid),
            Case("nginx proxy", ports["nginx"], "haproxy http", nginx_pid),
            Case("interknit http", ports["ik"], "haproxy http", node.pid),
            *(
                [Case(NO_LOG, ports["ik_nolog"], "haproxy http", node.pid)]
                if args.access_log
                else []
            ),
        ]
        if args.baseline:
            with baseline_env(args.baseline):
                base_api, base = stack.enter_context(
                    interknit_process(
                        interknit_listeners(ports["base"], ports["base_tcp"], None),
                        prefix=pin.proxy,
                        options=[] if args.access_log else ["--log-level", "warning"],
                    )
                )
            register(base_api, backends)
            cases.append(Case(BASELINE, ports["base"], "haproxy http", base.pid))
        cases += [
            Case("haproxy tcp", ports["haproxy_tcp"], None, haproxy_pid),
            Case("interknit tcp", ports["ik_tcp"], "haproxy tcp", node.pid),
        ]
        worker_cases: list[Case] = []
        workers_node = None
        if args.workers > 1:
            n = args.workers
            cfg_n = haproxy_cfg(tmp / "haproxy-n.cfg", ports["haproxy_n"], None, backends, n)
            haproxy_n = stack.enter_context(process([HAPROXY, "-f", str(cfg_n), "-db"])).pid
            access_n = str(tmp / "access-workers.log") if args.access_log else "off"
            api_n, workers_node = stack.enter_context(
                interknit_process(
                    interknit_listeners(ports["ik_n"], None, access_n),
                    options=[*node_options, "--workers", str(n)],
                )
            )
            register(api_n, backends)
            worker_cases = [
                Case("haproxy http (nbthread 1)", ports["haproxy"], None, haproxy_pid, True),
                Case(f"haproxy http (nbthread {n})", ports["haproxy_n"], None, haproxy_n, True),
                Case("interknit http (1 process)", ports["ik"], None, node.pid, True),
                Case(
                    f"interknit http (--workers {n})",
                    ports["ik_n"],
                    f"haproxy http (nbthread {n})",
                    workers_node.pid,
                    True,
                ),
            ]
        only = {n.strip() for n in args.only.split(",") if n.strip()}
        run_cases = [c for c in cases if not only or c.name in only]
        run_workers = [c for c in worker_cases if not only or c.name in only]
        for c in [*cases, *worker_cases]:
            wait_ok(c.name, c.port)
        print(f"interknit node pid {node.pid}; warming up", flush=True)
        script: Path | None = None
        if args.traffic == "path":
            script = tmp / "vary-path.lua"
            script.write_text(VARY_PATH_LUA)
        elif args.traffic == "browser":
            script = tmp / "browser.lua"
            script.write_text(browser_lua())

        samples: dict[str, Samples] = {c.name: Samples() for c in [*cases, *worker_cases]}

        def measure(group: Sequence[Case], prefix: Sequence[str]) -> None:
            for c in group:
                wrk(c.port, 1, args.connections, prefix, script)
            for run in range(args.runs):
                for c in group:
                    s = wrk(
                        c.port, args.duration, args.connections, prefix, script, c.pid, backend_pids
                    )
                    samples[c.name].runs.append(s)
                    print(
                        f"run {run + 1}/{args.runs} {c.name:<30} {s.rps:>8.0f} req/s "
                        f"p99 {s.p99_ms:.2f} ms CPU {s.cpu_us:.1f} us/req busy proxy/load/others "
                        f"{'/'.join(f'{b:.0%}' for b in s.busy)} errors {s.errors} "
                        f"load {load()}",
                        flush=True,
                    )

        measure(run_cases, pin.load)
        rss = None
        if args.hold > 0:
            rss = asyncio.run(rss_with_connections(node.pid, ports["ik"], args.hold))
        if run_workers:
            for pid in [*backend_pids, haproxy_pid, node.pid]:
                unpin(pid)
            measure(run_workers, ())
        for c in [*cases, *worker_cases]:
            if not samples[c.name].runs:
                samples[c.name].runs.append(Sample(float("nan"), float("nan"), 0))
        report(cases, worker_cases if run_workers else [], samples, rss, pin, args)


if __name__ == "__main__":
    main()
