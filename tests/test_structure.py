"""The package's import structure: no cycles, generation free of training code, the core free of the mini world.

A user who only generates (`infer.py`, `tea_lightning.inference`) should not load a training method, and a user of
real Stable Diffusion models should not load the mini world's scenes and readout. Every import counts, also one
inside a function: a lazy import that points upwards is still a cycle in the design.
"""

import ast
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).parents[1]
PACKAGE = ROOT / "tea_lightning"
METHODS = {f"tea_lightning.{name}" for name in ("textual_inversion", "dreambooth_lora", "custom_diffusion", "module")}
GENERATION = [
    f"tea_lightning.{name}"
    for name in ("inference", "checkpoints", "personalized", "bake", "export", "tea", "drift")
]


def module_files() -> dict[str, Path]:
    """Module name → file, for the package and `callbacks/` (installed as `tea_lightning.callbacks`)."""
    files = {}
    for path in PACKAGE.rglob("*.py"):
        parts = path.relative_to(ROOT).with_suffix("").parts
        files[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    for path in (ROOT / "callbacks").glob("*.py"):
        name = "tea_lightning.callbacks" + ("" if path.stem == "__init__" else f".{path.stem}")
        files[name] = path
    return files


def import_graph() -> dict[str, set[str]]:
    """Module → the package modules it imports anywhere in its file (module level or inside functions)."""
    files = module_files()
    graph = {name: set() for name in files}
    for name, path in files.items():
        package = name if path.name == "__init__.py" else name.rpartition(".")[0]
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            targets = []
            if isinstance(node, ast.Import):
                targets = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:  # relative import
                    base = ".".join(package.split(".")[: len(package.split(".")) - node.level + 1] + [base]).strip(".")
                targets = [f"{base}.{alias.name}" if f"{base}.{alias.name}" in files else base for alias in node.names]
            for target in targets:
                while target and target not in files:
                    target = target.rpartition(".")[0]
                if target and target != name:
                    graph[name].add(target)
    return graph


def reachable(graph: dict[str, set[str]], start: str) -> set[str]:
    seen, todo = set(), [start]
    while todo:
        for nxt in graph[todo.pop()] - seen:
            seen.add(nxt)
            todo.append(nxt)
    return seen


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, int] = {}  # 1 = on the current path, 2 = done
    path: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        path.append(node)
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 1:
                return path[path.index(nxt):] + [nxt]
            if nxt not in state and (cycle := visit(nxt)):
                return cycle
        path.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state and (cycle := visit(node)):
            return cycle
    return None


def test_the_walk_sees_the_package_and_its_imports():
    graph = import_graph()
    assert {"tea_lightning.inference", "tea_lightning.callbacks.drift", "tea_lightning.mini.world"} <= set(graph)
    assert "tea_lightning.tokens" in graph["tea_lightning.inference"], "the walk must follow `from ... import ...`"
    assert "tea_lightning.export" in graph["tea_lightning.textual_inversion"], "and `from tea_lightning import x`"


def test_no_module_imports_itself_through_others():
    cycle = find_cycle(import_graph())
    assert cycle is None, "import cycle: " + " -> ".join(cycle)


def test_generation_and_the_pure_math_import_no_training_method():
    graph = import_graph()
    for name in GENERATION:
        methods = reachable(graph, name) & METHODS
        assert not methods, f"{name} imports the training method(s) {sorted(methods)}"


def test_the_core_imports_nothing_of_the_mini_world():
    graph = import_graph()
    for name in graph:
        if not name.startswith("tea_lightning.mini"):
            mini = sorted(m for m in reachable(graph, name) if m.startswith("tea_lightning.mini"))
            assert not mini, f"{name} imports the mini world: {mini}"


def test_importing_inference_loads_no_training_code_at_run_time():
    # The package's `__init__` and any dynamic import count here too.
    code = ("import sys, tea_lightning.inference; "
            "print(sorted(m for m in sys.modules if m.startswith('tea_lightning.')))")
    loaded = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=ROOT)
    modules = set(ast.literal_eval(loaded.stdout.strip()))
    assert not modules & METHODS, sorted(modules & METHODS)
    assert not {m for m in modules if m.startswith(("tea_lightning.mini", "tea_lightning.data"))}, sorted(modules)
