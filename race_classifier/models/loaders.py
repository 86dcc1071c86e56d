"""One loader for every model file a user may hold, behind one interface: ``Predictor``.

Recognised from the file itself:
* a race-classifier checkpoint (classes and preprocessing inside);
* a FairFace release checkpoint: a torchvision ResNet-34 state dict whose last layer has 18 outputs
  (7 race, 2 gender, 9 age); 224 px, ImageNet mean/std; races in fairface7 order;
* an ONNX file exported by ``race-classifier export`` (classes, heads and preprocessing in its metadata);
* a TorchScript file or a foreign ONNX file: their label order (``labels``) and preprocessing must be given.

Checkpoints and state dicts load with ``weights_only=True``: no pickled code runs. A TorchScript file is a
program (TorchScript, not arbitrary Python) and runs as such: load only one you trust, such as your own
production model.
"""
from __future__ import annotations

import logging
import zipfile
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import onnxruntime as ort
import torch
import torchvision

from race_classifier.data.transforms import IMAGENET_MEAN, IMAGENET_STD, Preprocessing
from race_classifier.device import (
    PrecisionError,
    precision_name,
    resolve_device,
    resolve_precision,
)
from race_classifier.heads import (
    FAIRFACE_AGE_RANGES,
    FAIRFACE_GENDERS,
    Head,
    HeadLayout,
)
from race_classifier.labels import Taxonomy, get_taxonomy
from race_classifier.models.bundled import UnknownModelError, model_file
from race_classifier.models.checkpoint import FORMAT, load_model
from race_classifier.models.ensemble import describe_ensemble
from race_classifier.models.merged import merge_summary
from race_classifier.models.onnx_metadata import read_metadata

log = logging.getLogger(__name__)

FAIRFACE_OUTPUTS = 18  # 7 race + 2 gender + 9 age logits, in that order
FAIRFACE_RACES = "fairface7"
TTA_DESCRIPTION = "horizontal flip (mean of the image's and its mirror's calibrated probabilities)"


class ModelLoadError(ValueError):
    pass


@dataclass
class Predictor:
    """Class probabilities in ``taxonomy`` order for a batch of preprocessed images (N, 3, H, W); with
    ``heads`` besides race (gender, age group), those heads' probabilities too (``predict_heads``)."""
    name: str
    kind: str
    taxonomy: Taxonomy
    preprocessing: Preprocessing
    run: callable = field(repr=False)  # images -> every head's logits side by side, race first (numpy or torch)
    info: dict = field(default_factory=dict)
    # Fitted on validation data (race-classifier checkpoints and their ONNX exports): {"temperature", ...,
    # "abstention": {"threshold", ...}, "heads": {"gender": {"temperature", ...}, ...}}; None for files
    # without one (temperature 1, no threshold). Only race abstains; other heads are only calibrated.
    calibration: dict | None = None
    # Test-time augmentation: predict_proba averages the calibrated probabilities of each image and its
    # horizontal mirror (faces are trained with random flips, so both views are in-distribution).
    tta: bool = False
    heads: HeadLayout | None = None  # None: race only

    def __post_init__(self):
        if self.heads is None:
            self.heads = HeadLayout.race_only(self.taxonomy.classes)

    @property
    def temperature(self) -> float:
        return float((self.calibration or {}).get("temperature") or 1.0)

    def head_temperature(self, head: str) -> float:
        if head == "race":
            return self.temperature
        return float((((self.calibration or {}).get("heads") or {}).get(head) or {}).get("temperature") or 1.0)

    @property
    def abstention_threshold(self) -> float | None:
        """The stored confidence threshold for abstaining ('uncertain'), or None when there is none."""
        threshold = ((self.calibration or {}).get("abstention") or {}).get("threshold")
        return None if threshold is None else float(threshold)

    def all_logits(self, images: torch.Tensor) -> torch.Tensor:
        """Raw float32 logits of every head side by side (N, heads.num_outputs) on the CPU."""
        return torch.as_tensor(self.run(images)).float().cpu()  # torch models give tensors, ONNX Runtime numpy

    def logits(self, images: torch.Tensor) -> torch.Tensor:
        """Raw float32 race logits (N, K) on the CPU, before any temperature."""
        return self.all_logits(images)[:, :self.taxonomy.num_classes]

    def predict_proba(self, images: torch.Tensor, tta: bool | None = None) -> np.ndarray:
        """softmax(logits / temperature): calibrated probabilities when the file carries a temperature.
        ``tta`` (default: ``self.tta``): the mean of those of the images and of their mirror images."""
        return self.predict_heads(images, tta, only=("race",))["race"]

    def predict_heads(self, images: torch.Tensor, tta: bool | None = None,
                      only: tuple[str, ...] | None = None) -> dict[str, np.ndarray]:
        """{head: calibrated probabilities (N, classes)} for every head (or those in ``only``), one forward
        pass (two with ``tta``) for all of them."""
        names = [n for n in self.heads.names if only is None or n in only]
        probs = self._calibrated_heads(self.all_logits(images), names)
        if self.tta if tta is None else tta:
            mirrored = self._calibrated_heads(self.all_logits(torch.flip(images, dims=[3])), names)  # flip width
            probs = {n: (probs[n] + mirrored[n]) / 2 for n in names}
        return {n: p.numpy() for n, p in probs.items()}

    def _calibrated_heads(self, logits: torch.Tensor, names) -> dict[str, torch.Tensor]:
        parts = self.heads.split(logits)
        return {n: self._calibrated(parts[n], self.head_temperature(n)) for n in names}

    def _calibrated(self, logits: torch.Tensor, temperature: float | None = None) -> torch.Tensor:
        temperature = self.temperature if temperature is None else temperature
        return torch.softmax(logits / temperature if temperature != 1.0 else logits, dim=1)

    def set_tta(self, on: bool) -> "Predictor":
        """Turn flip test-time augmentation on or off, recorded in ``info`` (reports, model info)."""
        self.tta = bool(on)
        self.info["tta"] = TTA_DESCRIPTION if on else "none"
        return self


