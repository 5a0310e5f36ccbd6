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


# The house, bottom to top: a module may import only from layers below its own (data flows config -> data + model
# -> trainer -> results -> report). Every module of the package is in exactly one layer.
LAYERS: list[tuple[str, set[str]]] = [
    ("typed config", {"config"}),
    ("files and processes: checkpoints, the data cache, ranks", {"checkpoint", "cache", "distributed"}),
    ("a launcher's task: its claim, where it runs", {"tasks"}),
    ("where text comes from: corpora and tokenizers", {"corpora", "tokenizer"}),
    ("models gnlm did not write: Hugging Face configs, user factories", {"hf"}),
    ("components: model, data, optimizers, linearisation, FLOP counting, search spaces, statistics",
     {"model", "data", "optim", "schedules", "curvature", "accounting", "search", "stats", "tables"}),
    ("a run's config", {"runconfig"}),
    ("methods and declarations: the GN step, the probe's measure, a run directory and its device, a study",
     {"gauss_newton", "oracle", "rundir", "resources", "study"}),
    ("one run and the results file", {"run", "results"}),
    ("trainers, selection from rows, Slurm jobs", {"train", "selection", "slurm"}),
    ("launchers", {"launch"}),
    ("what the probe measures (its inputs), the probe's table and figure", {"probe_inputs", "probe_report"}),
    ("planning a study, analysis of rows, the probe", {"plan", "analysis", "probe"}),
    ("the figures of a report and a comparison", {"figures"}),
    ("the report", {"report"}),
    ("comparing studies", {"compare"}),
    ("orchestrating a study", {"bench"}),
    ("the command line", {"cli"}),
    ("python -m gnlm", {"__main__"}),
]
HARNESS = {"run", "rundir", "train", "bench", "plan", "results", "launch", "tasks", "slurm", "report", "figures",
           "probe", "probe_report", "cli"}


def layer_violations(graph: dict[str, set[str]], layers: list[tuple[str, set[str]]]) -> list[str]:
    """Every import of ``graph`` (module -> modules it imports, short names) that goes to the same or a higher
    layer, as 'a imports b (layer i -> j)'."""
    level = {m: i for i, (_, mods) in enumerate(layers) for m in mods}
    return [f"{a} imports {b} (layer {level[a]} -> {level[b]})" for a in sorted(graph) for b in sorted(graph[a])
            if level[b] >= level[a]]


def package_graph() -> dict[str, set[str]]:
    return {p.stem: {m.removeprefix("gnlm.") for m in gnlm_imports(p)} for p in PACKAGE.glob("*.py")
            if p.stem != "__init__"}


def test_every_module_has_a_layer():
    placed = [m for _, mods in LAYERS for m in mods]
    assert len(placed) == len(set(placed)), "a module is in two layers"
    assert set(package_graph()) == set(placed), "LAYERS and the package's modules differ"


def test_imports_go_down_the_layers_only():
    assert layer_violations(package_graph(), LAYERS) == []


def test_the_method_imports_no_run_machinery():
    """The maths and the GN step never reach up into a run, a study or the command line."""
    graph = package_graph()
    for module in ("model", "hf", "curvature", "optim", "gauss_newton", "oracle"):
        assert not graph[module] & HARNESS, f"{module} imports {sorted(graph[module] & HARNESS)}"


def test_a_back_import_is_caught(tmp_path):
    """The check itself can fail: gauss_newton importing run (the harness) breaks the layering."""
    graph = package_graph()
    graph["gauss_newton"] = graph["gauss_newton"] | {"run"}
    assert layer_violations(graph, LAYERS) == ["gauss_newton imports run (layer 7 -> 8)"]
    f = tmp_path / "gauss_newton.py"
    f.write_text("from gnlm.run import Run\n")
    assert gnlm_imports(f) == {"gnlm.run"}
