"""The package's layers point one way: labels/heads/utils/rng/device/version -> data -> models -> the stages
(training, post_training, evaluation, inference, export, serving) -> cli, with no import cycle, and imports
inside functions only where they keep start-up light. Read from the source (ast), imports inside functions
included, so that a lazy import can neither reach up nor hide a cycle."""
from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "race_classifier"
LAYERS = {"labels": 0, "heads": 0, "utils": 0, "rng": 0, "device": 0, "version": 0, "data": 1, "models": 2,
          "training": 3, "post_training": 3, "evaluation": 3, "inference": 3, "export": 3, "serving": 3, "cli": 4}
# Imports inside a function, and why each may stay there: the command line builds every subcommand's parser
# without torch (test_help_does_not_import_torch below), and torch.compile's error types load slowly.
LAZY_ALLOWED = {
    "race_classifier/__init__.py": "`import race_classifier` stays light until Classifier is used",
    "race_classifier/cli.py": "each command's work is imported when it runs",
    "race_classifier/utils.py": "the parser's helpers stay torch-free",
    "race_classifier/training/accel.py": "torch.compile's internals, only when --compile is used",
}


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {module_name(p): p for p in PACKAGE.rglob("*.py")}


def layer(module: str) -> int:
    """The layer of ``race_classifier.X[.Y]`` (its first part below the package)."""
    return LAYERS[module.split(".")[1]]


def imports(path: Path, inside_functions_only: bool = False) -> set[str]:
    """The package modules ``path`` imports (``from package import module`` names the module)."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    nodes = ast.walk(tree)
    if inside_functions_only:
        nodes = (n for f in ast.walk(tree) if isinstance(f, (ast.FunctionDef, ast.AsyncFunctionDef))
                 for n in ast.walk(f))
    found = set()
    for node in nodes:
        if isinstance(node, ast.ImportFrom) and node.module and node.module.split(".")[0] == "race_classifier":
            found |= {f"{node.module}.{a.name}" if f"{node.module}.{a.name}" in MODULES else node.module
                      for a in node.names}
        elif isinstance(node, ast.Import):
            found |= {a.name for a in node.names if a.name.split(".")[0] == "race_classifier"}
        elif inside_functions_only and isinstance(node, (ast.Import, ast.ImportFrom)):
            found.add(node.module if isinstance(node, ast.ImportFrom) else node.names[0].name)
    return found


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One cycle of ``graph`` as [a, b, ..., a], or None (depth-first search)."""
    state, stack = {}, []

    def visit(node: str) -> list[str] | None:
        state[node] = "open"
        stack.append(node)
        for target in sorted(graph.get(node, ())):
            if state.get(target) == "open":
                return stack[stack.index(target):] + [target]
            if target not in state and (cycle := visit(target)):
                return cycle
        state[node] = "done"
        stack.pop()
        return None

    for node in sorted(graph):
        if node not in state and (cycle := visit(node)):
            return cycle
    return None


def test_every_subpackage_and_module_has_a_layer():
    tops = {p.stem if p.is_file() else p.name for p in PACKAGE.iterdir()
            if (p.suffix == ".py" and p.stem != "__init__") or (p / "__init__.py").is_file()}
    assert tops <= set(LAYERS), f"give {sorted(tops - set(LAYERS))} a layer in LAYERS"


def test_no_module_imports_a_layer_above_its_own():
    upward = []
    for module, path in MODULES.items():
        if module == "race_classifier":  # the package facade: its lazy Classifier
            continue
        upward += [f"{module} -> {target}" for target in sorted(imports(path)) if layer(target) > layer(module)]
    assert not upward, "imports of a higher layer: " + "; ".join(upward)


def test_the_package_has_no_import_cycle():
    graph = {module: {t for t in imports(path) if t in MODULES and t != module} for module, path in MODULES.items()}
    cycle = find_cycle(graph)
    assert cycle is None, "import cycle: " + " -> ".join(cycle)


def test_the_subpackages_form_no_cycle_either():
    def top(module: str) -> str:
        return module.split(".")[1] if "." in module else "race_classifier"
    graph: dict[str, set[str]] = {}
    for module, path in MODULES.items():
        graph.setdefault(top(module), set()).update(top(t) for t in imports(path) if top(t) != top(module))
    graph.pop("race_classifier")  # the facade's lazy Classifier
    cycle = find_cycle(graph)
    assert cycle is None, "subpackage cycle: " + " -> ".join(cycle)


def test_the_cycle_finder_finds_one():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b", "c"}, "b": {"c"}, "c": set()}) is None


def test_imports_inside_functions_only_where_they_keep_start_up_light():
    lazy = {str(path.relative_to(PACKAGE.parent)): sorted(found) for path in PACKAGE.rglob("*.py")
            if (found := imports(path, inside_functions_only=True))}
    assert set(lazy) <= set(LAZY_ALLOWED), ("imports inside functions (move them to the top, or say in LAZY_ALLOWED "
                                            f"why they must stay): {dict((k, lazy[k]) for k in set(lazy) - set(LAZY_ALLOWED))}")


def test_help_does_not_import_torch():
    code = ("import sys; from race_classifier.cli import build_parser; build_parser(); "
            "print(sorted(m for m in ('torch', 'onnxruntime', 'pandas', 'cv2') if m in sys.modules))")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert done.stdout.strip() == "[]", f"building the command line's parser imported {done.stdout.strip()}"