def describe_heads(heads: HeadLayout) -> str:
    """'race (A, B), gender (Male, Female), age (Child (0-12), ...)' for model information."""
    def classes(h):
        return heads.age_bins.describe() if h.name == "age" and heads.age_bins else h.classes
    return ", ".join(f"{h.name} ({', '.join(classes(h))})" for h in heads.heads)


def _amp_dtype(amp: str, device: torch.device) -> torch.dtype | None:
    try:
        return resolve_precision(amp, device)
    except PrecisionError as e:
        raise ModelLoadError(str(e)) from None


def _torch_runner(model: torch.nn.Module, device: torch.device, amp_dtype: torch.dtype | None = None):
    """``amp_dtype``: autocast and channels_last, as training runs (faster on CPUs with bf16 units and on
    GPUs); probabilities then move slightly (docs/deployment.md, "bf16 autocast")."""
    memory_format = torch.channels_last if amp_dtype is not None else torch.contiguous_format
    if amp_dtype is not None:
        model.to(memory_format=memory_format)

    @torch.no_grad()
    def run(images: torch.Tensor) -> torch.Tensor:
        with torch.autocast(device.type, dtype=amp_dtype, enabled=amp_dtype is not None):
            return model(images.to(device, memory_format=memory_format)).float()
    return run


def _external_preprocessing(image_size: int | None, mean, std) -> Preprocessing:
    return Preprocessing(image_size=image_size or 224, mean=tuple(mean or IMAGENET_MEAN),
                         std=tuple(std or IMAGENET_STD), crop={})


def _needs_labels(path: Path, labels, kind: str) -> Taxonomy:
    if not labels:
        raise ModelLoadError(f"{path} is a {kind} file, which does not name its classes: give their order "
                             "(e.g. --baseline_labels fairface7, a class file, or 'White,Black,...')")
    return get_taxonomy(labels)


def _is_torchscript(path: Path) -> bool:
    if not zipfile.is_zipfile(path):
        return False
    with zipfile.ZipFile(path) as z:
        return any(n.endswith("/code/") or "/code/" in n for n in z.namelist())


