"""Shared test plumbing: tool requirements that fail instead of skipping in strict mode."""

from __future__ import annotations

import os
import shutil
import sys
from pathlib import Path

import pytest

STRICT = os.environ.get("INTERKNIT_STRICT") == "1"


def require_tool(name: str) -> str:
    """Path of an external tool; skip without it, or fail under INTERKNIT_STRICT=1 (CI).

    Tools that come as PyPI packages (the test extra) install beside the interpreter."""
    beside = str(Path(sys.executable).with_name(name))
    path = shutil.which(name) or next(
        (p for p in (beside, f"/usr/sbin/{name}", f"/usr/bin/{name}") if os.path.exists(p)),
        None,
    )
    if path is None:
        message = f"{name} is not installed (./scripts/test installs it when run as root)"
        if STRICT:
            pytest.fail(message)
        pytest.skip(message)
    return path
