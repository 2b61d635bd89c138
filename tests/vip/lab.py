"""A small network made of namespaces, for the VIP tests and the benchmark.

::

    ns "sw":  bridge "bdata" (data)                      bridge "bstore" (store)
               |      |      |      |                   |      |      |      |
              n1     n2     n3   client                n1     n2     n3    etcd
             eth0   eth0   eth0   eth0                st0    st0    st0    st0
         10.77.0.11 .12    .13  10.77.0.2         10.78.0.11 .12   .13  10.78.0.2
      fd00:77::11   ::12   ::13 fd00:77::2

VIPs live on the data network (10.77.0.100-103, fd00:77::100); each node reaches etcd over
its own link on the store network, so one node can be cut from the store (``st0`` down) while
it still talks to its peers. Nothing here leaves the namespaces this run made: every name has
the run's prefix, and ``close`` deletes them all (deleting a namespace deletes its links).

The test process reaches into the namespaces with sockets made inside them (``inside``):
``Traffic`` answers for every node and probes every VIP from the client every 5 ms;
``AddressLog`` hears every address added or removed in every namespace, in the kernel's order,
on one netlink socket (NETLINK_LISTEN_ALL_NSID), so "never two owners" is checked exactly,
not sampled.
"""

from __future__ import annotations

import contextlib
import ctypes
import itertools
import os
import re
import selectors
import signal
import socket
import struct
import subprocess
import threading
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

DATA4, DATA6, STORE4 = "10.77.0", "fd00:77:", "10.78.0"
VIPS = ["10.77.0.100", "10.77.0.101", "10.77.0.102", "10.77.0.103", "fd00:77::100"]
ECHO_PORT = 7777
TRACK_PORT = 7778
ETCD_PORTS = (2379, 22379, 32379)
_CLONE_NEWNET = 0x40000000
_libc = ctypes.CDLL(None, use_errno=True)


