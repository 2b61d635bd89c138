"""TLS termination beside HAProxy, with the same certificate, in one run.

    .venv/bin/python bench/tls.py [--runs 3] [--duration 5] [--connections 50] [--idle 1000]

For each key type (ECDSA P-256 and RSA 2048, leaves of a CA made with openssl), HAProxy 2.6
(``nbthread 1``, ``bind ... ssl crt ... alpn http/1.1``, TLS 1.2 and 1.3, keep-alive to the
backends) and an interknit node (a TLS listener, a static route to the same backends) both
terminate TLS in front of two nginx backends that answer ``200 ok``. wrk measures, each case in
turn and ``--runs`` times over:

* keep-alive HTTPS requests per second (``wrk -t1 -c50``; each connection does one
  handshake, then requests);
* new TLS connections per second: the same with ``Connection: close``, so every request is a
  new TCP connection and handshake. wrk resumes the TLS 1.3 session of its previous
  connection (a ticket: PSK with ECDHE, no signature), so this is "resumed"; "full" is the
  same against a second pair of servers with resumption off on both (HAProxy
  ``no-tls-tickets`` and ``tune.ssl.cachesize 0``; interknit ``session_tickets = false``,
  ``session_cache = false``), every handshake signed with the certificate's key;

then the memory each holds per idle TLS connection: VmRSS with ``--idle`` TLS connections
open (each after one answered request, kept alive), less VmRSS before, divided by their number.

Each proxy is pinned to core 1, wrk and the backends to core 0 (as bench/proxy.py does). The
handshake costs the client about what it costs the server, so on two cores the client's core
may bound the new-connection rate for both; the ratio then says less than it seems to, and the
report prints the client core's share of time to tell.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import functools
import re
import socket
import ssl
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import free_port, interknit_process, machine, median, process, rss_kib
from proxy import (
    HAPROXY,
    backend_body,
    load,
    nginx,
    pinning,
    raise_fd_limit,
    read_wrk,
)

KEEPALIVE_GOAL = 0.75
NEW_CONN_GOAL = 0.9


@dataclass
class Sample:
    rps: float
    p99_ms: float
    errors: int


@dataclass
class Server:
    port: int
    pid: int
    # (full, resumed) TLS handshakes so far, as the server counts them.
    handshakes: Callable[[], tuple[int, int]]


def haproxy_handshakes(sock: Path) -> tuple[int, int]:
    """HAProxy's frontend SSL counters (``show stat typed``: ``ssl_sess`` are new sessions,
    ``ssl_reused_sess`` resumed ones)."""
    with socket.socket(socket.AF_UNIX) as s:
        s.connect(str(sock))
        s.sendall(b"show stat typed\n")
        data = b""
        while chunk := s.recv(65536):
            data += chunk
    found = {"ssl_sess": 0, "ssl_reused_sess": 0}
    for line in data.decode().splitlines():
        if line.startswith("F."):  # a frontend's field: F.iid.sid.pos.name.proc:origin:type:value
            name = line.split(":", 1)[0].split(".")[4]
            if name in found:
                found[name] += int(line.rsplit(":", 1)[1])
    return found["ssl_sess"], found["ssl_reused_sess"]


def interknit_handshakes(url: str) -> tuple[int, int]:
    """The node's ``interknit_proxy_tls_handshakes_total`` (every TLS listener)."""
    with urllib.request.urlopen(url + "/metrics", timeout=5) as r:
        text = r.read().decode()
    found = {"no": 0.0, "yes": 0.0}
    for resumed, value in re.findall(
        r'^interknit_proxy_tls_handshakes_total\{[^}]*resumed="(yes|no)"[^}]*\} (\S+)$',
        text,
        re.MULTILINE,
    ):
        found[resumed] += float(value)
    return int(found["no"]), int(found["yes"])


def openssl(*args: str) -> None:
    subprocess.run(["openssl", *args], check=True, capture_output=True)


def make_certs(directory: Path, kind: str) -> tuple[Path, Path, Path, Path]:
    """A CA and a leaf for 127.0.0.1 with a ``kind`` ("ecdsa" or "rsa") key: (ca, cert, key,
    HAProxy's bundle of cert and key)."""
    ec = ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes"]
    ca, ca_key = directory / "ca.pem", directory / "ca.key"
    openssl("req", "-x509", *ec, "-days", "2", "-subj", "/CN=bench-ca", "-keyout", str(ca_key),
            "-out", str(ca), "-addext", "basicConstraints=critical,CA:TRUE",
            "-addext", "keyUsage=critical,keyCertSign")  # fmt: skip
    newkey = ["-newkey", "rsa:2048", "-nodes"] if kind == "rsa" else ec
    key, csr, cert = (directory / f"{kind}.{ext}" for ext in ("key", "csr", "pem"))
    ext = directory / f"{kind}.ext"
    ext.write_text("subjectAltName=IP:127.0.0.1,DNS:localhost\nbasicConstraints=CA:FALSE\n")
    openssl("req", *newkey, "-subj", "/CN=localhost", "-keyout", str(key), "-out", str(csr))
    openssl("x509", "-req", "-in", str(csr), "-CA", str(ca), "-CAkey", str(ca_key),
            "-CAcreateserial", "-days", "2", "-extfile", str(ext), "-out", str(cert))  # fmt: skip
    bundle = directory / f"{kind}.bundle.pem"
    bundle.write_bytes(cert.read_bytes() + key.read_bytes())
    return ca, cert, key, bundle


