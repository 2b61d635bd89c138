"""``interknit run`` as a real process around real children, against a real node: what the
registry, DNS and the proxy see while the child starts, serves, drains, crashes or outlives
its supervisor."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections import Counter
from collections.abc import Callable
from pathlib import Path

import httpx
import pytest

from tests.agent.conftest import CHILD, Node, Supervised, child, wait_until
from tests.conftest import require_tool
from tests.nodeproc import INTERKNIT, NodeProcess, free_port

Start = Callable[..., Supervised]


def accepts(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=0.5):
            return True
    except OSError:
        return False


def http_server(tmp_path: Path, route: str, delay: float = 0.0) -> list[str]:
    """``python -m http.server`` on $PORT, serving a file the proxy route asks for."""
    www = tmp_path / "www"
    www.mkdir(exist_ok=True)
    (www / route).write_text(route)
    serve = f"exec {sys.executable} -m http.server --bind 127.0.0.1 --directory {www} $PORT"
    return ["sh", "-c", f"sleep {delay}; {serve}" if delay else serve]


def test_registered_only_once_the_port_opens_then_dns_and_proxy_answer(
    node: Node, supervise: Start, tmp_path: Path
) -> None:
    port = free_port()
    cmd = http_server(tmp_path, "late", delay=1.0)
    run = supervise(node, "late", cmd, "--port", str(port), "--drain", "0s")
    start = time.monotonic()
    seen_closed = False
    while not node.instances("late"):
        # Registry first, then the port: registered implies the port already accepted.
        seen_closed |= not accepts(port)
        assert time.monotonic() - start < 15, run.log()
        time.sleep(0.02)
    assert accepts(port)
    assert seen_closed and time.monotonic() - start >= 0.9  # it waited for the port
    [inst] = node.instances("late")
    assert (inst["address"], inst["port"], inst["health"]) == ("127.0.0.1", port, "passing")
    meta = inst["meta"]
    assert isinstance(meta, dict) and meta["owner"].startswith("run:")
    # A lookup may show a write the store has not committed yet; DNS and the proxy follow the
    # commit, a moment later.
    wait_until(lambda: node.dns_ports("late") == [port], 5)
    assert node.dns_addresses("late") == {"127.0.0.1"}
    r = node.get("late")
    assert (r.status_code, r.text) == (200, "late")
    run.signal(signal.SIGTERM)
    assert run.wait() == 128 + signal.SIGTERM  # http.server dies of it; we say so
    assert node.instances("late") == [] and node.nxdomain("late")


def test_draining_is_visible_before_the_child_gets_sigterm(
    node: Node, supervise: Start, tmp_path: Path
) -> None:
    seen = tmp_path / "seen-at-term.json"
    cmd = child("drain", "--on-term", str(seen))
    env = {"CHILD_DNS_PORT": str(node.dns_port), "INTERKNIT_API": node.url}
    run = supervise(node, "drain", cmd, "--port", "0", "--drain", "1500ms", "--id", "d1", env=env)
    wait_until(lambda: node.dns_ports("drain"))
    assert node.get("drain").text == "drain"
    asked = time.time()
    run.signal(signal.SIGTERM)
    # While it drains: out of DNS and of the proxy's choices, still registered and running.
    wait_until(lambda: (node.instance("drain", "d1") or {}).get("health") == "draining", 5)
    wait_until(lambda: node.dns_ports("drain") == [], 5)
    assert node.get("drain").status_code == 503
    assert node.instance("drain", "d1") is not None  # all this while it drained
    assert run.wait() == 0  # the child's own status
    record = json.loads(seen.read_text())
    assert record["health"] == "draining" and record["dns_ports"] == []
    assert record["at"] - asked >= 1.4  # the drain time passed before SIGTERM
    assert node.instance("drain", "d1") is None
    assert "event=run.set_draining" in run.log()


def test_a_crash_is_deregistered_within_a_second(
    node: Node, supervise: Start, tmp_path: Path
) -> None:
    run = supervise(node, "crash", http_server(tmp_path, "crash"), "--port", "0", "--ttl", "30s")
    wait_until(lambda: node.instances("crash"))
    os.kill(run.child_pid(), signal.SIGKILL)
    took = wait_until(lambda: not node.instances("crash"), 5, every=0.005)
    assert took < 1.0, f"deregistered {took:.3f}s after the crash"
    assert run.wait() == 128 + signal.SIGKILL
    assert node.nxdomain("crash")


def test_kill_9_of_the_supervisor_leaves_it_to_the_lease(
    node: Node, supervise: Start, tmp_path: Path
) -> None:
    run = supervise(node, "orphan", child("orphan"), "--port", "0", "--ttl", "1s")
    wait_until(lambda: node.instances("orphan"))
    child_pid = run.child_pid()
    run.signal(signal.SIGKILL)
    run.wait()
    killed = time.monotonic()
    time.sleep(0.3)
    assert node.instances("orphan"), "removed before its lease ran out"
    wait_until(lambda: not node.instances("orphan"), 5)
    assert 0.6 <= time.monotonic() - killed <= 4.0
    # The child was in its own process group and outlived its supervisor; tidy it up.
    os.killpg(child_pid, signal.SIGKILL)


def test_notify_waits_for_ready_1(node: Node, supervise: Start) -> None:
    cmd = child("notify", "--ready-after", "1.0")
    run = supervise(node, "notify", cmd, "--port", "0", "--notify")
    pid = run.child_pid()
    start = time.monotonic()
    wait_until(lambda: "listening" in run.log())
    while not node.instances("notify"):
        assert time.monotonic() - start < 10, run.log()
        time.sleep(0.02)
    # The port was open for a second: only READY=1 counted.
    assert "ready at" in run.log()
    ready_at = float(run.log().split("ready at ")[1].split()[0])
    listening_at = float(run.log().split(" at ")[1].split()[0])
    assert ready_at - listening_at >= 0.9
    assert "warmed up" in run.log()  # STATUS= is logged
    wait_until(lambda: node.get("notify").text == "notify", 5)
    os.kill(pid, signal.SIGTERM)
    assert run.wait() == 0


def test_the_child_runs_while_the_node_is_away_and_registers_when_it_returns(
    tmp_path: Path, supervise: Start
) -> None:
    away = NodeProcess(tmp_path)
    run = supervise(away.url, "away", child("away"), "--port", "0", "--id", "a1", "--drain", "0s")
    wait_until(lambda: "listening" in run.log())
    wait_until(lambda: "registry write failed" in run.log())
    assert run.proc.poll() is None
    away.start()
    try:
        wait_until(lambda: away.client.get("/v1/services/away").status_code == 200, 15)
        wait_until(lambda: "event=run.registry_ok" in run.log())
        run.signal(signal.SIGTERM)
        assert run.wait() == 0
        assert away.client.get("/v1/services/away/instances/a1").status_code == 404
    finally:
        away.stop()


def test_signals_are_forwarded_and_the_status_is_the_childs(
    node: Node, supervise: Start, tmp_path: Path
) -> None:
    marker = tmp_path / "hup"
    script = (
        f"trap 'echo hup >> {marker}' HUP; trap 'exit 3' USR1; "
        f"exec 3>&-; {sys.executable} -m http.server --bind 127.0.0.1 $PORT & "
        "while :; do wait; done"
    )
    run = supervise(node, "sig", ["sh", "-c", script], "--port", "0", "--drain", "0s")
    wait_until(lambda: node.instances("sig"))
    run.signal(signal.SIGHUP)
    wait_until(lambda: marker.exists())
    assert run.proc.poll() is None and node.instances("sig")
    run.signal(signal.SIGUSR1)
    assert run.wait() == 3
    assert not node.instances("sig")


def test_a_child_that_ignores_sigterm_is_killed_after_the_stop_timeout(
    node: Node, supervise: Start
) -> None:
    cmd = child("sig", "--ignore-term")
    run = supervise(node, "sig", cmd, "--port", "0", "--drain", "0s", "--stop-timeout", "500ms")
    wait_until(lambda: node.instances("sig"))
    asked = time.monotonic()
    run.signal(signal.SIGINT)  # Ctrl-C: the same path as SIGTERM
    assert run.wait() == 128 + signal.SIGKILL
    assert time.monotonic() - asked >= 0.5
    assert "event=run.kill" in run.log() and not node.instances("sig")


def test_as_pid_1_it_reaps_orphans(node: Node, tmp_path: Path) -> None:
    unshare = require_tool("unshare")
    if os.geteuid() != 0:
        pytest.skip("a PID namespace needs root")
    # The child leaves two orphans behind; in a PID namespace they are handed to PID 1.
    script = f"(sleep 0.6 &); (sleep 0.6 &); exec {sys.executable} {CHILD} pid1"
    log = tmp_path / "pid1.log"
    env = {**os.environ, "INTERKNIT_API": node.url}
    with log.open("wb") as out:
        outer = subprocess.Popen(
            # --kill-child: whatever happens to this test, the namespace dies with unshare.
            [unshare, "--pid", "--fork", "--kill-child", "--mount-proc",
             INTERKNIT, "run", "--service", "sig", "--port", "0", "--drain", "0s",
             "--", "sh", "-c", script],
            stdout=out, stderr=subprocess.STDOUT, env=env,
        )  # fmt: skip
    try:
        wait_until(lambda: node.instances("sig"))
        [supervisor] = children(outer.pid)
        assert "pid=" in log.read_text()  # the supervisor runs as PID 1 inside
        wait_until(lambda: sum(p[1] == "sleep" for p in processes(supervisor)) == 2, 5)
        # Once they end, nothing is left unburied.
        wait_until(lambda: not any(p[1] == "sleep" for p in processes(supervisor)), 5)
        assert all(state != "Z" for _, _, state in processes(supervisor))
        os.kill(supervisor, signal.SIGTERM)
        assert outer.wait(15) == 0
        assert not node.instances("sig")
    finally:
        if outer.poll() is None:
            outer.kill()
            outer.wait()


def children(pid: int) -> list[int]:
    path = Path(f"/proc/{pid}/task/{pid}/children")
    return [int(p) for p in path.read_text().split()]


def processes(parent: int) -> list[tuple[int, str, str]]:
    """(pid, name, state) of the children of ``parent``."""
    out = []
    for pid in children(parent):
        try:
            status = Path(f"/proc/{pid}/status").read_text()
        except OSError:
            continue
        fields = dict(line.split(":\t", 1) for line in status.splitlines() if ":\t" in line)
        out.append((pid, fields["Name"].strip(), fields["State"].split()[0]))
    return out


def test_usage_errors_and_a_command_that_does_not_exist(node: Node, tmp_path: Path) -> None:
    env = {**os.environ, "INTERKNIT_API": node.url}

    def run(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [INTERKNIT, "run", *args], capture_output=True, text=True, env=env, timeout=30
        )

    for args in (
        ("--service", "Bad_Name", "--port", "1", "--", "true"),
        ("--service", "ok", "--port", "1"),
        ("--service", "ok", "--port", "1", "--address", "0.0.0.0", "--", "true"),
    ):
        res = run(*args)
        assert res.returncode == 2, (args, res.stderr)
        assert res.stderr.strip() and "Traceback" not in res.stderr
    res = run("--service", "ok", "--port", "0", "--", str(tmp_path / "no-such-program"))
    assert res.returncode == 127 and "cannot start" in res.stderr
    assert "Traceback" not in res.stderr
    assert node.instances("ok") == []


def test_a_rolling_restart_behind_the_proxy_loses_no_request(node: Node, supervise: Start) -> None:
    def start(n: int) -> Supervised:
        return supervise(
            node, "roll", child(f"v{n}"), "--port", "0", "--id", f"r{n}", "--drain", "200ms"
        )

    old = [start(n) for n in range(3)]
    wait_until(lambda: len(node.dns_ports("roll")) == 3)
    answers: Counter[str] = Counter()
    stop = threading.Event()

    def hammer() -> None:
        with httpx.Client(base_url=node.proxy, timeout=5) as c:
            while not stop.is_set():
                try:
                    r = c.get("/roll")
                    answers[str(r.status_code) if r.status_code != 200 else r.text[:1]] += 1
                except httpx.HTTPError as exc:
                    answers[type(exc).__name__] += 1

    threads = [threading.Thread(target=hammer) for _ in range(2)]
    for t in threads:
        t.start()
    try:
        for n in range(3):
            start(n + 3)
            # In DNS means committed: the proxy knows it too.
            wait_until(lambda: len(node.dns_ports("roll")) == 4)
            old[n].signal(signal.SIGTERM)
            assert old[n].wait() == 0
    finally:
        stop.set()
        for t in threads:
            t.join()
    errors = {k: v for k, v in answers.items() if k != "v"}
    assert answers["v"] > 50 and not errors, answers
    assert sorted(str(i["id"]) for i in node.instances("roll")) == ["r3", "r4", "r5"]
