"""Interfaces are Protocols with every member named, not objects probed with getattr."""

from __future__ import annotations

import ast
from pathlib import Path

from interknit.registry.registry import Registry
from interknit.registry.store import SqliteStore

SRC = Path(__file__).resolve().parent.parent / "src" / "interknit"


def optional_members(files: list[Path]) -> list[str]:
    """``getattr(obj, "name", default)``: a member read as if it might be missing."""
    found = []
    for path in files:
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if (
                isinstance(node, ast.Call)
                and isinstance(node.func, ast.Name)
                and node.func.id in ("getattr", "hasattr")
                and len(node.args) >= 2
                and isinstance(node.args[1], ast.Constant)
            ):
                found.append(f"{path.relative_to(SRC)}:{node.lineno} {node.args[1].value}")
    return found


def test_no_optional_members() -> None:
    """node.py read ``getattr(registry, "owns", ...)`` and compat/api.py also
    ``getattr(registry.state, "owner", ...)``: ``owns`` is RegistryBackend's and ``owner``
    RegistryState's now; the proxy's Admission, Permit and PoolLike name theirs (issue 12)."""
    assert optional_members(sorted(SRC.rglob("*.py"))) == []


def test_node_types_what_it_holds() -> None:
    """No attribute of the node, and nothing it returns, is typed Any (its proxy, health
    checker, workers, Consul API)."""
    tree = ast.parse((SRC / "node.py").read_text(encoding="utf-8"))
    untyped = [
        ast.unparse(node.target)
        for node in ast.walk(tree)
        if isinstance(node, ast.AnnAssign)
        and isinstance(node.target, ast.Attribute)
        and ast.unparse(node.annotation) == "Any"
    ] + [
        node.name
        for node in ast.walk(tree)
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef))
        and node.returns is not None
        and ast.unparse(node.returns) == "Any"
    ]
    assert untyped == []


def test_the_embedded_registry_owns_every_instance(tmp_path: Path) -> None:
    registry = Registry(SqliteStore(str(tmp_path)))
    assert registry.owns("web", "a") is True
    assert registry.state.owner("web", "a") is None
