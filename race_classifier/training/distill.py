"""Knowledge distillation from teachers' soft labels, offline.

``race-classifier soft-labels`` runs one or more trained models (the teachers: an ensemble of runs, or a larger
model trained on a GPU) over a training manifest and stores each image's mean calibrated probabilities in an
.npz file. ``train --soft_labels FILE --distill_weight W`` then trains the race head towards
W x the teachers' probabilities + (1 - W) x the (label-smoothed) label, by cross-entropy (Hinton et al. 2015,
at temperature 1: the teachers' probabilities are already calibrated).

Offline because the teachers then cost one pass over the images, not a forward pass per training step
(docs/training.md, "Knowledge distillation"). The price: a teacher saw each face whole (and, with
--tta, mirrored), the student sees augmented crops of it. The file is keyed by image path, so it serves any
manifest listing those images, and it names its teachers (path and sha256) and classes: training warns
when a teacher file has changed since, as the soft labels are then stale.
"""
from __future__ import annotations

import argparse
import hashlib
import io
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from race_classifier.data.manifest import Sample, read_manifest
from race_classifier.evaluation.runner import predict_samples
from race_classifier.labels import get_mapping, get_taxonomy
from race_classifier.models.bundled import resolve_arguments
from race_classifier.models.loaders import load_predictor
from race_classifier.utils import atomic_write_bytes, file_sha256

log = logging.getLogger("race_classifier.distill")
KEYS = ("paths", "probs", "classes", "teachers")  # required; "teacher_sha256" is optional (older files lack it)


class SoftLabelError(ValueError):
    pass


def _key(path: str) -> str:
    """Manifests may list an image by a relative or an absolute path: match on the absolute one."""
    return os.path.normpath(os.path.abspath(path))


@dataclass
class SoftLabels:
    paths: list[str]
    probs: np.ndarray  # (N, classes) float32; NaN rows: an image no teacher could read
    classes: list[str]
    teachers: list[str]
    sha256: str = ""  # of the .npz file itself
    teacher_sha256: list[str] = field(default_factory=list)  # of each teacher file when the labels were written

    def save(self, path: str | Path) -> None:
        buffer = io.BytesIO()
        np.savez_compressed(buffer, paths=np.array(self.paths, dtype=str), probs=self.probs.astype(np.float32),
                            classes=np.array(self.classes, dtype=str), teachers=np.array(self.teachers, dtype=str),
                            teacher_sha256=np.array(self.teacher_sha256, dtype=str))
        atomic_write_bytes(path, buffer.getvalue())

    @classmethod
    def load(cls, path: str | Path) -> "SoftLabels":
        path = Path(path)
        if not path.is_file():
            raise SoftLabelError(f"soft-label file not found: {path}")
        data = path.read_bytes()
        try:
            with np.load(io.BytesIO(data), allow_pickle=False) as npz:  # no pickles: a file may come from anyone
                arrays = {k: npz[k] for k in KEYS}
                hashes = npz["teacher_sha256"].tolist() if "teacher_sha256" in npz.files else []
        except Exception as e:  # noqa: BLE001 - anything unreadable is one message naming the file
            raise SoftLabelError(f"{path}: not a soft-label file written by `race-classifier soft-labels` "
                                 f"(arrays {', '.join(KEYS)}): {e}") from None
        probs, paths, classes = arrays["probs"], arrays["paths"].tolist(), arrays["classes"].tolist()
        readable = ~np.isnan(probs).any(axis=1) if probs.ndim == 2 else None
        if (probs.ndim != 2 or probs.shape != (len(paths), len(classes)) or (probs[readable] < 0).any()
                or not np.allclose(probs[readable].sum(axis=1), 1.0, atol=1e-3)):
            raise SoftLabelError(f"{path}: probs must be one probability row per path over {len(classes)} classes "
                                 f"(got shape {probs.shape} for {len(paths)} paths)")
        return cls(paths, probs, classes, arrays["teachers"].tolist(), hashlib.sha256(data).hexdigest(), hashes)

    def changed_teachers(self) -> list[str]:
        """Teacher files that still exist at their recorded path but no longer hold the bytes the soft labels
        came from (a teacher retrained into the same directory): these soft labels are then stale."""
        return [t for t, h in zip(self.teachers, self.teacher_sha256)
                if h and Path(t).is_file() and file_sha256(t) != h]