def load_predictor(path: str | Path | None = None, *, labels=None, image_size: int | None = None, mean=None, std=None,
                   device: str | torch.device = "cpu", tta: bool = False, amp: str = "off") -> Predictor:
    """Load any supported model file. ``labels``/``image_size``/``mean``/``std`` describe files that
    carry no metadata (TorchScript, ONNX); a race-classifier checkpoint ignores them. ``tta``: average
    each image's probabilities with its mirror's (``Predictor.tta``). ``device`` (auto too) and ``amp`` (bf16,
    fp16 on CUDA; race_classifier.device): run a PyTorch model under autocast; an ONNX file runs as it was
    exported (see ``export --quantize``).
    ``path`` may name a bundled model (models/bundled.py; None: the default, seed5): its ONNX file, or its
    checkpoint where it runs on a GPU or under autocast."""
    device = resolve_device(device)
    amp_dtype = _amp_dtype(amp, device)
    try:
        path = model_file(path, checkpoint=device.type != "cpu" or amp_dtype is not None)
    except UnknownModelError as e:
        raise ModelLoadError(str(e)) from None
    if amp_dtype is not None and path.suffix.lower() == ".onnx":
        log.warning("%s: --amp %s applies to PyTorch models; an ONNX file runs as exported", path, amp)
        amp_dtype = None
    predictor = _load_any(path, labels, image_size, mean, std, device, amp_dtype)
    if amp_dtype is not None:
        predictor.info["precision"] = f"{precision_name(amp_dtype)} autocast"
    return predictor.set_tta(True) if tta else predictor


def _load_any(path: Path, labels, image_size, mean, std, device: torch.device,
              amp_dtype: torch.dtype | None) -> Predictor:
    if not path.is_file():
        raise ModelLoadError(f"model file not found: {path}")
    if path.suffix.lower() == ".onnx":
        return _load_onnx(path, labels, image_size, mean, std)
    if _is_torchscript(path):
        taxonomy = _needs_labels(path, labels, "TorchScript")
        model = torch.jit.load(str(path), map_location=device).eval()
        return Predictor(path.name, "torchscript", taxonomy, _external_preprocessing(image_size, mean, std),
                         _torch_runner(model, device, amp_dtype), {"path": str(path), "kind": "TorchScript"})
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - any unpickling failure: not a file we can load safely
        raise ModelLoadError(f"{path}: not a model file that can be loaded safely "
                             f"(a race-classifier checkpoint, FairFace state dict, TorchScript or ONNX): {e}") from None
    if isinstance(obj, dict) and obj.get("format") == FORMAT:
        return _from_checkpoint(path, device, amp_dtype)
    state = obj.get("state_dict", obj) if isinstance(obj, dict) else None
    fc = state.get("fc.weight", state.get("module.fc.weight")) if isinstance(state, dict) else None  # DataParallel
    if getattr(fc, "shape", (0,))[0] == FAIRFACE_OUTPUTS:
        return _load_fairface(path, state, device, amp_dtype)
    raise ModelLoadError(f"{path}: not a race-classifier checkpoint, a FairFace ResNet-34 state dict "
                         "(fc with 18 outputs), TorchScript or ONNX")


def _from_checkpoint(path: Path, device: torch.device, amp_dtype: torch.dtype | None = None) -> Predictor:
    loaded = load_model(path, device)
    ckpt = loaded.checkpoint
    info = {"path": str(path), "kind": "race-classifier checkpoint", "arch": ckpt["arch"],
            "taxonomy": loaded.taxonomy.name, "classes": ", ".join(loaded.taxonomy.classes),
            "preprocessing": loaded.preprocessing.to_dict(), "epoch": ckpt.get("epoch"),
            "dataset": (ckpt.get("train_args") or {}).get("dataset"),
            "training metrics": {k: v for k, v in (ckpt.get("metrics") or {}).items()
                                 if k in ("val_accuracy", "val_balanced_accuracy", "val_loss")}}
    if loaded.heads.extra:
        info["heads"] = describe_heads(loaded.heads)
    if ckpt.get("ensemble"):
        info["ensemble"] = describe_ensemble(ckpt["ensemble"])
    if ckpt.get("merged_classes"):
        info["merged_classes"] = merge_summary(ckpt["merged_classes"])
    calibration = ckpt.get("calibration")
    if calibration:
        info["calibration"] = calibration
    return Predictor(path.name, "checkpoint", loaded.taxonomy, loaded.preprocessing,
                     _torch_runner(loaded.model, device, amp_dtype), info, calibration=calibration or None,
                     heads=loaded.heads)