def haproxy_cfg(
    path: Path, port: int, bundle: Path, backends: Sequence[int], resume: bool = True
) -> Path:
    servers = "".join(f"    server b{i} 127.0.0.1:{b}\n" for i, b in enumerate(backends))
    cache = "" if resume else "    tune.ssl.cachesize 0\n"
    tickets = "" if resume else " no-tls-tickets"
    path.write_text(
        f"global\n    nbthread 1\n    maxconn 8000\n{cache}"
        f"    stats socket {path.with_suffix('.sock')}\n"
        "    ssl-default-bind-options ssl-min-ver TLSv1.2\n"
        "defaults\n    timeout connect 2s\n    timeout client 30s\n    timeout server 30s\n"
        f"frontend web\n    mode http\n"
        f"    bind 127.0.0.1:{port} ssl crt {bundle} alpn http/1.1{tickets}\n"
        "    option http-keep-alive\n    default_backend web\n"
        f"backend web\n    mode http\n    balance roundrobin\n    http-reuse safe\n{servers}"
    )
    return path


def interknit_listener(
    port: int, cert: Path, key: Path, backends: Sequence[int], resume: bool = True
) -> str:
    servers = ", ".join(f'"127.0.0.1:{b}"' for b in backends)
    off = "" if resume else ", session_tickets = false, session_cache = false"
    return (
        f'[[listeners]]\nname = "web"\nlisten = "127.0.0.1:{port}"\nmax_connections = 20000\n'
        f'tls = {{ cert = "{cert}", key = "{key}"{off} }}\n'
        f'[[listeners.routes]]\nservers = [{servers}]\nbalance = "round_robin"\n'
    )


def wait_tls(name: str, port: int, timeout: float = 15.0) -> None:
    ctx = ssl.create_default_context()
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        url = f"https://127.0.0.1:{port}/"
        with contextlib.suppress(OSError), urllib.request.urlopen(url, timeout=1, context=ctx) as r:
            if r.status == 200:
                return
        time.sleep(0.05)
    raise RuntimeError(f"{name} (127.0.0.1:{port}) did not answer 200 over https")


def wrk(port: int, seconds: float, connections: int, prefix: Sequence[str], close: bool) -> Sample:
    args = [*prefix, "wrk", "-t1", f"-c{connections}", f"-d{seconds:g}s", "--latency"]
    if close:
        args += ["-H", "Connection: close"]
    args.append(f"https://127.0.0.1:{port}/")
    got = read_wrk(subprocess.run(args, capture_output=True, text=True, check=True).stdout)
    # With Connection: close, wrk counts the server's close after each answer as a read error
    # of its own; only connect errors and timeouts say something went wrong.
    errors = got.non2xx + got.connect + got.timeout + (0 if close else got.read)
    return Sample(got.rps, got.p99_ms, errors)


async def idle_rss(pid: int, port: int, count: int) -> float:
    """KiB of VmRSS per idle TLS connection (each after one answered request)."""
    ctx = ssl.create_default_context()
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    request = b"GET / HTTP/1.1\r\nHost: bench\r\n\r\n"

    async def one() -> asyncio.StreamWriter:
        reader, writer = await asyncio.open_connection("127.0.0.1", port, ssl=ctx)
        writer.write(request)
        head = await reader.readuntil(b"\r\n\r\n")
        length = re.search(rb"(?i)content-length:\s*(\d+)", head)
        await reader.readexactly(int(length.group(1)) if length else 0)
        return writer

    await asyncio.sleep(0.5)
    before = rss_kib(pid)
    writers: list[asyncio.StreamWriter] = []
    for start in range(0, count, 50):
        writers += await asyncio.gather(*(one() for _ in range(min(50, count - start))))
    await asyncio.sleep(1.0)
    during = rss_kib(pid)
    for w in writers:
        w.close()
    return (during - before) / count