class TeacherTargets:
    """(race labels, dataset indices) -> target distributions: ``weight`` x the teachers' probabilities +
    (1 - weight) x the label smoothed by ``label_smoothing``. An image the teachers could not read trains on
    its label alone."""

    def __init__(self, soft: SoftLabels, samples: list[Sample], classes: list[str], weight: float,
                 label_smoothing: float, source: str):
        if soft.classes != list(classes):
            raise SoftLabelError(f"{source} holds probabilities over {soft.classes}; this run trains "
                                 f"{list(classes)} (pass --taxonomy to soft-labels to map the teachers' classes)")
        row = {_key(p): i for i, p in enumerate(soft.paths)}
        missing = [s for s in samples if _key(s.path) not in row]
        if missing:
            shown = ", ".join(f"line {s.line}: {s.path}" for s in missing[:5])
            raise SoftLabelError(f"{source} has no soft labels for {len(missing)} of the {len(samples)} training "
                                 f"images ({shown}{', ...' if len(missing) > 5 else ''}): write it from this "
                                 "training manifest")
        self.table = torch.from_numpy(soft.probs[[row[_key(s.path)] for s in samples]]).float()
        self.known = ~self.table.isnan().any(dim=1)
        self.table[~self.known] = 0.0
        self.weight, self.label_smoothing, self.num_classes = weight, label_smoothing, len(classes)

    def __call__(self, labels: torch.Tensor, indices: torch.Tensor) -> torch.Tensor:
        off = self.label_smoothing / self.num_classes
        label_part = torch.full((len(labels), self.num_classes), off, device=labels.device)
        label_part.scatter_(1, labels[:, None], 1.0 - self.label_smoothing + off)
        teacher = self.table[indices].to(labels.device)
        weight = self.weight * self.known[indices].to(labels.device, torch.float32)[:, None]
        return weight * teacher + (1.0 - weight) * label_part


# -- the soft-labels command ---------------------------------------------------------------------------------


def run(args: argparse.Namespace) -> int:
    resolve_arguments(args, "model_path")
    teachers = [load_predictor(p, device=args.device, tta=args.tta, amp=args.amp) for p in args.model_path]
    taxonomy = get_taxonomy(args.taxonomy) if args.taxonomy else teachers[0].taxonomy
    mapping = get_mapping(get_taxonomy(args.source_taxonomy), taxonomy) if args.source_taxonomy else None
    samples = read_manifest(args.train_txt, taxonomy, mapping, check_files=False)
    columns = [f"prob_{k}" for k in range(taxonomy.num_classes)]
    tables = [predict_samples(t, samples, taxonomy, args.batch_size, args.workers, desc=f"teacher {path}")
              for t, path in zip(teachers, args.model_path)]
    probs = np.mean([t[columns].to_numpy() for t in tables], axis=0)  # NaN where any teacher could not read
    unreadable = np.isnan(probs).any(axis=1)
    if unreadable.all():
        raise SoftLabelError(f"no image of {args.train_txt} could be read")
    for i in np.flatnonzero(unreadable)[:20]:
        log.warning("%s:%d: %s unreadable (trains on its label alone): %s", args.train_txt, samples[i].line,
                    samples[i].path, next(t["error"].iat[i] for t in tables if t["error"].iat[i]))
    SoftLabels([s.path for s in samples], probs.astype(np.float32), list(taxonomy.classes),
               [str(p) for p in args.model_path],
               teacher_sha256=[file_sha256(p) if Path(p).is_file() else "" for p in args.model_path]).save(args.out)
    labels = np.array([s.label for s in samples])
    agree = (probs[~unreadable].argmax(axis=1) == labels[~unreadable]).mean()
    print(f"Wrote soft labels of {len(samples) - unreadable.sum()} image(s) over {taxonomy.num_classes} classes "
          f"from {len(teachers)} teacher(s) to {args.out}; the teachers' top class matches the label for "
          f"{agree:.2%} of them" + (f"; {unreadable.sum()} unreadable" if unreadable.any() else ""))
    return 0