def _load_fairface(path: Path, state: dict, device: torch.device,
                   amp_dtype: torch.dtype | None = None) -> Predictor:
    """FairFace's release model: all 18 logits, as three heads. Its age head has no bins: its classes are
    FairFace's 9 ranges, which ``heads.class_map`` sums into another model's age groups."""
    model = torchvision.models.resnet34(num_classes=FAIRFACE_OUTPUTS)
    try:
        model.load_state_dict({k.removeprefix("module."): v for k, v in state.items()})
    except RuntimeError as e:
        raise ModelLoadError(f"{path}: has an 18-output fc but is not a torchvision ResNet-34 ({e})") from None
    model.to(device).eval()
    taxonomy = get_taxonomy(FAIRFACE_RACES)
    heads = HeadLayout((Head("race", taxonomy.classes), Head("gender", FAIRFACE_GENDERS),
                        Head("age", FAIRFACE_AGE_RANGES)))
    info = {"path": str(path), "kind": "FairFace ResNet-34 (7 race, 2 gender, 9 age logits)",
            "taxonomy": taxonomy.name, "classes": ", ".join(taxonomy.classes),
            "heads": describe_heads(heads)}
    return Predictor(path.name, "fairface", taxonomy, Preprocessing(image_size=224, crop={"aligned": True, "margin": 0.25}),
                     _torch_runner(model, device, amp_dtype), info, heads=heads)


def _load_onnx(path: Path, labels, image_size, mean, std) -> Predictor:
    """An ONNX file through ONNX Runtime. A file exported by ``race-classifier export`` names its classes
    and preprocessing in its metadata; any other ONNX file needs ``labels`` (and its preprocessing)."""
    try:
        session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    except Exception as e:  # noqa: BLE001 - onnxruntime raises its own exception types
        raise ModelLoadError(f"{path}: not an ONNX model onnxruntime can load ({e})") from None
    model_input = session.get_inputs()[0]
    declared = list(model_input.shape)  # e.g. ['batch', 3, 112, 112]; str or None for dynamic axes
    if len(declared) != 4:
        raise ModelLoadError(f"{path}: expects a {len(declared)}-d input {declared}; only image models "
                             "with one (N, C, H, W) input are supported")
    props = session.get_modelmeta().custom_metadata_map
    try:
        ours = read_metadata(props)
    except ValueError as e:
        raise ModelLoadError(f"{path}: {e}") from None
    heads, outputs = None, None  # race only, on the first output
    if ours is not None:
        taxonomy, preprocessing, meta_info = ours["taxonomy"], ours["preprocessing"], ours["info"]
        heads, outputs = ours["heads"], ours["outputs"]
        _warn_ignored_flags(path, preprocessing, labels, image_size, mean, std)
        kind = "race-classifier ONNX" + (" (int8)" if "quantization" in meta_info else "")
    else:  # a foreign file: flags describe it
        taxonomy = (get_taxonomy(props["classes"].split("\n")) if "classes" in props
                    else _needs_labels(path, labels, "ONNX"))
        static = declared[2] if isinstance(declared[2], int) and declared[2] == declared[3] else None
        if image_size and static and image_size != static:
            raise ModelLoadError(f"{path}: its input is declared {static}x{static} px, not --image_size {image_size}")
        preprocessing = _external_preprocessing(image_size or static, mean, std)
        meta_info, kind = {}, "ONNX"
    if outputs:
        _check_head_outputs(path, session, heads, outputs)
    expected = _expected_input_shape(declared, preprocessing.image_size)
    dtype = np.float16 if model_input.type == "tensor(float16)" else np.float32
    wanted = list(outputs.values()) if outputs else None

    def run(images: torch.Tensor) -> np.ndarray:
        _check_input(path, tuple(images.shape), expected)
        results = session.run(wanted, {model_input.name: np.ascontiguousarray(images.detach().cpu().numpy(), dtype)})
        # One output per head (in layout order) side by side: the Predictor's one logits layout for every file.
        return np.concatenate(results, axis=1) if wanted else results[0]

    info = {"path": str(path), "kind": kind, "taxonomy": taxonomy.name, "classes": ", ".join(taxonomy.classes),
            "preprocessing": preprocessing.to_dict(), "input": f"{model_input.name} {declared}",
            **{k: v for k, v in meta_info.items() if k not in ("format", "format_version")}}
    if heads is not None and heads.extra:
        info["heads"] = describe_heads(heads)
    calibration = meta_info.get("calibration")
    if calibration is not None and not (isinstance(calibration, dict) and _valid_temperature(calibration)):
        raise ModelLoadError(f"{path}: malformed race_classifier.calibration metadata: {calibration!r}")
    return Predictor(path.name, "onnx", taxonomy, preprocessing, run, info, calibration=calibration or None,
                     heads=heads)


