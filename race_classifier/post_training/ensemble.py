"""Deploy several trained runs as one model: ``race-classifier ensemble``.

    race-classifier ensemble --model_path runA/best.pt runB/best.pt runC/best.pt \\
        --val_txt runs/fairface_fairface7/val.txt --out_dir runs/fairface_fairface7/ensemble3

The new best.pt answers with the mean of the members' calibrated probabilities (models/ensemble.py puts
the average in the network), then gets its own temperature and abstention threshold, fitted on the
validation manifest, and a model card, as a trained run does. It costs one forward pass per member.
"""
from __future__ import annotations

import argparse
from pathlib import Path

from race_classifier.data.transforms import Preprocessing
from race_classifier.labels import Taxonomy
from race_classifier.models.bundled import resolve_arguments
from race_classifier.models.checkpoint import FORMAT, FORMAT_VERSION, load_checkpoint
from race_classifier.models.ensemble import build_ensemble, ensemble_input
from race_classifier.post_training.calibrate import (
    finalize_run,
    output_path,
    read_manifests,
    training_label_mapping,
)
from race_classifier.utils import atomic_torch_save, file_sha256

# a member's own post-training changes (rebalance) stay in its description, not the ensemble's
MEMBER_CHANGES = ("last_layer_rebalance", "min_recall", "recall_offsets", "recall_offsets_cross_fit", "rebalanced_from")


def _refusal(ckpt: dict) -> str | None:
    """Why ``ckpt`` cannot be a member (None: it can)."""
    if ckpt.get("ensemble"):
        return "is an ensemble already: list its members instead"
    if ckpt.get("merged_classes"):
        return ("answers in merged classes: make the ensemble of the models it was made from, then merge "
                "that (merge-classes works on an ensemble)")
    if ckpt.get("heads"):
        return "has gender/age heads: an ensemble averages race-only models"
    return None


def ensemble_checkpoint(paths: list[str | Path]) -> dict:
    """One checkpoint holding every member's weights, answering with their mean calibrated probabilities."""
    if len(paths) < 2:
        raise ValueError("an ensemble needs at least two --model_path checkpoints")
    ckpts = [load_checkpoint(p) for p in paths]
    first = ckpts[0]
    for path, ckpt in zip(paths, ckpts):
        reason = _refusal(ckpt)
        if reason:
            raise ValueError(f"{path} {reason}")
        if ckpt["taxonomy"] != first["taxonomy"]:
            raise ValueError(f"{path} has other classes than {paths[0]} ({ckpt['taxonomy']} against "
                             f"{first['taxonomy']}): members must answer in the same classes")
    preprocessing = first["preprocessing"]
    if any(c["preprocessing"] != preprocessing for c in ckpts):  # each member's input is made in the network
        try:
            preprocessing = ensemble_input([Preprocessing.from_dict(c["preprocessing"]) for c in ckpts]).to_dict()
        except ValueError as e:
            raise ValueError(f"{', '.join(map(str, paths))}: {e}") from None
    members = [{"source": str(p), "sha256": file_sha256(p), "arch": c["arch"],
                "temperature": float((c.get("calibration") or {}).get("temperature") or 1.0),
                "epoch": c.get("epoch"), "val_accuracy": (c.get("metrics") or {}).get("val_accuracy"),
                "preprocessing": c["preprocessing"]}
               for p, c in zip(paths, ckpts)]
    spec = {"members": members}
    model = build_ensemble(spec, first["num_classes"], preprocessing)
    for member, ckpt in zip(model.members, ckpts):
        member.load_state_dict(ckpt["state_dict"])
    return {"format": FORMAT, "format_version": FORMAT_VERSION,
            "arch": f"ensemble({', '.join(m['arch'] for m in members)})",
            "num_classes": first["num_classes"],
            "state_dict": {k: v.detach().cpu() for k, v in model.state_dict().items()},
            "taxonomy": first["taxonomy"], "preprocessing": preprocessing,
            "train_args": {k: v for k, v in (first.get("train_args") or {}).items() if k not in MEMBER_CHANGES},
            "epoch": first.get("epoch"), "metrics": {},
            "history": [], "saved_at": first.get("saved_at"), "ensemble": spec}


def run(args: argparse.Namespace) -> int:
    if not 0 < args.coverage <= 1:
        raise ValueError(f"--coverage must be in (0, 1], got {args.coverage}")
    resolve_arguments(args, "model_path", checkpoint=True)
    out = output_path(args.out_dir, *args.model_path)
    ckpt = ensemble_checkpoint(args.model_path)
    taxonomy, train_args = Taxonomy.from_dict(ckpt["taxonomy"]), ckpt["train_args"]
    mapping = training_label_mapping(train_args, taxonomy)  # labels mapped as the first member's training did
    val_samples, train_samples, train_txt = read_manifests(
        args.val_txt, args.train_txt or train_args.get("train_txt"), taxonomy, mapping, False)
    out.parent.mkdir(parents=True, exist_ok=True)
    atomic_torch_save(ckpt, out)
    print(f"Ensemble of {len(args.model_path)} models ({ckpt['arch']}): {out}", flush=True)
    if finalize_run(out, val_samples, val_txt=args.val_txt, train_samples=train_samples, train_txt=train_txt,
                    coverage=args.coverage, batch_size=args.batch_size, workers=args.workers) is None:
        raise ValueError(f"{out} was not calibrated: no readable race-labelled image in {args.val_txt}")
    return 0
