"""The project's modules import one another one way only: no circles, lazy imports included.

Every `import` and `from ... import` in every project file, at module level or inside a
function, is an arrow from that module to the project module it names; a cycle among them is
a failure. (Python tolerates some cycles through lazy imports; a reader following the arrows
should never have to.)
"""
import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("bert", "glue", "regularizers")
FOLDERS = PACKAGES + ("benchmarks",)


def project_modules() -> dict:
    """module name -> file, for the top-level scripts and every file of the packages."""
    modules = {p.stem: p for p in ROOT.glob("*.py") if p.name != "conftest.py"}
    for folder in FOLDERS:
        for p in (ROOT / folder).glob("*.py"):
            name = folder if p.stem == "__init__" else f"{folder}.{p.stem}"
            modules[name if folder in PACKAGES else p.stem] = p
    return modules


def imported(tree: ast.AST, modules: dict) -> set:
    """The project modules a file names in its imports (`from glue import x` names glue, and
    glue.x too when x is a module)."""
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module)
            names.update(f"{node.module}.{alias.name}" for alias in node.names)
    return {n for n in names if n in modules}


def import_graph() -> dict:
    modules = project_modules()
    return {name: imported(ast.parse(path.read_text(encoding="utf-8")), modules) - {name}
            for name, path in modules.items()}


def find_cycle(graph: dict) -> list | None:
    """One cycle as [a, b, ..., a], or None (depth-first search with colours)."""
    state, stack = {}, []

    def visit(node):
        state[node] = "open"
        stack.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == "open":
                return stack[stack.index(nxt):] + [nxt]
            if nxt not in state:
                found = visit(nxt)
                if found:
                    return found
        stack.pop()
        state[node] = "done"
        return None

    for node in sorted(graph):
        if node not in state:
            found = visit(node)
            if found:
                return found
    return None


def test_the_cycle_finder_finds_a_cycle_and_only_a_cycle():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b", "c"}, "b": {"c"}, "c": set()}) is None


def test_lazy_imports_count():
    tree = ast.parse("def f():\n    from glue.download import ensure_task_data\n    import train\n")
    assert imported(tree, {"glue.download": 1, "train": 1, "glue": 1}) == {"glue.download", "train"}


def test_the_project_imports_one_way():
    graph = import_graph()
    assert {"train", "evaluate", "bert.model", "glue.data", "regularizers.lnsr"} <= set(graph)
    assert "bert.model" in graph["bert.weights"] or "bert.weights" in graph["bert.model"]
    cycle = find_cycle(graph)
    assert cycle is None, "import cycle: " + " -> ".join(cycle)


def test_bert_is_at_the_bottom():
    """bert/ imports nothing of the rest of the project."""
    graph = import_graph()
    for name, targets in graph.items():
        if name.startswith("bert"):
            assert all(t.startswith("bert") for t in targets), (name, targets)