def _check_head_outputs(path: Path, session, heads: HeadLayout, outputs: dict[str, str]) -> None:
    """Every head's named output exists and, where its width is declared, has one logit per class."""
    graph = {o.name: o.shape for o in session.get_outputs()}
    for head in heads.heads:
        name = outputs[head.name]
        if name not in graph:
            raise ModelLoadError(f"{path}: its metadata puts the {head.name} head on output {name!r}, but the graph's "
                                 f"outputs are {', '.join(graph)}")
        width = graph[name][1] if len(graph[name]) == 2 else None
        if len(graph[name]) != 2 or (isinstance(width, int) and width != len(head.classes)):
            raise ModelLoadError(f"{path}: output {name!r} is {graph[name]}, not (N, {len(head.classes)}) for the "
                                 f"{head.name} head's classes ({', '.join(head.classes)})")


def _valid_temperature(calibration: dict) -> bool:
    """The race temperature is a positive number, and so is each other head's (``calibration["heads"][name]``)
    where it has one (a head without labelled validation data may stay uncalibrated: None)."""
    def positive(t):
        return isinstance(t, (int, float)) and t > 0
    per_head = calibration.get("heads") or {}
    if not isinstance(per_head, dict) or not all(isinstance(h, dict) for h in per_head.values()):
        return False
    return positive(calibration.get("temperature", 1.0)) and all(
        h.get("temperature") is None or positive(h["temperature"]) for h in per_head.values())


def _expected_input_shape(declared: list, image_size: int) -> tuple:
    """(C, H, W) a batch must have: the declared static dims, else the preprocessing's size (None: any)."""
    channels = declared[1] if isinstance(declared[1], int) else 3
    height = declared[2] if isinstance(declared[2], int) else image_size
    width = declared[3] if isinstance(declared[3], int) else image_size
    return channels, height, width


def _check_input(path: Path, shape: tuple, expected: tuple) -> None:
    # Checked before running: ONNX Runtime's own message for a wrong shape names graph nodes, not the cause.
    if len(shape) != 4 or tuple(shape[1:]) != expected:
        c, h, w = expected
        raise ModelLoadError(f"{path.name} expects a batch of shape (N, {c}, {h}, {w}) ({c}-channel "
                             f"{h}x{w} px images, NCHW), got {tuple(shape)}; preprocess with the model's "
                             "own preprocessing (load_predictor(...).preprocessing)")


def _warn_ignored_flags(path: Path, pre: Preprocessing, labels, image_size, mean, std) -> None:
    """Flags describe foreign files; this file's metadata wins, but a flag that disagrees is said aloud."""
    ignored = [name for name, given, own in (("image size", image_size, pre.image_size),
                                              ("mean", mean, pre.mean), ("std", std, pre.std))
               if given is not None and tuple(np.atleast_1d(given)) != tuple(np.atleast_1d(own))]
    if labels:
        ignored.append("labels")
    if ignored:
        log.warning("%s carries its own classes and preprocessing; ignoring the given %s", path, ", ".join(ignored))
