"""The whole export of a checkpoint (``race-classifier export``): built and verified in a temporary folder,
written only when ONNX Runtime agrees with PyTorch.

The file carries its classes, preprocessing, heads and calibration in its metadata (models/onnx_metadata.py
lists the keys), so ``load_predictor(model.onnx)`` needs no flags. fp32: every probability of every head within
FP32_TOLERANCE of PyTorch's; int8 with labelled images: at most ``max_accuracy_drop`` points below fp32.
"""
from __future__ import annotations

import json
import logging
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path

from race_classifier.data.dataset import preprocessed_batches
from race_classifier.data.manifest import Sample
from race_classifier.data.transforms import Preprocessing
from race_classifier.export.onnx import (
    Agreement,
    ExportError,
    accuracy,
    check_graph,
    draw,
    export_graph,
    random_batches,
    score,
)
from race_classifier.export.options import (
    DEFAULT_CALIBRATION,
    DEFAULT_OPSET,
    FP32_TOLERANCE,
)
from race_classifier.export.quantize import calibration_batches, quantize_int8
from race_classifier.heads import HeadLayout
from race_classifier.labels import Taxonomy
from race_classifier.models.checkpoint import load_model
from race_classifier.models.loaders import load_predictor
from race_classifier.models.onnx_metadata import build_metadata, write_metadata
from race_classifier.utils import atomic_write_bytes

log = logging.getLogger("race_classifier.export.onnx")


@dataclass
class ExportReport:
    output: str
    images: str                            # what the models were compared on
    n_images: int
    fp32: Agreement                        # ONNX Runtime fp32 vs PyTorch
    int8: Agreement | None = None          # ONNX Runtime int8 vs PyTorch
    int8_vs_fp32: Agreement | None = None  # ONNX Runtime int8 vs ONNX Runtime fp32 (top-1 agreement)
    accuracy: dict | None = None           # {"torch", "onnx_fp32", "onnx_int8"}: on the labelled images
    quantization: dict | None = None
    # The gender/age heads of a multi-head model, {head: Agreement}; fp32/int8 above are the race head's.
    fp32_heads: dict[str, Agreement] | None = None
    int8_heads: dict[str, Agreement] | None = None

    def to_dict(self) -> dict:
        return asdict(self)


def _load_exported(path: Path, taxonomy: Taxonomy, preprocessing: Preprocessing, heads: HeadLayout):
    """The file through the loader every command uses; its metadata must give back what was exported."""
    predictor = load_predictor(path)
    if predictor.taxonomy.classes != taxonomy.classes or predictor.preprocessing != preprocessing:
        raise ExportError(f"the ONNX metadata did not round-trip: read {predictor.taxonomy.classes} / "
                          f"{predictor.preprocessing}, exported {taxonomy.classes} / {preprocessing}")
    if predictor.heads != heads:
        raise ExportError(f"the ONNX head layout did not round-trip: read {predictor.heads.to_dict()}, "
                          f"exported {heads.to_dict()}")
    return predictor


def _comparison_images(preprocessing: Preprocessing, val_samples, calib_samples, calib_images: int,
                       batch_size: int, workers: int):
    """(batches, description): the validation images, else calibration images, else random tensors."""
    if val_samples:
        return preprocessed_batches(val_samples, preprocessing, batch_size, workers), "validation images"
    if calib_samples:
        return (preprocessed_batches(draw(calib_samples, calib_images), preprocessing, batch_size, workers),
                "calibration images")
    log.warning("no --val_txt or --calib_txt: comparing ONNX Runtime with PyTorch on random tensors, not "
                "images; give a manifest to check parity on real inputs")
    return random_batches(preprocessing.image_size), "random tensors (no manifest given)"


