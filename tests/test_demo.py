"""``interknit demo``: the newcomer's first command works end to end."""

from __future__ import annotations

import os
import re
import signal
import subprocess

import httpx

from tests.nodeproc import INTERKNIT, free_port, wait_for


def test_demo_serves_fails_over_and_stops_cleanly() -> None:
    api, dns, proxy = free_port(), free_port(), free_port()
    proc = subprocess.Popen(
        [
            INTERKNIT,
            "demo",
            "--listen",
            f"127.0.0.1:{proxy}",
            "--api-listen",
            f"127.0.0.1:{api}",
            "--dns-listen",
            f"127.0.0.1:{dns}",
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    api_url = f"http://127.0.0.1:{api}"
    env = {**os.environ, "INTERKNIT_API": api_url}
    try:
        with httpx.Client(timeout=5) as c:
            wait_for(
                lambda: (
                    c.get(f"{api_url}/v1/services")
                    .json()["services"]
                    .get("search", {})
                    .get("passing")
                    == 3
                )
            )
            seen = {c.get(f"http://127.0.0.1:{proxy}/search").json()["instance"] for _ in range(30)}
            assert seen == {"search-1", "search-2", "search-3"}
            assert c.get(f"http://127.0.0.1:{proxy}/signup").status_code == 200
            res = subprocess.run(
                [INTERKNIT, "demo", "stop", "search-2"],
                env=env,
                capture_output=True,
                text=True,
                timeout=30,
            )
            assert res.returncode == 0 and "stopped" in res.stdout
            wait_for(
                lambda: (
                    c.get(f"{api_url}/v1/services/search/instances/search-2").json()["health"]
                    == "critical"
                )
            )
            codes = {c.get(f"http://127.0.0.1:{proxy}/search").status_code for _ in range(20)}
            assert codes == {200}
            panel = c.get(f"{api_url}/v1/status").json()["panels"]["demo_backends"]
            assert {r["backend"]: r["running"] for r in panel}["search-2"] is False
            res = subprocess.run(
                [INTERKNIT, "demo", "start", "search-2"],
                env=env,
                capture_output=True,
                text=True,
                timeout=30,
            )
            assert res.returncode == 0
            wait_for(
                lambda: (
                    c.get(f"{api_url}/v1/services/search/instances/search-2").json()["health"]
                    == "passing"
                )
            )
    finally:
        proc.send_signal(signal.SIGTERM)
        out, _ = proc.communicate(timeout=20)
    assert proc.returncode == 0, out
    assert "interknit demo is running" in out
    # The terminal tells the story in words and local times, the recovery as well as the
    # failure, and no raw epoch.
    assert re.search(r"^\d\d:\d\d:\d\d search/search-2 registered", out, re.M), out
    assert re.search(r"^\d\d:\d\d:\d\d warning: search/search-2 is now critical", out, re.M), out
    assert re.search(r"^\d\d:\d\d:\d\d search/search-2 is now passing", out, re.M), out
    assert not re.search(r"\b1\d{9}\.\d+", out), out