def sh(*args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    return subprocess.run(list(args), check=check, capture_output=True, text=True, timeout=30)


@contextlib.contextmanager
def inside(ns: str) -> Iterator[None]:
    """Run the block with this thread in namespace ``ns`` (sockets made here stay there)."""
    own = os.open("/proc/thread-self/ns/net", os.O_RDONLY)
    target = os.open(f"/run/netns/{ns}", os.O_RDONLY)
    try:
        if _libc.setns(target, _CLONE_NEWNET) != 0:
            raise OSError(ctypes.get_errno(), f"setns into {ns} failed")
        yield
    finally:
        _libc.setns(own, _CLONE_NEWNET)
        os.close(own)
        os.close(target)


def ns_socket(ns: str, family: int, kind: int) -> socket.socket:
    with inside(ns):
        return socket.socket(family, kind)


def http_get(ns: str, port: int, path: str, timeout: float = 2.0) -> tuple[int, str]:
    """GET http://127.0.0.1:port/path from inside ``ns``: (status, body)."""
    sock = ns_socket(ns, socket.AF_INET, socket.SOCK_STREAM)
    sock.settimeout(timeout)
    try:
        sock.connect(("127.0.0.1", port))
        sock.sendall(f"GET {path} HTTP/1.0\r\nHost: localhost\r\n\r\n".encode())
        chunks = []
        while chunk := sock.recv(65536):
            chunks.append(chunk)
    finally:
        sock.close()
    head, _, body = b"".join(chunks).partition(b"\r\n\r\n")
    return int(head.split()[1]), body.decode(errors="replace")


class Lab:
    """The namespaces and links; ``close`` removes everything, even after a failure."""

    def __init__(self, nodes: int = 3) -> None:
        self.prefix = f"ikv{uuid.uuid4().hex[:6]}"
        self.nodes = [f"n{i}" for i in range(1, nodes + 1)]
        self.made: list[str] = []

    def ns(self, short: str) -> str:
        return f"{self.prefix}-{short}"

    def node_ip(self, node: str, family: int = 4) -> str:
        i = int(node[1:])
        return f"{DATA4}.{10 + i}" if family == 4 else f"{DATA6}:{10 + i}"

    def store_ip(self, node: str) -> str:
        return f"{STORE4}.{10 + int(node[1:])}"

    def _add(self, short: str) -> str:
        name = self.ns(short)
        sh("ip", "netns", "add", name)
        self.made.append(name)
        sh("ip", "netns", "set", name, "auto")  # an nsid, so AddressLog hears it
        sh("ip", "-n", name, "link", "set", "lo", "up")
        return name

    def _plug(self, ns: str, ifname: str, port: str, bridge: str, *addresses: str) -> None:
        sw = self.ns("sw")
        sh("ip", "-n", ns, "link", "add", ifname, "type", "veth", "peer", "name", port,
           "netns", sw)  # fmt: skip
        sh("ip", "-n", sw, "link", "set", port, "master", bridge, "up")
        for address in addresses:
            extra = ["nodad"] if ":" in address else []
            sh("ip", "-n", ns, "addr", "add", address, "dev", ifname, *extra)
        sh("ip", "-n", ns, "link", "set", ifname, "up")

    def open(self) -> Lab:
        try:
            sw = self._add("sw")
            for bridge in ("bdata", "bstore"):
                sh("ip", "-n", sw, "link", "add", bridge, "type", "bridge", "mcast_snooping", "0")
                sh("ip", "-n", sw, "link", "set", bridge, "up")
            for node in self.nodes:
                ns = self._add(node)
                i = int(node[1:])
                self._plug(ns, "eth0", f"d{i}", "bdata",
                           f"{DATA4}.{10 + i}/24", f"{DATA6}:{10 + i}/64")  # fmt: skip
                self._plug(ns, "st0", f"s{i}", "bstore", f"{STORE4}.{10 + i}/24")
            self._plug(self._add("client"), "eth0", "c0", "bdata", f"{DATA4}.2/24", f"{DATA6}:2/64")
            self._plug(self._add("etcd"), "st0", "e0", "bstore", f"{STORE4}.2/24")
        except BaseException:
            self.close()
            raise
        return self

    def close(self) -> None:
        for name in reversed(self.made):
            sh("ip", "netns", "del", name, check=False)
        self.made.clear()

    def nsids(self) -> dict[int, str]:
        out = {}
        for line in sh("ip", "netns", "list").stdout.splitlines():
            match = re.match(r"(\S+) \(id: (\d+)\)", line)
            if match and match.group(1).startswith(self.prefix):
                out[int(match.group(2))] = match.group(1).split("-", 1)[1]
        return out

    def unplug(self, node: str) -> None:
        """Take the node off the data network, as a machine that dies (its addresses go)."""
        sh("ip", "-n", self.ns(node), "link", "del", "eth0")

    def replug(self, node: str) -> None:
        i = int(node[1:])
        self._plug(self.ns(node), "eth0", f"d{i}", "bdata",
                   f"{DATA4}.{10 + i}/24", f"{DATA6}:{10 + i}/64")  # fmt: skip

    def cut_store(self, node: str, cut: bool = True) -> None:
        sh("ip", "-n", self.ns(node), "link", "set", "st0", "down" if cut else "up")

    def addresses(self, short: str) -> set[str]:
        out = sh("ip", "-n", self.ns(short), "-o", "addr", "show", "dev", "eth0").stdout
        return set(re.findall(r"inet6? ([0-9a-f.:]+)/", out))


# ---------------------------------------------------------------------- etcd in its namespace


class NsEtcd:
    """Three etcd members in the lab's etcd namespace, on the store network."""

    def __init__(self, lab: Lab, workdir: Path, binary: str) -> None:
        self.lab = lab
        self.ns = lab.ns("etcd")
        self.workdir = workdir
        self.binary = binary
        self.host = f"{STORE4}.2"
        self.procs: list[subprocess.Popen[bytes]] = []

    @property
    def endpoints(self) -> list[str]:
        return [f"http://{self.host}:{port}" for port in ETCD_PORTS]

    def start(self) -> NsEtcd:
        cluster = ",".join(f"m{i}=http://{self.host}:{p + 1}" for i, p in enumerate(ETCD_PORTS))
        for i, port in enumerate(ETCD_PORTS):
            url, peer = f"http://{self.host}:{port}", f"http://{self.host}:{port + 1}"
            command = [
                "ip", "netns", "exec", self.ns, self.binary,
                "--name", f"m{i}", "--data-dir", str(self.workdir / f"m{i}.etcd"),
                "--listen-client-urls", url, "--advertise-client-urls", url,
                "--listen-peer-urls", peer, "--initial-advertise-peer-urls", peer,
                "--initial-cluster", cluster, "--initial-cluster-state", "new",
                "--initial-cluster-token", self.lab.prefix,
                "--heartbeat-interval", "50", "--election-timeout", "500",
                "--log-level", "error",
            ]  # fmt: skip
            log = (self.workdir / f"etcd-m{i}.log").open("ab")
            self.procs.append(subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT))
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            if all(self._healthy(port) for port in ETCD_PORTS):
                return self
            time.sleep(0.1)
        raise RuntimeError("etcd in the lab did not become healthy")

    def _healthy(self, port: int) -> bool:
        sock = ns_socket(self.ns, socket.AF_INET, socket.SOCK_STREAM)
        sock.settimeout(1)
        try:
            sock.connect((self.host, port))
            sock.sendall(b"GET /health HTTP/1.0\r\n\r\n")
            return b'"health":"true"' in sock.recv(4096)
        except OSError:
            return False
        finally:
            sock.close()

    def stop(self) -> None:
        for proc in self.procs:
            with contextlib.suppress(ProcessLookupError):
                proc.kill()
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(10)
        self.procs.clear()


