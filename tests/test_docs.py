"""The manual's examples run: shell blocks against a real node, TOML blocks through the parser."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

from interknit.config import parse_config
from tests.nodeproc import NodeProcess

DOCS = Path(__file__).resolve().parent.parent / "docs"


def blocks(page: str, lang: str) -> list[str]:
    text = (DOCS / page).read_text()
    return re.findall(rf"```{lang}\n(.*?)```", text, flags=re.S)


@pytest.mark.parametrize("page", sorted(p.name for p in DOCS.glob("*.md")))
def test_toml_examples_are_valid_config(page: str) -> None:
    for block in blocks(page, "toml"):
        parse_config(tomllib.loads(block))


def test_registry_examples_run(tmp_path: Path) -> None:
    [example] = [b for b in blocks("registry.md", "sh") if "curl" in b]
    node = NodeProcess(tmp_path).start()
    try:
        script = example.replace("127.0.0.1:7470", f"127.0.0.1:{node.api_port}")
        env = {**os.environ, "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}"}
        res = subprocess.run(
            ["bash", "-euo", "pipefail", "-c", script],
            capture_output=True,
            text=True,
            env=env,
            timeout=60,
        )
        assert res.returncode == 0, res.stdout + res.stderr
        assert '"health":"draining"' in res.stdout
        assert "event: put" in res.stdout
    finally:
        node.stop()
