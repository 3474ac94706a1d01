"""The package's shape, read from its imports with ast; each rule is also shown to catch a planted breach.

Rules: only the edge (the CLI, the composition root, the developer tools) reads the
settings; arq and redis only behind the queue adapter; no import cycle; the core
imports no tooling (developer tools, the bench, test libraries); only settings read
the environment.
"""

from __future__ import annotations

import ast
from collections.abc import Callable
from pathlib import Path

import pytest

import outbox_relay

PACKAGE = Path(outbox_relay.__file__).resolve().parent
QUEUE_LIBRARIES = {"arq", "redis"}
#: The edge: the only modules that may import outbox_relay.settings.
EDGE = {"outbox_relay.cli", "outbox_relay.composition", "outbox_relay.settings"}
#: What the core never imports (the CLI reaches the demo lazily, inside its command).
TOOLING = ("outbox_relay.devtools", "bench", "tests", "pytest", "testcontainers", "psutil")

Modules = dict[str, Path]


def _modules(root: Path = PACKAGE) -> Modules:
    found = {}
    for path in root.rglob("*.py"):
        parts = path.relative_to(root.parent).with_suffix("").parts
        name = ".".join(parts).removesuffix(".__init__")
        found[name] = path
    return found


def _imports(path: Path, module: str) -> set[str]:
    """Every module ``path`` imports, absolute names, relative imports resolved."""
    names: set[str] = set()
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join([*anchor, base]) if base else ".".join(anchor)
            names.add(base)
            names.update(f"{base}.{alias.name}" for alias in node.names)
    return names


def _is_tool(name: str) -> bool:
    return name.startswith("outbox_relay.devtools")


def settings_below_the_edge(modules: Modules) -> dict[str, str]:
    """Modules below the edge that import outbox_relay.settings (the core gets narrow configs)."""
    return {
        name: "outbox_relay.settings"
        for name, path in modules.items()
        if name not in EDGE and not _is_tool(name) and "outbox_relay.settings" in _imports(path, name)
    }


def queue_libraries_outside_the_adapter(modules: Modules) -> dict[str, str]:
    """Modules outside outbox_relay.arq_adapter that import arq or redis."""
    found = {}
    for name, path in modules.items():
        if name.startswith("outbox_relay.arq_adapter"):
            continue
        libraries = sorted({i.split(".")[0] for i in _imports(path, name)} & QUEUE_LIBRARIES)
        if libraries:
            found[name] = ",".join(libraries)
    return found


def tooling_in_the_core(modules: Modules) -> dict[str, str]:
    """Core modules importing tooling, a CLI importing the developer tools at its top level, and any
    module of the package importing the bench (it is not in the wheel) or the tests."""
    found = {}
    for name, path in modules.items():
        if _is_tool(name):  # the demo's tools may use each other, never the bench or the tests
            tools = sorted(i for i in _imports(path, name) if i.split(".")[0] in {"bench", "tests"})
            if tools:
                found[name] = ",".join(tools)
            continue
        if name == "outbox_relay.cli":
            tree = ast.parse(path.read_text())
            imported = {n.module or "" for n in tree.body if isinstance(n, ast.ImportFrom)}
        else:
            imported = _imports(path, name)
        tools = sorted(i for i in imported if i.split(".")[0] in TOOLING or _is_tool(i))
        if tools:
            found[name] = ",".join(tools)
    return found


def environment_readers(modules: Modules) -> dict[str, str]:
    """Modules other than the settings and the developer tools that read os.environ."""
    return {
        name: "os.environ"
        for name, path in modules.items()
        if name not in {"outbox_relay.settings"} and not _is_tool(name) and "os.environ" in path.read_text()
    }


def import_cycle(modules: Modules) -> dict[str, str]:
    """One import cycle between the package's own modules, if any."""
    edges = {
        name: {target for target in _imports(path, name) if target in modules and target != name}
        for name, path in modules.items()
    }
    cycle = _find_cycle(edges)
    return {cycle[0]: " -> ".join(cycle)} if cycle else {}


def _find_cycle(edges: dict[str, set[str]]) -> list[str] | None:
    """A cycle of ``edges`` (module -> modules it imports), or None."""
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        stack.append(node)
        for nxt in sorted(edges.get(node, ())):
            if state.get(nxt) == 1:
                return [*stack[stack.index(nxt) :], nxt]
            if not state.get(nxt) and (cycle := visit(nxt)):
                return cycle
        stack.pop()
        state[node] = 2
        return None

    for module in sorted(edges):
        if not state.get(module) and (cycle := visit(module)):
            return cycle
    return None


Rule = Callable[[Modules], dict[str, str]]
RULES: dict[str, Rule] = {
    "settings below the edge": settings_below_the_edge,
    "arq/redis outside the adapter": queue_libraries_outside_the_adapter,
    "tooling in the core": tooling_in_the_core,
    "environment read outside settings": environment_readers,
    "import cycle": import_cycle,
}

#: One planted breach per rule: (module path in a copy of the package, source).
PLANTED: dict[str, tuple[str, str]] = {
    "settings below the edge": ("relay/planted.py", "from outbox_relay.settings import Settings\n"),
    "arq/redis outside the adapter": ("worker/planted.py", "from redis.asyncio import Redis\n"),
    "tooling in the core": ("devtools/planted.py", "import bench.scenarios\n"),
    "environment read outside settings": ("prune_planted.py", "import os\nX = os.environ['X']\n"),
    "import cycle": ("events_planted.py", "import outbox_relay.events_planted2\n"),
}


@pytest.mark.parametrize("rule", sorted(RULES))
def test_the_package_keeps_the_rule(rule: str) -> None:
    """The real package breaks none of the rules."""
    modules = _modules()
    assert len(modules) > 40, "the module reader found too few modules"
    assert RULES[rule](modules) == {}, f"{rule}: {RULES[rule](modules)}"


@pytest.mark.parametrize("rule", sorted(RULES))
def test_each_rule_catches_a_planted_breach(rule: str, tmp_path: Path) -> None:
    """A copy of the package with one planted module breaking the rule is caught, naming the module."""
    root = tmp_path / "outbox_relay"
    for path in PACKAGE.rglob("*.py"):
        target = root / path.relative_to(PACKAGE)
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_text(path.read_text())
    relative, source = PLANTED[rule]
    (root / relative).write_text(source)
    if rule == "import cycle":
        (root / "events_planted2.py").write_text("from outbox_relay import events_planted\n")
    planted = "outbox_relay." + relative.removesuffix(".py").replace("/", ".")
    assert planted in RULES[rule](_modules(root))


def test_the_adapter_really_is_where_arq_is_used() -> None:
    """The rule sees imports: the adapter itself imports both libraries."""
    used = set()
    for name, path in _modules().items():
        if name.startswith("outbox_relay.arq_adapter"):
            used |= {i.split(".")[0] for i in _imports(path, name)}
    assert used >= QUEUE_LIBRARIES


def test_the_cycle_finder_finds_a_cycle() -> None:
    """The search reports a -> b -> c -> a, and nothing for a chain."""
    assert _find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert _find_cycle({"a": {"b"}, "b": {"c"}, "c": set()}) is None


def test_the_import_reader_resolves_package_imports() -> None:
    """Imports of a package's own submodules are seen, so a cycle through them would be found."""
    names = _imports(PACKAGE / "relay" / "__init__.py", "outbox_relay.relay")
    assert "outbox_relay.relay.service" in names
