"""docs/client.md's Python examples and examples/client_app.py run against a real node."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.nodeproc import NodeProcess

ROOT = Path(__file__).resolve().parents[2]
BLOCKS = re.findall(r"```python\n(.*?)```", (ROOT / "docs" / "client.md").read_text(), re.S)


@pytest.fixture(scope="module")
def docs_node(tmp_path_factory: pytest.TempPathFactory) -> Iterator[NodeProcess]:
    """One node for every example: each one must leave it empty. Killed at the end rather
    than stopped: a graceful stop waits for blocking queries the examples left open (their
    clients are gone, but the node does not notice), and nothing here needs it."""
    node = NodeProcess(tmp_path_factory.mktemp("docs")).start()
    try:
        yield node
    finally:
        node.kill9()
        node.client.close()


def run_python(source: str, node: NodeProcess) -> subprocess.CompletedProcess[str]:
    script = source.replace("127.0.0.1:7470", f"127.0.0.1:{node.api_port}")
    return subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=30, cwd=ROOT
    )


def test_there_are_examples() -> None:
    assert len(BLOCKS) >= 5


@pytest.mark.parametrize("index", range(len(BLOCKS)))
def test_docs_example_runs(index: int, docs_node: NodeProcess) -> None:
    node = docs_node
    result = run_python(BLOCKS[index], node)
    assert result.returncode == 0, result.stdout + result.stderr
    assert result.stdout.strip(), "an example should print what it found"
    assert "Traceback" not in result.stderr
    # Every example cleans up after itself: nothing stays registered.
    assert node.client.get("/v1/services").json()["services"] == {}


def test_example_app_calls_another_service(node: NodeProcess) -> None:
    env = {**os.environ, "INTERKNIT_API": node.url}
    app = [sys.executable, str(ROOT / "examples" / "client_app.py")]
    clock = subprocess.Popen(
        [*app, "--service", "clock", "--id", "clock-1", "--ttl", "1s"],
        env=env,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert clock.stdout is not None
        assert "registered" in clock.stdout.readline()
        greeter = subprocess.run(
            [*app, "--service", "greeter", "--call", "clock", "--count", "3", "--every", "0.05"],
            env=env,
            capture_output=True,
            text=True,
            timeout=30,
        )
        assert greeter.returncode == 0, greeter.stdout + greeter.stderr
        assert greeter.stdout.count("called clock: {'service': 'clock', 'id': 'clock-1'}") == 3
        services = node.client.get("/v1/services").json()["services"]
        assert services == {"clock": {"instances": 1, "passing": 1}}
    finally:
        clock.terminate()
        clock.wait(10)
    assert clock.returncode == 0
    assert node.client.get("/v1/services").json()["services"] == {}