# ---------------------------------------------------------------------- the nodes


class VipNode:
    """One ``interknit up`` in a node namespace."""

    def __init__(self, lab: Lab, node: str, workdir: Path, config: str, binary: str) -> None:
        self.lab = lab
        self.node = node
        self.ns = lab.ns(node)
        self.binary = binary
        self.config_path = workdir / f"{node}.toml"
        self.log_path = workdir / f"{node}.log"
        self.config_path.write_text(config)
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self, wait: bool = True) -> VipNode:
        log = self.log_path.open("ab")
        self.proc = subprocess.Popen(
            ["ip", "netns", "exec", self.ns, self.binary, "up", "-c", str(self.config_path)],
            stdout=log,
            stderr=subprocess.STDOUT,
            cwd=self.config_path.parent,
        )
        if wait:
            self.wait_ready()
        return self

    def wait_ready(self, timeout: float = 30.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            assert self.proc is not None
            if self.proc.poll() is not None:
                raise RuntimeError(f"{self.node} exited:\n{self.log()[-3000:]}")
            with contextlib.suppress(OSError, ValueError, IndexError):
                if http_get(self.ns, 7470, "/v1/health")[0] == 200:
                    return
            time.sleep(0.1)
        raise RuntimeError(f"{self.node} did not become ready:\n{self.log()[-3000:]}")

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def kill9(self) -> None:
        assert self.proc is not None
        # ``ip netns exec`` replaces itself with the program: the pid is the node's.
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(10)

    def terminate(self, timeout: float = 20.0) -> int:
        assert self.proc is not None
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        return self.proc.wait(timeout)

    def metrics(self) -> str:
        return http_get(self.ns, 7470, "/metrics")[1]


def node_config(
    lab: Lab, node: str, etcd: list[str], workdir: Path, extra: str = "", vips: list[str] = VIPS
) -> str:
    addresses = ", ".join(f'"{v}"' for v in vips)
    endpoints = ", ".join(f'"{e}"' for e in etcd)
    return f"""
[node]
name = "{node}"
data_dir = "{workdir / (node + "-data")}"

[registry]
backend = "etcd"
etcd = [{endpoints}]
etcd_timeout = "1s"
node_ttl = "2s"

[dns]
enabled = false

[vip]
addresses = [{addresses}]
interface = "eth0"
lease_ttl = "2s"
track = [{{ tcp = "127.0.0.1:{TRACK_PORT}", interval = "100ms", timeout = "100ms", fall = 2 }}]
{extra}
"""


# ---------------------------------------------------------------------- traffic


@dataclass
class Reply:
    at: float
    vip: str
    node: str


class Traffic:
    """Every node answers UDP on ECHO_PORT with its name; the client asks every VIP every
    ``every`` seconds. Each reply is kept with the time it came back."""

    def __init__(self, lab: Lab, vips: list[str] = VIPS, every: float = 0.005) -> None:
        self.lab = lab
        self.vips = vips
        self.every = every
        self.replies: list[Reply] = []
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._sel = selectors.DefaultSelector()
        self.track_listeners: dict[str, socket.socket] = {}

    def start(self) -> Traffic:
        for node in self.lab.nodes:
            sock = ns_socket(self.lab.ns(node), socket.AF_INET6, socket.SOCK_DGRAM)
            sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
            sock.bind(("::", ECHO_PORT))
            sock.setblocking(False)
            self._sel.register(sock, selectors.EVENT_READ, node)
            self.set_healthy(node, True)
        client = ns_socket(self.lab.ns("client"), socket.AF_INET6, socket.SOCK_DGRAM)
        client.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
        client.bind(("::", 0))
        client.setblocking(False)
        self.client = client
        self._sel.register(client, selectors.EVENT_READ, None)
        self._thread = threading.Thread(target=self._run, name="vip-traffic", daemon=True)
        self._thread.start()
        return self

    def set_healthy(self, node: str, healthy: bool) -> None:
        """What the node's track (tcp 127.0.0.1:TRACK_PORT) finds: a listener, or none."""
        sock = self.track_listeners.pop(node, None)
        if sock is not None:
            sock.close()
        if healthy:
            sock = ns_socket(self.lab.ns(node), socket.AF_INET, socket.SOCK_STREAM)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            sock.bind(("127.0.0.1", TRACK_PORT))
            sock.listen(64)
            self.track_listeners[node] = sock

    def _run(self) -> None:
        targets = [(v if ":" in v else f"::ffff:{v}", v) for v in self.vips]
        next_probe = time.monotonic()
        while not self._stop.is_set():
            now = time.monotonic()
            if now >= next_probe:
                for target, vip in targets:
                    with contextlib.suppress(OSError):
                        self.client.sendto(vip.encode(), (target, ECHO_PORT))
                next_probe = max(next_probe + self.every, now)
            for key, _ in self._sel.select(max(0.0, next_probe - time.monotonic())):
                sock: socket.socket = key.fileobj  # type: ignore[assignment]
                for _ in range(64):
                    try:
                        data, addr = sock.recvfrom(512)
                    except (BlockingIOError, InterruptedError):
                        break
                    except OSError:
                        break
                    if key.data is None:  # the client: a reply
                        vip, _, node = data.decode(errors="replace").partition("|")
                        self.replies.append(Reply(time.monotonic(), vip, node))
                    else:  # a node: answer with its name
                        with contextlib.suppress(OSError):
                            sock.sendto(data + b"|" + key.data.encode(), addr)
            # Accept-and-close on the track listeners keeps their backlog short.
            for sock in list(self.track_listeners.values()):
                with contextlib.suppress(OSError):
                    sock.setblocking(False)
                    conn, _ = sock.accept()
                    conn.close()

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(5)
        for key in list(self._sel.get_map().values()):
            key.fileobj.close()  # type: ignore[union-attr]
        for sock in self.track_listeners.values():
            sock.close()
        self._sel.close()

    # ------------------------------------------------------------------ reading

    def owner(self, vip: str, since: float) -> str | None:
        """Who answered ``vip`` last, if anyone answered after ``since``."""
        for reply in reversed(self.replies):
            if reply.at < since:
                return None
            if reply.vip == vip:
                return reply.node
        return None

    def owners(self, since: float) -> dict[str, str | None]:
        return {vip: self.owner(vip, since) for vip in self.vips}

    def gap(self, vip: str, start: float, end: float) -> float:
        """The longest time without an answer for ``vip`` between start and end."""
        times = [r.at for r in self.replies if r.vip == vip and start <= r.at <= end]
        if not times:
            return end - start
        edges = [start, *times, end]
        return max(b - a for a, b in itertools.pairwise(edges))


# ---------------------------------------------------------------------- addresses


@dataclass
class AddressLog:
    """Every VIP address added or removed in any of the lab's namespaces, in kernel order."""

    lab: Lab
    vips: list[str] = field(default_factory=lambda: list(VIPS))
    events: list[tuple[float, str, str, bool]] = field(default_factory=list)  # at, ns, vip, up
    violations: list[str] = field(default_factory=list)
    overflowed: bool = False

    def start(self) -> AddressLog:
        sol_netlink, add_membership, listen_all_nsid = 270, 1, 8
        sock = socket.socket(socket.AF_NETLINK, socket.SOCK_RAW, 0)  # NETLINK_ROUTE
        sock.setsockopt(socket.SOL_SOCKET, 33, 8 << 20)  # SO_RCVBUFFORCE
        sock.bind((0, 0))
        for group in (5, 9):  # RTNLGRP_IPV4_IFADDR, RTNLGRP_IPV6_IFADDR
            sock.setsockopt(sol_netlink, add_membership, group)
        sock.setsockopt(sol_netlink, listen_all_nsid, 1)
        sock.settimeout(0.2)
        self._sock = sock
        self._names = self.lab.nsids()
        self._holders: dict[str, set[str]] = {v: set() for v in self.vips}
        self._wanted = {socket.inet_pton(socket.AF_INET6 if ":" in v else socket.AF_INET, v): v
                        for v in self.vips}  # fmt: skip
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="vip-addresses", daemon=True)
        self._thread.start()
        return self

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                data, anc, _, _ = self._sock.recvmsg(1 << 16, socket.CMSG_SPACE(4))
            except TimeoutError:
                continue
            except OSError:  # ENOBUFS: events were lost, the log cannot be trusted
                self.overflowed = True
                continue
            now = time.monotonic()
            nsid = next((struct.unpack("i", c[:4])[0] for lvl, t, c in anc if lvl == 270), -1)
            ns = self._names.get(nsid)
            if ns is None:
                continue
            offset = 0
            while offset + 24 <= len(data):
                length, kind = struct.unpack_from("IH", data, offset)
                attr = offset + 24
                while attr + 4 <= offset + length:
                    alen, atype = struct.unpack_from("HH", data, attr)
                    if atype in (1, 2):  # IFA_ADDRESS, IFA_LOCAL
                        vip = self._wanted.get(data[attr + 4 : attr + alen])
                        if vip is not None and kind in (20, 21):
                            self._note(now, ns, vip, kind == 20)
                            break
                    attr += (alen + 3) & ~3
                offset += (length + 3) & ~3

    def _note(self, at: float, ns: str, vip: str, up: bool) -> None:
        self.events.append((at, ns, vip, up))
        holders = self._holders[vip]
        if up:
            holders.add(ns)
            if len(holders) > 1:
                self.violations.append(f"{at:.4f} {vip} on {sorted(holders)}")
        else:
            holders.discard(ns)

    def holders(self) -> dict[str, set[str]]:
        return {v: set(h) for v, h in self._holders.items()}

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(5)
        self._sock.close()
