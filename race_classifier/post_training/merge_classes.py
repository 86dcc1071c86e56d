"""Deploy a trained model in coarser classes: ``race-classifier merge-classes``.

On FairFace a model trained in its 7 races and scored in seed5 (its calibrated probabilities summed: East
Asian + Southeast Asian -> Asian, Middle Eastern -> White) beat a model trained in seed5 (README, "Accuracy
recipe and benchmark"), but only ``evaluate --taxonomy`` could sum them. This command writes a checkpoint
that answers in the coarser classes everywhere: predict, serve, evaluate, compare and the ONNX export.

    race-classifier merge-classes --model_path runs/fairface_fairface7/mnv2_160/best.pt --taxonomy seed5 \\
        --val_txt runs/fairface_fairface7/val.txt --out_dir runs/fairface_fairface7/mnv2_160_seed5

The trained network is kept as it is (models/merged.py puts the sum in the forward pass, after the trained
model's own temperature). The merged probabilities then get their own temperature and abstention threshold,
fitted on the validation manifest (labels in the model's classes, mapped like its outputs, unless
``--source_taxonomy`` says otherwise), and a model card beside the new best.pt, as a trained run does.
"""
from __future__ import annotations

import argparse
from pathlib import Path

from race_classifier.heads import Head, HeadLayout
from race_classifier.labels import Taxonomy, get_mapping, get_taxonomy, load_label_map
from race_classifier.models.bundled import resolve_arguments
from race_classifier.models.checkpoint import load_checkpoint
from race_classifier.models.merged import describe_merge, label_mapping
from race_classifier.post_training.calibrate import (
    finalize_run,
    output_path,
    read_manifests,
)
from race_classifier.utils import atomic_torch_save


def refuse_merged(ckpt: dict, path) -> None:
    if ckpt.get("merged_classes"):
        raise ValueError(f"{path} already answers in merged classes (from {ckpt['merged_classes'].get('source')}): "
                         "merge from the model it was made from")


def merged_checkpoint(ckpt: dict, mapping, source_path: str | Path) -> dict:
    """``ckpt`` (a trained model's) as a model answering in ``mapping.target``; its network is unchanged."""
    refuse_merged(ckpt, source_path)
    fine, target = mapping.source, mapping.target
    if list(fine.classes) == list(target.classes):
        raise ValueError(f"{source_path} already answers in {target.name} ({', '.join(target.classes)}): "
                         "nothing to merge")
    unreached = [c for i, c in enumerate(target.classes) if i not in mapping.table]
    if unreached:
        raise ValueError(f"{', '.join(unreached)} of {target.name} would never be predicted: no class of "
                         f"{source_path} ({', '.join(fine.classes)}) maps to it")
    heads = HeadLayout.from_dict(ckpt.get("heads"), fine.classes)
    heads = HeadLayout((Head("race", target.classes), *heads.extra), heads.age_bins)
    out = {k: v for k, v in ckpt.items() if k not in ("calibration", "resume", "heads")}
    out.update(taxonomy=target.to_dict(), num_classes=target.num_classes,
               metrics={},  # the training figures are the finer classes': the new calibration has the merged ones
               merged_classes={"from": fine.to_dict(), "taxonomy": target.to_dict(), "table": list(mapping.table),
                               "temperature": float((ckpt.get("calibration") or {}).get("temperature") or 1.0),
                               "source": str(source_path)})
    if heads.extra:
        out["heads"] = heads.to_dict()
    return out


def run(args: argparse.Namespace) -> int:
    if not 0 < args.coverage <= 1:
        raise ValueError(f"--coverage must be in (0, 1], got {args.coverage}")
    resolve_arguments(args, "model_path", checkpoint=True)
    out = output_path(args.out_dir, args.model_path)
    ckpt = load_checkpoint(args.model_path)
    refuse_merged(ckpt, args.model_path)
    fine, target = Taxonomy.from_dict(ckpt["taxonomy"]), get_taxonomy(args.taxonomy)
    mapping = get_mapping(fine, target, load_label_map(args.label_map) if args.label_map else None)
    merged = merged_checkpoint(ckpt, mapping, args.model_path)

    manifest_mapping = label_mapping(merged, get_taxonomy(args.source_taxonomy) if args.source_taxonomy else fine)
    val_samples, train_samples, train_txt = read_manifests(
        args.val_txt, args.train_txt or (ckpt.get("train_args") or {}).get("train_txt"), target, manifest_mapping,
        bool(merged.get("heads")))

    out.parent.mkdir(parents=True, exist_ok=True)
    atomic_torch_save(merged, out)
    print(f"Merged {args.model_path} ({fine.name}) into {target.name}: {describe_merge(merged['merged_classes'])}: "
          f"{out}", flush=True)
    if finalize_run(out, val_samples, val_txt=args.val_txt, train_samples=train_samples, train_txt=train_txt,
                    coverage=args.coverage, batch_size=args.batch_size, workers=args.workers) is None:
        raise ValueError(f"{out} was not calibrated: no readable race-labelled image in {args.val_txt}")
    return 0
