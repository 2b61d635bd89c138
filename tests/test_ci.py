""".ci/run on every supported Python: how it finds them, and what a missing one does.

The script runs for real, in dry-run mode, on a PATH of stand-in interpreters (tiny scripts
that print their version) and a stand-in pyenv root.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import tomllib
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
SUPPORTED = ("3.11", "3.12", "3.13")


def fake_python(path: Path, version: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(f"#!/bin/sh\necho {version}\n")
    path.chmod(0o755)


def run_ci(tmp_path: Path, **env: str) -> subprocess.CompletedProcess[str]:
    tools = tmp_path / "bin"
    tools.mkdir(exist_ok=True)
    for tool in ("bash", "sh", "ls", "sort", "dirname", "cat"):
        found = shutil.which(tool)
        assert found is not None, tool
        if not (tools / tool).exists():
            (tools / tool).symlink_to(found)
    return subprocess.run(
        ["bash", str(ROOT / ".ci" / "run")],
        capture_output=True,
        text=True,
        timeout=60,
        env={
            "PATH": str(tools),
            "HOME": str(tmp_path / "home"),
            "PYENV_ROOT": str(tmp_path / "pyenv"),
            "INTERKNIT_CI_DRY_RUN": "1",
            **env,
        },
    )


def test_each_python_from_path_or_the_newest_under_pyenv(tmp_path: Path) -> None:
    fake_python(tmp_path / "bin" / "python3.11", "3.11")
    fake_python(tmp_path / "bin" / "python3.12", "3.10")  # a wrong one on PATH is passed over
    for patch in ("3.12.1", "3.12.10", "3.12.9"):
        fake_python(tmp_path / "pyenv" / "versions" / patch / "bin" / "python", "3.12")
    fake_python(tmp_path / "pyenv" / "versions" / "3.13.0" / "bin" / "python", "3.13")
    result = run_ci(tmp_path, CI="true")
    assert result.returncode == 0, result.stdout + result.stderr
    runs = [line for line in result.stdout.splitlines() if "./scripts/test" in line]
    assert runs == [
        f"PYTHON={tmp_path}/bin/python3.11 INTERKNIT_LINT=1 INTERKNIT_SUITE=all ./scripts/test ",
        f"PYTHON={tmp_path}/pyenv/versions/3.12.10/bin/python INTERKNIT_LINT=0 "
        "INTERKNIT_SUITE=cross-python ./scripts/test ",
        f"PYTHON={tmp_path}/pyenv/versions/3.13.0/bin/python INTERKNIT_LINT=0 "
        "INTERKNIT_SUITE=cross-python ./scripts/test ",
    ]


@pytest.mark.parametrize("ci", [{"CI": "true"}, {"INTERKNIT_STRICT": "1"}])
def test_a_missing_python_fails_in_ci(tmp_path: Path, ci: dict[str, str]) -> None:
    fake_python(tmp_path / "bin" / "python3.11", "3.11")
    fake_python(tmp_path / "bin" / "python3.13", "3.13")
    result = run_ci(tmp_path, **ci)
    assert result.returncode == 1
    assert "Python 3.12 is not installed" in result.stderr


def test_a_missing_python_is_said_and_skipped_elsewhere(tmp_path: Path) -> None:
    fake_python(tmp_path / "bin" / "python3.11", "3.11")
    fake_python(tmp_path / "bin" / "python3.13", "3.13")
    result = run_ci(tmp_path)
    assert result.returncode == 0, result.stderr
    assert "Python 3.12 is not installed here: skipped" in result.stdout
    assert "INTERKNIT_SUITE=all" in result.stdout
    assert f"{tmp_path}/bin/python3.13 INTERKNIT_LINT=0" in result.stdout


def test_pyproject_lists_the_pythons_ci_runs() -> None:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    listed = {
        c.rsplit(" :: ", 1)[1]
        for c in project["classifiers"]
        if c.startswith("Programming Language :: Python :: 3.")
    }
    assert listed == set(SUPPORTED)
    assert project["requires-python"] == f">={SUPPORTED[0]}"
    assert f"for want in {' '.join(SUPPORTED)}; do" in (ROOT / ".ci" / "run").read_text()
    assert os.access(ROOT / ".ci" / "run", os.X_OK) and os.access(
        ROOT / "scripts" / "test", os.X_OK
    )
