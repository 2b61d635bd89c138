"""Hostile heads against the proxy and the registry API: the node's memory and everyone else's
latency while 1,000 connections each send a header line that never ends (issue 13, item 1).

    .venv/bin/python bench/hostile.py [--connections 1000] [--duration 10] [--rate 200]

One node (``interknit up``) with an HTTP listener that routes to a backend (bench/backend.py,
no work per request), and its registry API holding one service. For each target, the proxy
listener and the registry API:

1. *baseline*: a victim client (a process of its own) sends ``--rate`` requests a second on
   one kept-alive connection (``GET /`` through the proxy; ``GET /v1/services/bench``, the
   API's fast path) for ``--duration`` seconds, and records each latency;
2. *attack*: the same, while an attacker (another process, uvloop) holds ``--connections``
   connections open, each sending ``GET /x HTTP/1.1``, ``Host``, then ``X-A: `` followed by
   ``a`` without end, 4 KiB at a time; a connection the node refuses (431) or closes is
   opened again at once, so the node has ``--connections`` endless heads all the time.

The node's resident memory (VmRSS) is read every 50 ms: the growth is the peak during the
attack less the last reading of the baseline. Goals: under 64 MiB, and the victim's p99 under
10 ms. Before issue 13 one such connection made the proxy take in 100 MB in 10 s (RSS 58 to
257 MB) with others waiting 3.7-5 s, and six took the registry API from 56 to 816 MB.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import resource
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from dataclasses import dataclass
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import free_port, interknit_process, machine, percentile, process, rss_kib, wait_port

ROOT = Path(__file__).resolve().parent.parent
GROWTH_GOAL_MIB = 64
P99_GOAL_MS = 10.0
HEAD = b"GET /x HTTP/1.1\r\nHost: bench\r\nX-A: "
CHUNK = b"a" * 4096


# ---------------------------------------------------------------------- attacker (a process)


async def attack(port: int, connections: int, duration: float) -> dict[str, int]:
    loop = asyncio.get_running_loop()
    stop = loop.time() + duration
    counts = {"opened": 0, "refused": 0, "failed": 0, "bytes": 0}

    async def one() -> None:
        while loop.time() < stop:
            try:
                reader, writer = await asyncio.open_connection("127.0.0.1", port)
            except OSError:
                counts["failed"] += 1
                await asyncio.sleep(0.05)
                continue
            counts["opened"] += 1
            try:
                writer.write(HEAD)
                while loop.time() < stop:
                    writer.write(CHUNK)
                    counts["bytes"] += len(CHUNK)
                    await writer.drain()
                    if reader.at_eof():
                        break
            except (ConnectionError, OSError):
                pass
            with contextlib.suppress(Exception):
                answer = await asyncio.wait_for(reader.read(200), 0.5)
                if b" 431 " in answer or b" 414 " in answer:
                    counts["refused"] += 1
            writer.close()

    await asyncio.gather(*(one() for _ in range(connections)))
    return counts


# ---------------------------------------------------------------------- victim (a process)


def victim(port: int, path: str, rate: float, duration: float) -> list[float]:
    """Latencies (seconds) of requests sent every 1/rate s on one kept-alive connection."""
    request = f"GET {path} HTTP/1.1\r\nHost: bench\r\n\r\n".encode()
    latencies: list[float] = []
    sock = socket.create_connection(("127.0.0.1", port), timeout=10)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    start = time.monotonic()
    n = 0
    buf = b""
    while time.monotonic() - start < duration:
        due = start + n / rate
        pause = due - time.monotonic()
        if pause > 0:
            time.sleep(pause)
        sent = time.perf_counter()
        sock.sendall(request)
        while True:
            end = buf.find(b"\r\n\r\n")
            if end >= 0:
                head = buf[:end].lower()
                at = head.find(b"content-length:")
                length = int(head[at + 15 :].split(b"\r\n", 1)[0]) if at >= 0 else 0
                if len(buf) >= end + 4 + length:
                    buf = buf[end + 4 + length :]
                    break
            chunk = sock.recv(65536)
            if not chunk:
                raise RuntimeError("the node closed the victim's connection")
            buf += chunk
        latencies.append(time.perf_counter() - sent)
        n += 1
    sock.close()
    return latencies


def run_child(args: list[str]) -> subprocess.Popen[bytes]:
    return subprocess.Popen(
        [sys.executable, __file__, *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE
    )


# ---------------------------------------------------------------------- the run


@dataclass
class Phase:
    p50_ms: float
    p99_ms: float
    max_ms: float
    requests: int


@dataclass
class Result:
    target: str
    baseline: Phase
    attacked: Phase
    rss_before_mib: float
    rss_peak_mib: float
    rss_after_mib: float
    attack: dict[str, int]

    @property
    def growth_mib(self) -> float:
        return self.rss_peak_mib - self.rss_before_mib


def phase(latencies: list[float]) -> Phase:
    ms = [x * 1000 for x in latencies]
    return Phase(percentile(ms, 50), percentile(ms, 99), max(ms), len(ms))


def sample_rss(pid: int, stop: threading.Event, into: list[float]) -> None:
    while not stop.is_set():
        with contextlib.suppress(OSError, RuntimeError):
            into.append(rss_kib(pid) / 1024)
        stop.wait(0.05)


def measure(target: str, port: int, path: str, pid: int, args: argparse.Namespace) -> Result:
    duration = str(args.duration)
    base_proc = run_child(["--victim", str(port), path, str(args.rate), duration])
    out, err = base_proc.communicate(timeout=args.duration + 60)
    if base_proc.returncode:
        raise RuntimeError(err.decode())
    baseline = phase(json.loads(out))
    time.sleep(1.0)
    before = rss_kib(pid) / 1024
    samples: list[float] = []
    stop = threading.Event()
    sampler = threading.Thread(target=sample_rss, args=(pid, stop, samples), daemon=True)
    sampler.start()
    attacker = run_child(["--attacker", str(port), str(args.connections), duration])
    time.sleep(min(2.0, args.duration / 4))  # the attack in full swing
    victim_proc = run_child(["--victim", str(port), path, str(args.rate), duration])
    vout, verr = victim_proc.communicate(timeout=args.duration + 60)
    aout, aerr = attacker.communicate(timeout=args.duration + 60)
    stop.set()
    sampler.join()
    if victim_proc.returncode:
        raise RuntimeError(f"victim: {verr.decode()}")
    if attacker.returncode:
        raise RuntimeError(f"attacker: {aerr.decode()}")
    time.sleep(2.0)
    after = rss_kib(pid) / 1024
    return Result(
        target,
        baseline,
        phase(json.loads(vout)),
        before,
        max(samples, default=before),
        after,
        json.loads(aout),
    )


def report(results: list[Result], args: argparse.Namespace) -> None:
    load = os.getloadavg()
    print(f"\nmachine: {machine()}; load average {load[0]:.2f} {load[1]:.2f} {load[2]:.2f}")
    print(
        f"{args.connections} connections with endless header lines for {args.duration:g} s; "
        f"victim at {args.rate:g} requests/s on one kept-alive connection\n"
    )
    print(
        "| target | RSS before / peak / after (MiB) | growth | victim p50 / p99 / max (ms), "
        "baseline | under attack | attack connections opened |"
    )
    print("|---|---|---|---|---|---|")
    for r in results:
        b, a = r.baseline, r.attacked
        growth_ok = "met" if r.growth_mib < GROWTH_GOAL_MIB else "NOT met"
        p99_ok = "met" if a.p99_ms < P99_GOAL_MS else "NOT met"
        print(
            f"| {r.target} | {r.rss_before_mib:.0f} / {r.rss_peak_mib:.0f} / "
            f"{r.rss_after_mib:.0f} | {r.growth_mib:.1f} MiB (< {GROWTH_GOAL_MIB}: {growth_ok}) "
            f"| {b.p50_ms:.2f} / {b.p99_ms:.2f} / {b.max_ms:.1f} "
            f"| {a.p50_ms:.2f} / {a.p99_ms:.2f} / {a.max_ms:.1f} (p99 < {P99_GOAL_MS:g}: "
            f"{p99_ok}) | {r.attack['opened']:,} |"
        )


def run_target(target: str, args: argparse.Namespace) -> Result:
    backend_port, listen = free_port(), free_port()
    listener = (
        f'[[listeners]]\nname = "web"\nlisten = "127.0.0.1:{listen}"\n'
        f'[[listeners.routes]]\nservers = ["127.0.0.1:{backend_port}"]\n'
    )
    backend = [sys.executable, str(ROOT / "bench" / "backend.py"), "--port", str(backend_port)]
    backend += ["--concurrency", "64", "--work", "0ms"]
    with (
        process(backend),
        interknit_process(listener, options=["--log-level", "error"]) as (url, node),
    ):
        wait_port(backend_port)
        wait_port(listen)
        body = json.dumps({"address": "127.0.0.1", "port": backend_port}).encode()
        request = urllib.request.Request(
            url + "/v1/services/bench/instances/b1", data=body, method="PUT"
        )
        urllib.request.urlopen(request, timeout=5).close()
        if target == "proxy":
            return measure("proxy (listener)", listen, "/", node.pid, args)
        api_port = int(url.rsplit(":", 1)[1])
        return measure("registry API", api_port, "/v1/services/bench", node.pid, args)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--connections", type=int, default=1000)
    parser.add_argument("--duration", type=float, default=10.0)
    parser.add_argument("--rate", type=float, default=200.0)
    parser.add_argument("--targets", default="proxy,api")
    parser.add_argument("--attacker", nargs=3, metavar=("PORT", "N", "SECONDS"))
    parser.add_argument("--victim", nargs=4, metavar=("PORT", "PATH", "RATE", "SECONDS"))
    args = parser.parse_args()
    _soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    if args.attacker:
        import uvloop

        port, n, seconds = args.attacker
        counts = uvloop.run(attack(int(port), int(n), float(seconds)))
        print(json.dumps(counts))
        return
    if args.victim:
        port, path, rate, seconds = args.victim
        print(json.dumps(victim(int(port), path, float(rate), float(seconds))))
        return

    results: list[Result] = []
    for target in args.targets.split(","):
        # A node of its own for each target: memory a process once took is not given back
        # to the system, and would hide what the next target takes.
        results.append(run_target(target, args))
    report(results, args)


if __name__ == "__main__":
    main()