def export_checkpoint(checkpoint_path: str | Path, output: str | Path, *, opset: int = DEFAULT_OPSET,
                      quantize: str | None = None, calib_samples: list[Sample] | None = None,
                      val_samples: list[Sample] | None = None, calib_images: int = 256,
                      calib_method: str | None = None, max_accuracy_drop: float = 1.0,
                      batch_size: int = 64, workers: int = 0, fp32_output: str | Path | None = None) -> ExportReport:
    """Export a race-classifier checkpoint to ``output`` (fp32, or int8 with ``quantize="int8"``).

    Everything is built and verified in a temporary folder; ``output`` is written (atomically) only when
    ONNX Runtime's fp32 probabilities are within FP32_TOLERANCE of PyTorch's on every compared image (and
    every head of a model with gender/age heads) and,
    for int8 with labelled validation images, accuracy drops by at most ``max_accuracy_drop`` points.
    Otherwise ExportError, and no file.
    """

    checkpoint_path, output = Path(checkpoint_path), Path(output)
    if quantize not in (None, "int8"):
        raise ValueError(f"unknown quantization {quantize!r}: only int8 is supported")
    _refuse_overwriting(checkpoint_path, output, fp32_output)
    loaded = load_model(checkpoint_path)
    taxonomy, pre, heads = loaded.taxonomy, loaded.preprocessing, loaded.heads
    metadata = build_metadata(loaded.checkpoint, taxonomy, pre, checkpoint_path, opset, heads)
    reference = load_predictor(checkpoint_path)

    with tempfile.TemporaryDirectory(prefix="race-classifier-export-") as tmp:
        fp32_path = Path(tmp) / "model.fp32.onnx"
        export_graph(loaded.model, fp32_path, pre.image_size, opset, heads)
        write_metadata(fp32_path, metadata)
        check_graph(fp32_path)
        predictors = {"torch": reference, "onnx_fp32": _load_exported(fp32_path, taxonomy, pre, heads)}

        recipe = None
        if quantize:
            int8_path = Path(tmp) / "model.int8.onnx"
            calibration = calibration_batches(calib_samples, pre, calib_images, workers=workers) if calib_samples else None
            if calibration is None:
                log.warning("no --calib_txt: dynamic int8 quantization, of the matrix products only; convolutions "
                            "stay fp32, so a CNN gets no faster. Give --calib_txt for static int8 (QDQ)")
            recipe = quantize_int8(fp32_path, int8_path, calibration, calib_method or DEFAULT_CALIBRATION)
            write_metadata(int8_path, {**metadata, "quantization": json.dumps(recipe)})
            check_graph(int8_path)
            predictors["onnx_int8"] = _load_exported(int8_path, taxonomy, pre, heads)

        batches, images = _comparison_images(pre, val_samples, calib_samples, calib_images, batch_size, workers)
        probs, labels = score(predictors, batches)
        race = {name: p["race"] for name, p in probs.items()}
        report = ExportReport(str(output), images, len(race["torch"]),
                              Agreement.of(race["torch"], race["onnx_fp32"]), quantization=recipe)
        if quantize:
            report.int8 = Agreement.of(race["torch"], race["onnx_int8"])
            report.int8_vs_fp32 = Agreement.of(race["onnx_fp32"], race["onnx_int8"])
        if heads.extra:
            report.fp32_heads = _head_agreements(probs, "onnx_fp32", heads)
            if quantize:
                report.int8_heads = _head_agreements(probs, "onnx_int8", heads)
        if labels is not None and val_samples:  # the manifest's labels are race labels: the race head's accuracy
            labelled = labels >= 0  # -1: no race label (a multi-task manifest's image for the other heads)
            if labelled.any():
                report.accuracy = {name: accuracy(p[labelled], labels[labelled]) for name, p in race.items()}

        _refuse_if_failed(report, max_accuracy_drop)
        final = int8_path if quantize else fp32_path
        atomic_write_bytes(output, final.read_bytes())
        if fp32_output:
            atomic_write_bytes(fp32_output, fp32_path.read_bytes())
    return report


def _refuse_overwriting(checkpoint_path: Path, output: Path, fp32_output) -> None:
    """An output named like the checkpoint would replace the model with its export (and fp32 like the output,
    the int8 file with the fp32 one): refused before anything is written."""
    def same(a, b) -> bool:
        return Path(a).resolve() == Path(b).resolve()
    for name, path in (("--output", output), ("--fp32_output", fp32_output)):
        if path and same(path, checkpoint_path):
            raise ValueError(f"{name} {path} would overwrite the checkpoint being exported ({checkpoint_path})")
    if fp32_output and same(fp32_output, output):
        raise ValueError(f"--fp32_output {fp32_output} would overwrite --output {output}: give another file")


def _head_agreements(probs: dict, candidate: str, heads: HeadLayout) -> dict[str, Agreement]:
    return {h.name: Agreement.of(probs["torch"][h.name], probs[candidate][h.name]) for h in heads.extra}


def _refuse_if_failed(report: ExportReport, max_accuracy_drop: float) -> None:
    for head, agreement in {"race": report.fp32, **(report.fp32_heads or {})}.items():
        if not agreement.max_abs_diff <= FP32_TOLERANCE:  # written so that NaN fails too
            which = "" if head == "race" and not report.fp32_heads else f" of the {head} head"
            raise ExportError(
                f"refusing to write {report.output}: ONNX Runtime's probabilities{which} differ from PyTorch's by "
                f"up to {agreement.max_abs_diff:.3g} on {report.n_images} {report.images} (allowed: "
                f"{FP32_TOLERANCE:g}); the exported graph does not compute what the checkpoint does")
    if report.int8 is not None and report.accuracy:
        drop = 100 * (report.accuracy["onnx_fp32"] - report.accuracy["onnx_int8"])
        if not drop <= max_accuracy_drop:
            raise ExportError(
                f"refusing to write {report.output}: int8 accuracy {100 * report.accuracy['onnx_int8']:.2f}% is "
                f"{drop:.2f} points below fp32's {100 * report.accuracy['onnx_fp32']:.2f}% on {report.n_images} "
                f"validation images (allowed: {max_accuracy_drop:g}); try another --calib_method, more "
                f"--calib_images, or export fp32")
