"""The package structure DESIGN.md promises, read from the code's own imports.

Every import counts, at the top of a module, inside a function or under
``TYPE_CHECKING``: a circle that only a lazy import keeps from failing is
still a circle in the design.
"""

from __future__ import annotations

import ast
from collections.abc import Iterator
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
# The distribution's packages and the folders they live in (pyproject's package-dir).
PACKAGES = {"protocol": "protocol", "model": "model", "node": "node", "coordinator": "coordinator"}
GENERATED = {"coordinator_pb2", "coordinator_pb2_grpc"}


def module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return "crowdtrain." + ".".join(parts)


def modules() -> dict[str, Path]:
    found = {}
    for folder in PACKAGES.values():
        for path in sorted((ROOT / folder).rglob("*.py")):
            if path.stem not in GENERATED:
                found[module_name(path)] = path
    return found


def imports(path: Path, name: str, known: set[str]) -> Iterator[str]:
    """The modules of ours that ``path`` (module ``name``) imports, anywhere in it."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.rsplit(".", node.level - 1)[0] if node.level > 1 else package
                base = f"{anchor}.{base}" if base else anchor
            # `from package import module` names a module; `from module import name` does not.
            targets = [f"{base}.{alias.name}" for alias in node.names] + [base]
        else:
            continue
        for target in targets:
            while target and target not in known:
                target = target.rpartition(".")[0]
            if target and target != name:
                yield target


def graph() -> dict[str, set[str]]:
    found = modules()
    known = set(found)
    return {name: set(imports(path, name, known)) for name, path in found.items()}


def cycle(edges: dict[str, set[str]]) -> list[str] | None:
    """One circle in the graph, as the path that closes it, or None."""
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    path: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        path.append(node)
        for nxt in sorted(edges.get(node, ())):
            if state.get(nxt) == 1:
                return path[path.index(nxt) :] + [nxt]
            if nxt not in state and (found := visit(nxt)) is not None:
                return found
        path.pop()
        state[node] = 2
        return None

    for node in sorted(edges):
        if node not in state and (found := visit(node)) is not None:
            return found
    return None


def subpackage(name: str, top: str) -> str:
    """The room a module lives in: its first-level subpackage under ``top``, or ``top``'s
    own modules as themselves (``crowdtrain.coordinator.records``)."""
    rest = name.removeprefix(top).lstrip(".").split(".")
    return f"{top}.{rest[0]}" if rest[0] else top


@pytest.mark.parametrize("top", ["crowdtrain.coordinator", "crowdtrain.node"])
def test_modules_import_each_other_without_a_circle(top: str) -> None:
    edges = {
        name: {t for t in targets if t.startswith(top + ".")}
        for name, targets in graph().items()
        if name.startswith(top + ".")
    }
    assert cycle(edges) is None, f"import circle: {' -> '.join(cycle(edges) or [])}"


@pytest.mark.parametrize("top", ["crowdtrain.coordinator", "crowdtrain.node"])
def test_subpackages_form_a_dag(top: str) -> None:
    edges: dict[str, set[str]] = {}
    for name, targets in graph().items():
        if not name.startswith(top + "."):
            continue
        room = subpackage(name, top)
        for target in targets:
            if target.startswith(top + ".") and subpackage(target, top) != room:
                edges.setdefault(room, set()).add(subpackage(target, top))
    assert cycle(edges) is None, f"subpackage circle: {' -> '.join(cycle(edges) or [])}"


def test_packages_import_only_downwards() -> None:
    allowed = {
        "crowdtrain.protocol": {"crowdtrain.protocol"},
        # model may use protocol's errors and its atomic file writes, nothing else of ours.
        "crowdtrain.model": {
            "crowdtrain.model",
            "crowdtrain.protocol.errors",
            "crowdtrain.protocol.files",
        },
        "crowdtrain.node": {"crowdtrain.node", "crowdtrain.model", "crowdtrain.protocol"},
        "crowdtrain.coordinator": {
            "crowdtrain.coordinator",
            "crowdtrain.model",
            "crowdtrain.protocol",
        },
    }
    wrong = []
    for name, targets in graph().items():
        package = ".".join(name.split(".")[:2])
        for target in targets:
            if not any(target == a or target.startswith(a + ".") for a in allowed[package]):
                wrong.append(f"{name} imports {target}")
    assert not wrong, "\n".join(wrong)


def test_the_checker_sees_a_circle() -> None:
    """The checks above can fail: a circle through a lazy import is found."""
    assert cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert cycle({"a": {"b"}, "b": {"c"}, "c": set()}) is None
    assert subpackage("crowdtrain.node.link.http", "crowdtrain.node") == "crowdtrain.node.link"
