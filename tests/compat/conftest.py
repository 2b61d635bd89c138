from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.nodeproc import NodeProcess


@pytest.fixture(scope="module")
def node(tmp_path_factory: pytest.TempPathFactory) -> Iterator[NodeProcess]:
    """One real ``interknit up`` per test module; tests use service names of their own."""
    proc = NodeProcess(Path(tmp_path_factory.mktemp("node"))).start()
    try:
        yield proc
    finally:
        proc.stop()
