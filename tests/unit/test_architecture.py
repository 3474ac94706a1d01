"""The package's shape, read from its imports with ast: the queue library behind one adapter, no cycle."""

from __future__ import annotations

import ast
from pathlib import Path

import outbox_relay

PACKAGE = Path(outbox_relay.__file__).resolve().parent
ADAPTER = PACKAGE / "arq_adapter"
QUEUE_LIBRARIES = {"arq", "redis"}


def _modules() -> dict[str, Path]:
    found = {}
    for path in PACKAGE.rglob("*.py"):
        parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
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


def test_arq_and_redis_are_imported_only_by_the_queue_adapter() -> None:
    """No module outside outbox_relay/arq_adapter/ imports arq or redis (the queue port hides them)."""
    offenders = {
        name: sorted(top for top in {i.split(".")[0] for i in _imports(path, name)} if top in QUEUE_LIBRARIES)
        for name, path in _modules().items()
        if ADAPTER not in path.parents
    }
    offenders = {name: libs for name, libs in offenders.items() if libs}
    assert not offenders, f"arq/redis imported outside the adapter: {offenders}"


def test_the_adapter_really_is_where_arq_is_used() -> None:
    """The check above sees imports: the adapter itself imports both libraries."""
    used = set()
    for name, path in _modules().items():
        if ADAPTER in path.parents:
            used |= {i.split(".")[0] for i in _imports(path, name)}
    assert used >= QUEUE_LIBRARIES


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


def test_the_package_has_no_import_cycle() -> None:
    """Following every import between the package's own modules never comes back to where it started."""
    modules = _modules()
    edges = {
        name: {target for target in _imports(path, name) if target in modules and target != name}
        for name, path in modules.items()
    }
    assert sum(map(len, edges.values())) > 50, "the import reader found too few edges"
    cycle = _find_cycle(edges)
    assert cycle is None, "import cycle: " + " -> ".join(cycle or [])


def test_the_cycle_finder_finds_a_cycle() -> None:
    """The search reports a -> b -> c -> a, and nothing for a chain."""
    assert _find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert _find_cycle({"a": {"b"}, "b": {"c"}, "c": set()}) is None


def test_the_import_reader_resolves_package_imports() -> None:
    """Imports of a package's own submodules are seen, so a cycle through them would be found."""
    names = _imports(PACKAGE / "relay" / "__init__.py", "outbox_relay.relay")
    assert "outbox_relay.relay.service" in names


def test_the_core_does_not_import_the_developer_tools() -> None:
    """demo and embedded servers live apart: only the CLI reaches them, lazily, inside commands."""
    for name, path in _modules().items():
        if name.startswith("outbox_relay.devtools") or name == "outbox_relay.cli":
            continue
        devtools = {i for i in _imports(path, name) if i.startswith("outbox_relay.devtools")}
        assert not devtools, f"{name} imports {devtools}"
    tree = ast.parse((PACKAGE / "cli.py").read_text())
    top_level = {
        node.module for node in tree.body if isinstance(node, ast.ImportFrom) and node.module is not None
    }
    assert not {m for m in top_level if m.startswith("outbox_relay.devtools")}, "cli imports devtools eagerly"


def test_the_package_never_imports_the_benchmark() -> None:
    """bench/ sits next to the package and is not in the wheel: nothing in outbox_relay imports it."""
    for name, path in _modules().items():
        bench = {i for i in _imports(path, name) if i == "bench" or i.startswith("bench.")}
        assert not bench, f"{name} imports {bench}"


def test_the_core_reads_no_environment() -> None:
    """Settings are built at the edge: no module but settings.py and the devtools reads os.environ."""
    for name, path in _modules().items():
        if name in {"outbox_relay.settings"} or name.startswith("outbox_relay.devtools"):
            continue
        assert "os.environ" not in path.read_text(), f"{name} reads os.environ"
