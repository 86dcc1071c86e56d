"""Exporting a network to ONNX and checking it: the graph (one output per head), onnx.checker, and the
image draws and scoring that the parity check (exporter.py) and int8 calibration (quantize.py) share. What the
file says of itself (its metadata) is models/onnx_metadata.py's."""
from __future__ import annotations

import random
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
import torch

from race_classifier.data.manifest import Sample
from race_classifier.export.options import DEFAULT_OPSET
from race_classifier.heads import HeadLayout
from race_classifier.models.onnx_metadata import INPUT_NAME, OUTPUT_NAME, output_names


class ExportError(ValueError):
    """The export was refused (parity, graph check, metadata round trip); no file was written."""


class PerHeadOutputs(torch.nn.Module):
    """A multi-head model whose concatenated logits ``[race | gender | age]`` are cut into one output per head."""

    def __init__(self, model: torch.nn.Module, heads: HeadLayout):
        super().__init__()
        self.model, self.slices = model, list(heads.slices().values())

    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, ...]:
        logits = self.model(images)
        return tuple(logits[:, s] for s in self.slices)


def export_graph(model: torch.nn.Module, path: str | Path, image_size: int, opset: int = DEFAULT_OPSET,
                 heads: HeadLayout | None = None) -> None:
    """Trace ``model`` in eval mode to ONNX with a dynamic batch axis (TorchScript-based exporter); with
    gender/age ``heads``, one named output per head (``output_names``)."""
    model = model.eval()
    names = [OUTPUT_NAME]
    if heads is not None and heads.extra:
        model, names = PerHeadOutputs(model, heads).eval(), list(output_names(heads).values())
    # A batch of 2, not 1: nothing in the trace may specialise on a batch of one.
    example = torch.zeros(2, 3, image_size, image_size)
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")  # tracer warnings about Python control flow are not actionable here
        torch.onnx.export(model, (example,), str(path), input_names=[INPUT_NAME], output_names=names,
                          dynamic_axes={INPUT_NAME: {0: "batch"}, **{name: {0: "batch"} for name in names}},
                          opset_version=opset, do_constant_folding=True, dynamo=False)


def check_graph(path: str | Path) -> None:
    """onnx.checker on the file (full check, shape inference included)."""
    try:
        onnx.checker.check_model(str(path), full_check=True)
    except Exception as e:  # noqa: BLE001 - onnx raises several checker/inference error types
        raise ExportError(f"the exported graph fails onnx.checker: {e}") from None


def draw(samples: list[Sample], n: int, seed: int = 0) -> list[Sample]:
    """A seeded random ``n`` of ``samples``: manifests are often sorted by class, so never the first n."""
    return random.Random(seed).sample(list(samples), min(n, len(samples)))


def random_batches(image_size: int, n: int = 64, batch_size: int = 32, seed: int = 0):
    generator = torch.Generator().manual_seed(seed)
    for start in range(0, n, batch_size):
        yield torch.randn(min(batch_size, n - start), 3, image_size, image_size, generator=generator), None


def score(predictors: dict, batches) -> tuple[dict[str, dict[str, np.ndarray]], np.ndarray | None]:
    """Every predictor on the same batches, in one pass: ({name: {head: (N, classes) probabilities}}, race
    labels or None). Every head of a multi-head model comes from the same forward pass."""
    probs = {name: [] for name in predictors}
    labels = []
    for images, batch_labels in batches:
        for name, predictor in predictors.items():
            probs[name].append(predictor.predict_heads(images))
        if batch_labels is not None:
            labels.append(batch_labels.numpy())
    if not any(probs.values()):
        raise ExportError("no readable image to compare the models on")
    return ({name: {head: np.concatenate([b[head] for b in batches_]) for head in batches_[0]}
             for name, batches_ in probs.items()},
            np.concatenate(labels) if labels else None)


@dataclass
class Agreement:
    """How far ``candidate``'s probabilities are from ``reference``'s on the same images."""
    n: int
    max_abs_diff: float     # largest |p_candidate - p_reference| over images and classes
    top1_agreement: float   # share of images with the same predicted class

    @classmethod
    def of(cls, reference: np.ndarray, candidate: np.ndarray) -> "Agreement":
        return cls(len(reference), float(np.abs(candidate - reference).max()),
                   float((candidate.argmax(1) == reference.argmax(1)).mean()))


def accuracy(probs: np.ndarray, labels: np.ndarray) -> float:
    return float((probs.argmax(1) == labels).mean())
