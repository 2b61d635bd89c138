"""The layering rules of DESIGN.md ("Dependencies point down"), read from the source's imports.

Every ``import`` and ``from ... import`` in src/interknit counts, wherever it is written:
a function-level import is still a dependency, and one written inside a function to dodge an
import cycle is exactly what these rules exist to catch.
"""

from __future__ import annotations

import ast
from collections.abc import Iterator
from pathlib import Path

SRC = Path(__file__).resolve().parent.parent / "src" / "interknit"

# What consumes the registry (DESIGN.md, "Shape") and the edges; registry/ imports none of them.
CONSUMERS = (
    "proxy",
    "dns",
    "health",
    "admin",
    "client",
    "agent",
    "vip",
    "compat",
    "demand",
    "balance",
)
# What wires components together; no component imports these.
TOP = ("config", "node", "cli", "demo", "workers")
# Small utilities at the bottom: they import no component and nothing above them.
UTILITIES = ("durations", "names", "sections", "heap", "logs", "plainmetrics")


def module_name(path: Path) -> str:
    parts = path.relative_to(SRC.parent).with_suffix("").parts
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts)


def imported(path: Path) -> Iterator[str]:
    """Every interknit module that ``path`` imports, as a dotted name."""
    tree = ast.parse(path.read_text(encoding="utf-8"), str(path))
    package = module_name(path).split(".")
    if path.name != "__init__.py":
        package = package[:-1]
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                yield alias.name
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package[: len(package) - node.level + 1]
                target = ".".join([*base, node.module] if node.module else base)
            else:
                target = node.module or ""
            yield target
            # ``from interknit import config`` imports the module interknit.config; the names
            # that are not modules are dropped by ``graph``.
            for alias in node.names:
                yield f"{target}.{alias.name}"


def graph() -> dict[str, set[str]]:
    paths = sorted(SRC.rglob("*.py"))
    modules = {module_name(path) for path in paths}
    out: dict[str, set[str]] = {}
    for path in paths:
        out[module_name(path)] = {name for name in imported(path) if name in modules}
    return out


GRAPH = graph()
COMPONENTS = tuple(sorted(p.name for p in SRC.iterdir() if (p / "__init__.py").exists()))


def under(module: str, package: str) -> bool:
    """True for ``interknit.<package>`` itself and anything inside it."""
    full = f"interknit.{package}"
    return module == full or module.startswith(full + ".")


def violations(
    sources: tuple[str, ...], forbidden: tuple[str, ...], allowed: frozenset[tuple[str, str]]
) -> list[str]:
    found = []
    for module, targets in sorted(GRAPH.items()):
        if not any(under(module, s) for s in sources):
            continue
        for target in sorted(targets):
            if (module, target) in allowed:
                continue
            if any(under(target, f) for f in forbidden):
                found.append(f"{module} imports {target}")
    return found


NOTHING: frozenset[tuple[str, str]] = frozenset()


def test_the_walk_sees_imports_in_functions_and_relative_ones(tmp_path: Path) -> None:
    """The reader itself: an import hidden in a function is found."""
    assert "interknit.registry.model" in GRAPH["interknit.node"]
    assert GRAPH["interknit.proxy"] >= {"interknit.proxy.listener", "interknit.proxy.pools"}
    lazy = {name for name in GRAPH["interknit.node"] if under(name, "health")}
    assert lazy, "node.py imports interknit.health inside a function"


def test_registry_imports_no_consumer() -> None:
    assert violations(("registry",), (*CONSUMERS, *TOP), NOTHING) == []


def test_balance_and_demand_import_neither_proxy_nor_registry() -> None:
    """They take endpoints and numbers; the proxy (and the client) translate."""
    assert violations(("balance", "demand"), ("proxy", "registry", *TOP), NOTHING) == []


def test_config_and_proxy_setup_do_not_import_each_other() -> None:
    assert not any(under(t, "proxy.setup") for t in GRAPH["interknit.config"])
    assert "interknit.config" not in GRAPH["interknit.proxy.setup"]


def test_components_own_their_config_sections() -> None:
    """config.py composes the components' models; no component reaches up into it."""
    assert violations(COMPONENTS, TOP, NOTHING) == []


def test_registry_fastpath_imports_no_proxy() -> None:
    """What it shares with the proxy of HTTP/1.1 is interknit.http1's (issue 12)."""
    assert violations(("registry",), ("proxy",), NOTHING) == []


def test_utilities_import_no_component() -> None:
    assert violations(UTILITIES, (*COMPONENTS, *TOP), NOTHING) == []


def test_http1_exists_and_imports_neither_proxy_nor_registry() -> None:
    assert "interknit.http1" in GRAPH
    assert violations(("http1",), ("proxy", "registry", *CONSUMERS, *TOP), NOTHING) == []


def test_tls_imports_no_component() -> None:
    """TLS files, contexts and the ClientHello reader are shared by the proxy, the health
    checker, the registry API, the client and the CLI: a utility, like http1."""
    assert "interknit.tls" in GRAPH
    assert violations(("tls",), (*CONSUMERS, "registry", *TOP), NOTHING) == []