@contextlib.contextmanager
def servers(
    tmp: Path, kind: str, backends: Sequence[int], prefix: Sequence[str]
) -> Iterator[dict[str, Server]]:
    """HAProxy and interknit terminating with the same ``kind`` certificate, each twice (with
    resumption, and without: "... full")."""
    directory = tmp / kind
    directory.mkdir()
    _ca, cert, key, bundle = make_certs(directory, kind)
    cases: dict[str, Server] = {}
    with contextlib.ExitStack() as stack:
        for resume in (True, False):
            suffix = "" if resume else " full"
            hp, ik = free_port(), free_port()
            name = "haproxy" + suffix.replace(" ", "-")  # a path in its config has no spaces
            cfg = haproxy_cfg(directory / f"{name}.cfg", hp, bundle, backends, resume)
            haproxy = stack.enter_context(
                process([*prefix, HAPROXY, "-f", str(cfg)], log=directory / "haproxy.log")
            )
            url, node = stack.enter_context(
                interknit_process(
                    interknit_listener(ik, cert, key, backends, resume),
                    prefix=prefix,
                    options=["--log-level", "warning"],
                )
            )
            wait_tls("haproxy", hp)
            wait_tls("interknit", ik)
            sock = cfg.with_suffix(".sock")
            cases[f"haproxy {kind}{suffix}"] = Server(
                hp, haproxy.pid, functools.partial(haproxy_handshakes, sock)
            )
            cases[f"interknit {kind}{suffix}"] = Server(
                ik, node.pid, functools.partial(interknit_handshakes, url)
            )
        yield cases


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--duration", type=float, default=5.0)
    parser.add_argument("--connections", type=int, default=50)
    parser.add_argument("--idle", type=int, default=1000)
    parser.add_argument("--kinds", default="ecdsa,rsa")
    args = parser.parse_args()
    raise_fd_limit(max(20000, 4 * args.idle + 1000))
    pin = pinning()
    print(f"machine: {machine()}; {pin.note}; load average before: {load()}")
    with tempfile.TemporaryDirectory(prefix="ik-bench-tls-") as tmp_name:
        tmp = Path(tmp_name)
        backends = [free_port(), free_port()]
        with contextlib.ExitStack() as stack:
            for i, port in enumerate(backends):
                stack.enter_context(nginx(tmp, f"backend{i}", backend_body(port), pin.load))
            for kind in args.kinds.split(","):
                with servers(tmp, kind, backends, pin.proxy) as cases:
                    report(kind, cases, args, pin.load)
    print(f"load average after: {load()}")


def report(
    kind: str, cases: dict[str, Server], args: argparse.Namespace, prefix: Sequence[str]
) -> None:
    main_cases = [name for name in cases if not name.endswith(" full")]
    keep: dict[str, list[Sample]] = {name: [] for name in main_cases}
    new: dict[str, list[Sample]] = {name: [] for name in cases}
    # Full and resumed handshakes over the new-connection runs, as each server counted them:
    # "resumed" means resumed only where the share says so.
    shakes = {name: [0, 0] for name in cases}
    for _ in range(args.runs):
        for name, server in cases.items():
            if name in keep:
                keep[name].append(wrk(server.port, args.duration, args.connections, prefix, False))
            before = server.handshakes()
            new[name].append(wrk(server.port, args.duration, args.connections, prefix, True))
            after = server.handshakes()
            for i in (0, 1):
                shakes[name][i] += after[i] - before[i]
    memory = {
        name: asyncio.run(idle_rss(cases[name].pid, cases[name].port, args.idle))
        for name in main_cases
    }

    def resumed(name: str) -> str:
        full, again = shakes[name]
        return f"{again / (full + again):.0%}" if full + again else "-"

    def rps(samples: list[Sample]) -> float:
        return median([s.rps for s in samples])

    def p99(samples: list[Sample]) -> float:
        return median([s.p99_ms for s in samples])

    hp, ik = f"haproxy {kind}", f"interknit {kind}"
    print(f"\n{kind.upper()} certificate")
    print(
        "| case | keep-alive req/s | p99 ms | new TLS conn/s, resumed | p99 ms | resumed share "
        "| new TLS conn/s, full | p99 ms | resumed share | KiB per idle TLS conn |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|")
    for name in main_cases:
        full = new[name + " full"]
        samples = keep[name] + new[name] + full
        errors = sum(s.errors for s in samples)
        note = f" ({errors} errors)" if errors else ""
        print(
            f"| {name}{note} | {rps(keep[name]):,.0f} | {p99(keep[name]):.2f} "
            f"| {rps(new[name]):,.0f} | {p99(new[name]):.2f} | {resumed(name)} "
            f"| {rps(full):,.0f} | {p99(full):.2f} | {resumed(name + ' full')} "
            f"| {memory[name]:.1f} |"
        )
    print(
        f"interknit/HAProxy: keep-alive {rps(keep[ik]) / rps(keep[hp]):.2f}x "
        f"(goal >= {KEEPALIVE_GOAL}), new connections resumed "
        f"{rps(new[ik]) / rps(new[hp]):.2f}x, full "
        f"{rps(new[ik + ' full']) / rps(new[hp + ' full']):.2f}x (goal >= {NEW_CONN_GOAL}), "
        f"idle memory {memory[ik] / max(memory[hp], 0.1):.1f}x"
    )


if __name__ == "__main__":
    main()
