"""The package's shape: no import cycle among gnlm's modules, counting imports inside functions too."""

from __future__ import annotations

import ast
from pathlib import Path

import gnlm

PACKAGE = Path(gnlm.__file__).parent


def gnlm_imports(path: Path) -> set[str]:
    """Every gnlm module that ``path`` imports, wherever the import statement stands."""
    out: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            out |= {a.name for a in node.names if a.name.startswith("gnlm.")}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            if node.module == "gnlm":  # from gnlm import dist  -> the submodule gnlm.dist
                out |= {f"gnlm.{a.name}" for a in node.names if (PACKAGE / f"{a.name}.py").exists()}
            elif node.module.startswith("gnlm."):
                out.add(node.module)
        elif isinstance(node, ast.ImportFrom) and node.level:
            raise AssertionError(f"{path.name}: relative import; write `from gnlm.x import y`")
    return out


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """A cycle of ``graph`` as a list of nodes (first == last), or None."""
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    path: list[str] = []

    def visit(n: str) -> list[str] | None:
        state[n] = 1
        path.append(n)
        for m in sorted(graph.get(n, ())):
            if state.get(m) == 1:
                return path[path.index(m):] + [m]
            if m not in state and (cycle := visit(m)):
                return cycle
        path.pop()
        state[n] = 2
        return None

    for n in sorted(graph):
        if n not in state and (cycle := visit(n)):
            return cycle
    return None


def test_find_cycle_finds_a_cycle_and_accepts_a_dag():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b", "c"}, "b": {"c"}, "c": set()}) is None


def test_function_level_imports_are_seen(tmp_path):
    f = tmp_path / "m.py"
    f.write_text("def f():\n    from gnlm.train import run_training\n    import gnlm.bench\n")
    assert gnlm_imports(f) == {"gnlm.train", "gnlm.bench"}


def test_no_import_cycle_in_gnlm():
    graph = {f"gnlm.{p.stem}": gnlm_imports(p) for p in PACKAGE.glob("*.py")}
    assert graph["gnlm.cli"], "the walk found no imports at all"
    cycle = find_cycle(graph)
    assert cycle is None, "import cycle: " + " -> ".join(cycle)
