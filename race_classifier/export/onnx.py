"""Exporting a checkpoint to ONNX: the graph, the metadata that makes the file self-describing, and the
parity check that decides whether the file may be written at all.

An exported file holds, in its ``metadata_props`` (keys below, values JSON where structured):

  race_classifier.format          "race-classifier-onnx"
  race_classifier.format_version  "1"
  race_classifier.taxonomy        Taxonomy.to_dict(): name and class order
  race_classifier.preprocessing   Preprocessing.to_dict(): size, mean, std, interpolation, crop geometry
  race_classifier.arch            the architecture name
  race_classifier.source          source checkpoint: file name, epoch, dataset, metrics
  race_classifier.exporter        race-classifier / torch / onnx versions and opset
  race_classifier.quantization    the int8 recipe (quantized files only)
  race_classifier.calibration     temperature, ECE/NLL before and after, abstention threshold (checkpoints
                                  calibrated on validation data only), per-head temperatures under "heads";
                                  the loader divides each head's logits by its temperature
  race_classifier.heads           HeadLayout.to_dict(): head names, classes, age groups (models with
                                  gender/age heads only)
  race_classifier.outputs         {head: graph output name} (models with gender/age heads only)

so ``load_predictor(model.onnx)`` needs no flags. Graph: input "input" (N, 3, H, W) float32 with a
dynamic batch axis; a race-only model has one output "logits" (N, K), a model with gender/age heads one
output per head, "race_logits", "gender_logits", "age_logits" (N, classes of that head), so a deployer
never slices a concatenation and a reader that takes the first output still gets race.
"""
from __future__ import annotations

import json
import logging
import random
import tempfile
import warnings
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader

from race_classifier.data.dataset import FaceDataset, collate_skipping_failures
from race_classifier.data.manifest import Sample
from race_classifier.data.transforms import Preprocessing, build_transform
from race_classifier.heads import HeadLayout
from race_classifier.labels import Taxonomy
from race_classifier.models.merged import merge_summary
from race_classifier.models.onnx_metadata import META_PREFIX, ONNX_FORMAT, ONNX_FORMAT_VERSION

log = logging.getLogger(__name__)

INPUT_NAME, OUTPUT_NAME = "input", "logits"
DEFAULT_OPSET = 17
FP32_TOLERANCE = 1e-4  # largest |p_onnx - p_torch| an fp32 export may show on any image and class


class ExportError(ValueError):
    """The export was refused (parity, graph check, metadata round trip); no file was written."""


# --- metadata -----------------------------------------------------------------------------------------

def output_names(heads: HeadLayout) -> dict[str, str]:
    """{head: graph output}: "logits" for a race-only model (as before heads existed), else "<head>_logits"."""
    if not heads.extra:
        return {"race": OUTPUT_NAME}
    return {name: f"{name}_logits" for name in heads.names}


def build_metadata(checkpoint: dict, taxonomy: Taxonomy, preprocessing: Preprocessing, source: Path,
                   opset: int, heads: HeadLayout | None = None) -> dict[str, str]:
    import onnx

    from race_classifier import __version__
    source_info = {"checkpoint": source.name, "epoch": checkpoint.get("epoch"),
                   "dataset": (checkpoint.get("train_args") or {}).get("dataset"),
                   "metrics": checkpoint.get("metrics") or {}}
    if checkpoint.get("ensemble"):  # the average is in the graph; say so beside the classes
        from race_classifier.models.ensemble import describe_ensemble
        source_info["ensemble"] = describe_ensemble(checkpoint["ensemble"])
    if checkpoint.get("merged_classes"):  # the merge is in the graph; say so beside the classes
        source_info["merged_classes"] = merge_summary(checkpoint["merged_classes"])
    metadata = {
        "format": ONNX_FORMAT,
        "format_version": str(ONNX_FORMAT_VERSION),
        "taxonomy": json.dumps(taxonomy.to_dict()),
        "preprocessing": json.dumps(preprocessing.to_dict()),
        "arch": str(checkpoint.get("arch", "")),
        "source": json.dumps(source_info, default=str),
        "exporter": json.dumps({"race_classifier": __version__, "torch": torch.__version__,
                                "onnx": onnx.__version__, "opset": opset}),
    }
    if checkpoint.get("calibration"):
        # The graph outputs raw logits; the loader applies the temperature, as it does for the checkpoint.
        metadata["calibration"] = json.dumps(checkpoint["calibration"], default=str)
    if heads is not None and heads.extra:  # race-only files stay exactly as before heads existed
        metadata["heads"] = json.dumps(heads.to_dict())
        metadata["outputs"] = json.dumps(output_names(heads))
    return metadata


def write_metadata(path: str | Path, metadata: dict[str, str]) -> None:
    """Replace the file's race_classifier.* metadata_props with ``metadata`` (keys without the prefix)."""
    import onnx
    model = onnx.load(str(path))
    kept = [p for p in model.metadata_props if not p.key.startswith(META_PREFIX)]
    del model.metadata_props[:]
    model.metadata_props.extend(kept)
    for key, value in metadata.items():
        model.metadata_props.add(key=META_PREFIX + key, value=value)
    # A human-readable line for tools that show only doc_string (Netron, onnx.helper.printable_graph).
    classes = json.loads(metadata["taxonomy"])["classes"]
    model.doc_string = (f"race-classifier model: perceived, socially constructed race categories "
                        f"({', '.join(classes)}); see metadata_props race_classifier.*")
    onnx.save(model, str(path))


# --- graph --------------------------------------------------------------------------------------------

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
    import onnx
    try:
        onnx.checker.check_model(str(path), full_check=True)
    except Exception as e:  # noqa: BLE001 - onnx raises several checker/inference error types
        raise ExportError(f"the exported graph fails onnx.checker: {e}") from None


# --- images and scoring -------------------------------------------------------------------------------

def preprocessed_batches(samples: list[Sample], preprocessing: Preprocessing, batch_size: int = 64,
                         workers: int = 0):
    """(images, labels) batches exactly as evaluation preprocesses them; unreadable images are dropped."""
    dataset = FaceDataset(samples, build_transform(preprocessing, train=False), draft_size=preprocessing.image_size)
    loader = DataLoader(dataset, batch_size=batch_size, num_workers=workers, collate_fn=collate_skipping_failures)
    for batch in loader:
        for index, reason in batch["failures"]:
            log.warning("skipping unreadable image %s: %s", samples[index].path, reason)
        if batch["images"] is not None:
            yield batch["images"], batch["labels"]


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


# --- the whole export ---------------------------------------------------------------------------------

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
    from race_classifier.models.loaders import load_predictor
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
    from race_classifier.models.checkpoint import load_model
    from race_classifier.models.loaders import load_predictor
    from race_classifier.utils import atomic_write_bytes

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
            from race_classifier.export.quantize import DEFAULT_CALIBRATION, calibration_batches, quantize_int8
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
