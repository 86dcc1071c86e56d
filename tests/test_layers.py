"""The package's layers point one way: labels/heads/utils/rng -> data -> models -> the stages (training,
evaluation, inference, export, serving) -> cli. Read from the source (ast), imports inside functions included,
so that a lower layer never reaches up, even lazily."""
from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "race_classifier"
LAYERS = {"labels": 0, "heads": 0, "utils": 0, "rng": 0, "device": 0, "data": 1, "models": 2, "training": 3,
          "evaluation": 3, "inference": 3, "export": 3, "serving": 3, "cli": 4}


def layer(module: str) -> int:
    """The layer of ``race_classifier.X[.Y]`` (its first part below the package)."""
    return LAYERS[module.split(".")[1]]


def imports(path: Path) -> set[str]:
    found = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("race_classifier."):
            found.add(node.module)
        elif isinstance(node, ast.Import):
            found |= {a.name for a in node.names if a.name.startswith("race_classifier.")}
    return found


def test_every_subpackage_and_module_has_a_layer():
    tops = {p.stem if p.is_file() else p.name for p in PACKAGE.iterdir()
            if (p.suffix == ".py" and p.stem != "__init__") or (p / "__init__.py").is_file()}
    assert tops <= set(LAYERS), f"give {sorted(tops - set(LAYERS))} a layer in LAYERS"


def test_no_module_imports_a_layer_above_its_own():
    upward = []
    for path in PACKAGE.rglob("*.py"):
        relative = path.relative_to(PACKAGE.parent).with_suffix("")
        if relative.parts == ("race_classifier", "__init__"):  # the package facade: its lazy Classifier
            continue
        module = ".".join(relative.parts)
        upward += [f"{module} -> {target}" for target in sorted(imports(path)) if layer(target) > layer(module)]
    assert not upward, "imports of a higher layer: " + "; ".join(upward)
