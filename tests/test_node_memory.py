"""What a node process holds in memory that it has no use for."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from tests.nodeproc import free_port

# Runs ``interknit up`` through the real command in a fresh interpreter, waits until the node
# answers on its API, and reports what the process holds; then stops the node with SIGTERM.
PROBE = r"""
import asyncio, gc, json, os, signal, ssl, sys, urllib.request
import interknit.cli as cli

port = int(sys.argv[2])
real_run = cli.run
report = {}

async def until_up_then_stop():
    while True:
        try:
            reader, writer = await asyncio.open_connection("127.0.0.1", port)
        except OSError:
            await asyncio.sleep(0.05)
            continue
        writer.write(b"GET /v1/health HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        answer = await reader.read()
        writer.close()
        if answer.startswith(b"HTTP/1.1 200"):
            break
        await asyncio.sleep(0.05)
    report["tls_contexts"] = sum(isinstance(o, ssl.SSLContext) for o in gc.get_objects())
    os.kill(os.getpid(), signal.SIGTERM)

def run(coro):
    async def both():
        probe = asyncio.ensure_future(until_up_then_stop())
        try:
            await coro
        finally:
            probe.cancel()
    return real_run(both())

cli.run = run
try:
    cli.main(["up", "-c", sys.argv[1], "--log-level", "warning"], standalone_mode=False)
finally:
    # Others in the process still have TLS.
    report["https_handler"] = hasattr(urllib.request, "HTTPSHandler")
    report["new_context_verifies"] = ssl.create_default_context().verify_mode == ssl.CERT_REQUIRED
    print(json.dumps(report))
"""


def test_node_builds_no_tls_context(tmp_path: Path) -> None:
    # aiohttp loads the system's CA bundle into two client contexts when imported (about
    # 2.5 MiB); a node, whose HTTP is all plain, imports it without them.
    api = free_port()
    config = tmp_path / "interknit.toml"
    config.write_text(
        f'[node]\ndata_dir = "{tmp_path}/data"\n'
        f'[registry]\nlisten = "127.0.0.1:{api}"\n'
        f'[dns]\nlisten = "127.0.0.1:{free_port()}"\n'
        f'[[listeners]]\nname = "web"\nlisten = "127.0.0.1:{free_port()}"\n'
        f'[[listeners.routes]]\nservice = "web"\n'
    )
    done = subprocess.run(
        [sys.executable, "-c", PROBE, str(config), str(api)],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=tmp_path,
    )
    assert done.returncode == 0, done.stderr
    report = json.loads(done.stdout.strip().splitlines()[-1])
    assert report == {"tls_contexts": 0, "https_handler": True, "new_context_verifies": True}
