"""The trained models that ship inside the package, taken by name wherever a model path is.

``seed5`` (Asian, Black, Indian, White, Latino_Hispanic; the default of predict, serve and
``Classifier.load()``) and ``fairface7`` (FairFace's 7 races) are one network: MobileNetV2 trained on FairFace
in fairface7, and the same network with its calibrated probabilities summed into seed5 (merge-classes). The
files sit in ``race_classifier/bundled/``, built by ``scripts/build_bundled.py`` (``make bundled``) from ``../shared``;
``bundled/manifest.json`` records each file's sha256 and the figures measured when it was built.

A name resolves to the ONNX file for prediction (predict, serve, evaluate, compare) and to the checkpoint
where a command changes or retrains a model (export, calibrate, rebalance, train --pretrained). ``seed5.pt``
holds no weights of its own: it names ``fairface7.pt`` in ``weights_from`` (models/checkpoint.py), and the two
ONNX files read one external weights file, so the network is stored once per format.

A path to an existing file always wins over a name; a text that is neither is an error listing the names.
"""
from __future__ import annotations

import json
from functools import lru_cache
from pathlib import Path

BUNDLED_DIR = Path(__file__).resolve().parent.parent / "bundled"
MANIFEST = "manifest.json"
DEFAULT_MODEL = "seed5"


class UnknownModelError(ValueError):
    pass


@lru_cache(maxsize=1)
def manifest() -> dict:
    """The build record: {"files": {name: {"sha256", "bytes"}}, "models": {name: {"onnx", "checkpoint",
    ...figures}}, ...}; empty when the package was installed without its bundled files."""
    path = BUNDLED_DIR / MANIFEST
    return json.loads(path.read_text(encoding="utf-8")) if path.is_file() else {}


def bundled_names() -> list[str]:
    return list(manifest().get("models", {}))


def model_file(name_or_path: str | Path | None, *, checkpoint: bool = False) -> Path:
    """The file ``name_or_path`` means: an existing file as it is, else the bundled model of that name (its
    checkpoint when ``checkpoint``, else its ONNX file); None means the default model. Raises
    UnknownModelError naming the bundled models for anything else."""
    if name_or_path is None:
        name_or_path = DEFAULT_MODEL
    path = Path(name_or_path)
    if path.exists():
        return path
    models = manifest().get("models", {})
    entry = models.get(str(name_or_path))
    if entry is None:
        names = ", ".join(models) or "none are installed"
        raise UnknownModelError(f"model file not found: {name_or_path} (nor is it a bundled model name: {names})")
    file = BUNDLED_DIR / entry["checkpoint" if checkpoint else "onnx"]
    if not file.is_file():
        raise UnknownModelError(f"the bundled model {name_or_path!r} is not installed ({file} is missing); "
                                "reinstall the package")
    return file


def resolve_arguments(args, *names: str, checkpoint: bool = False) -> None:
    """Replace each named argparse attribute that holds a bundled model name by its file (in place)."""
    for name in names:
        value = getattr(args, name, None)
        if isinstance(value, (list, tuple)):
            setattr(args, name, [str(model_file(v, checkpoint=checkpoint)) for v in value])
        elif value is not None:
            setattr(args, name, str(model_file(value, checkpoint=checkpoint)))
