"""The checkpoint file: a model plus everything needed to use it, loadable with weights_only=True.

Keys (all plain Python types and tensors, so ``torch.load(..., weights_only=True)`` reads it):
  format, format_version, arch, num_classes, state_dict, taxonomy, preprocessing,
  train_args, epoch, metrics, history, saved_at (when training wrote these weights, UTC; kept by the
  post-training changes), and for resuming (``last.pt``) a ``resume`` dict;
  ``heads`` (race.heads.HeadLayout.to_dict) when the model has gender/age heads besides race: the model's
  output is then every head's logits side by side, race first (files without it are race-only).
best.pt also gets, once training ends (or from ``race-classifier calibrate``), ``calibration``:
  {"temperature", "ece_before", "ece_after", "ece_if_calibrated", "nll_before", "nll_after", "fitted_on", "n",
   "abstention": {"threshold", "target_coverage", "coverage", "accuracy_at_coverage", "accuracy_all"}}
Files without it load as before (temperature 1, no abstention threshold). ``ece_if_calibrated`` (ece_after's
noise floor, evaluation.metrics.ece_if_calibrated) is absent from files calibrated before it existed.
``merged_classes`` (written by ``race-classifier merge-classes``, models/merged.py): the network was trained in
other, finer classes, whose calibrated probabilities are summed into ``taxonomy``'s; ``state_dict`` is the
trained network's, ``taxonomy`` and ``heads`` describe what the loaded model answers in.
``ensemble`` (written by ``race-classifier ensemble``, models/ensemble.py): the model is several trained
race-only networks whose calibrated probabilities are averaged; ``state_dict`` holds them all.
``weights_from`` instead of ``state_dict``: the file name of a checkpoint in the same folder whose
``state_dict`` this one uses (the bundled seed5 model shares fairface7.pt's network; models/bundled.py).
"""
from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

import torch
from torch import nn

from race_classifier.data.transforms import Preprocessing
from race_classifier.heads import HeadLayout
from race_classifier.labels import Taxonomy
from race_classifier.models.ensemble import build_ensemble
from race_classifier.models.factory import (
    WeightsMismatchError,
    create_model,
    read_state_dict,
    shared_weights_file,
)
from race_classifier.models.merged import MergedRaceClasses
from race_classifier.utils import atomic_torch_save

FORMAT = "race-classifier-checkpoint"
FORMAT_VERSION = 1
REQUIRED_KEYS = ("arch", "state_dict", "taxonomy", "preprocessing")


class CheckpointError(ValueError):
    pass


def save_checkpoint(path: str | Path, *, model: nn.Module, arch: str, taxonomy: Taxonomy,
                    preprocessing: Preprocessing, train_args: dict, epoch: int, metrics: dict,
                    history: list[dict], resume: dict | None = None, heads: HeadLayout | None = None) -> None:
    state = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "arch": arch,
        "num_classes": taxonomy.num_classes,
        "state_dict": {k: v.detach().cpu() for k, v in model.state_dict().items()},
        "taxonomy": taxonomy.to_dict(),
        "preprocessing": preprocessing.to_dict(),
        "train_args": train_args,
        "epoch": epoch,
        "metrics": metrics,
        "history": history,
        "saved_at": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
    }
    if heads is not None and heads.extra:
        state["heads"] = heads.to_dict()
    if resume is not None:
        state["resume"] = resume
    atomic_torch_save(state, path)


def load_checkpoint(path: str | Path) -> dict:
    """Read a checkpoint safely: no pickled code runs, whoever made the file."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint not found: {path}")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - every unpickling failure means "not a checkpoint we can trust"
        raise CheckpointError(f"{path}: not a checkpoint that can be loaded safely ({e})") from None
    if not isinstance(ckpt, dict) or ckpt.get("format") != FORMAT:
        raise CheckpointError(f"{path}: not a race-classifier checkpoint (no '{FORMAT}' format marker)")
    version = ckpt.get("format_version", 0)
    if not isinstance(version, int):
        raise CheckpointError(f"{path}: malformed checkpoint: format_version {version!r} is not a number")
    if version > FORMAT_VERSION:
        raise CheckpointError(f"{path}: checkpoint format {ckpt['format_version']} is newer than this "
                              f"version of race-classifier understands ({FORMAT_VERSION})")
    if "state_dict" not in ckpt and "weights_from" in ckpt:
        try:
            ckpt["state_dict"] = read_state_dict(shared_weights_file(path, ckpt["weights_from"]), follow=False)
        except WeightsMismatchError as e:
            raise CheckpointError(str(e)) from None
    # Every command reads these right after loading: a file without them is refused here, by name.
    missing = [key for key in REQUIRED_KEYS if key not in ckpt]
    if missing:
        raise CheckpointError(f"{path}: malformed checkpoint: no {', '.join(missing)}")
    try:
        Taxonomy.from_dict(ckpt["taxonomy"])
        Preprocessing.from_dict(ckpt["preprocessing"])
    except (KeyError, TypeError, ValueError) as e:
        raise CheckpointError(f"{path}: malformed checkpoint: unreadable taxonomy or preprocessing ({e!r})") from None
    return ckpt


@dataclass
class LoadedModel:
    model: nn.Module
    taxonomy: Taxonomy
    preprocessing: Preprocessing
    checkpoint: dict
    heads: HeadLayout


def load_model(path: str | Path, device: str | torch.device = "cpu") -> LoadedModel:
    """The model of a checkpoint in eval mode, with its class names and preprocessing."""
    ckpt = load_checkpoint(path)
    taxonomy = Taxonomy.from_dict(ckpt["taxonomy"])
    try:
        heads = HeadLayout.from_dict(ckpt.get("heads"), taxonomy.classes)
    except (KeyError, TypeError, ValueError, IndexError) as e:
        raise CheckpointError(f"{path}: malformed head layout ({e})") from None
    try:
        model = _rebuild(ckpt, taxonomy, heads)
    except (KeyError, TypeError, ValueError, IndexError, RuntimeError) as e:
        # A foreign or damaged file (another architecture, other classes, missing weights): say which file.
        raise CheckpointError(f"{path}: the model in this checkpoint cannot be rebuilt "
                              f"(arch {ckpt.get('arch')!r}): {e}") from None
    model.to(device).eval()
    return LoadedModel(model, taxonomy, Preprocessing.from_dict(ckpt["preprocessing"]), ckpt, heads)


def _rebuild(ckpt: dict, taxonomy: Taxonomy, heads: HeadLayout) -> nn.Module:
    merge = ckpt.get("merged_classes")
    trained_outputs = heads.num_outputs + (len(merge["table"]) - taxonomy.num_classes if merge else 0)
    if ckpt.get("ensemble"):
        model = build_ensemble(ckpt["ensemble"], trained_outputs, ckpt["preprocessing"])
    else:
        model = create_model(ckpt["arch"], trained_outputs)
    model.load_state_dict(ckpt["state_dict"])
    if merge:
        model = MergedRaceClasses(model, merge["table"], taxonomy.num_classes, merge.get("temperature", 1.0),
                                  merge.get("offsets"))
    return model
