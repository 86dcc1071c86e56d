"""The post-training commands' flags (calibrate, rebalance, merge-classes, ensemble): argparse only, so that
``race-classifier --help`` never imports torch. Each command's work is in its own module of this package."""
from __future__ import annotations

import argparse

DEFAULT_COVERAGE = 0.95  # share of validation faces the abstention threshold answers
BALANCES = ("none", "sampler", "group", "recall")


def add_calibrate_arguments(p: argparse.ArgumentParser) -> argparse.ArgumentParser:
    p.add_argument("--model_path", required=True, help="a race-classifier checkpoint (best.pt), rewritten in place "
                   "unless --out_dir is given, or a bundled model (seed5, fairface7; needs --out_dir)")
    p.add_argument("--out_dir", help="write the recalibrated model and its card to <out_dir>/best.pt instead")
    p.add_argument("--val_txt", required=True, help="validation manifest to fit the temperature and threshold on "
                   "(never the test set you report)")
    p.add_argument("--coverage", type=float, default=DEFAULT_COVERAGE,
                   help="share of validation faces the abstention threshold answers (default %(default)s)")
    p.add_argument("--train_txt", help="training manifest, for the model card's counts "
                   "(default: the one the checkpoint was trained on, when it exists)")
    p.add_argument("--source_taxonomy", help="taxonomy of the manifest's labels, when it differs "
                   "(default: as in training)")
    p.add_argument("--label_map", help="YAML overriding the label mapping (default: as in training)")
    p.add_argument("--no_model_card", action="store_true", help="do not write MODEL_CARD.md beside the model")
    p.add_argument("--batch_size", type=int, default=64, help="images per model call while scoring --val_txt")
    p.add_argument("--workers", type=int, default=2, help="image-loading processes")
    p.add_argument("--n_boot", type=int, default=1000, help="bootstrap resamples for the card's balanced-accuracy and "
                   "gap intervals (accuracies get Wilson score intervals)")
    p.add_argument("--seed", type=int, default=0, help="seeds the bootstrap and the ECE noise floor's draws")
    p.add_argument("--device", default="cpu", help="cpu, cuda, cuda:1, ...")
    return p


def add_rebalance_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model_path", required=True, help="a race-classifier checkpoint (its backbone is kept)")
    p.add_argument("--train_txt", required=True, help="images the last layer is refitted on (labels in the "
                   "model's classes; the gender column defines the race x gender groups)")
    p.add_argument("--val_txt", required=True, help="validation manifest: calibration and the model card")
    p.add_argument("--out_dir", required=True, help="where the new best.pt and MODEL_CARD.md go")
    p.add_argument("--balance", choices=BALANCES, default="group",
                   help="none: refit with every image weighted 1; sampler: every class the same total "
                        "weight; group: every race x gender cell the same total weight (default); recall: keep "
                        "the layer, add per-class offsets fitted on --val_txt so every class reaches --min_recall")
    p.add_argument("--min_recall", type=float, default=0.6, help="--balance recall: the target recall per class")
    p.add_argument("--source_taxonomy", help="taxonomy of the manifests' labels when not the model's (e.g. a "
                   "merge-classes model's manifests in the classes it was trained in: mapped as its outputs are)")
    p.add_argument("--C", type=float, default=1.0, help="inverse L2 strength of the logistic regression")
    p.add_argument("--batch_size", type=int, default=128, help="images per model call while extracting features")
    p.add_argument("--workers", type=int, default=2, help="image-loading processes")


def add_merge_classes_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model_path", required=True, help="a race-classifier checkpoint trained in the finer classes")
    p.add_argument("--taxonomy", required=True, help="the classes to answer in: seed5, race4, a class file, "
                   "or a comma-separated list; every one must receive at least one of the model's classes")
    p.add_argument("--label_map", help="YAML of 'model class: target class' (null drops the class) overriding "
                   "the built-in mapping")
    p.add_argument("--val_txt", required=True, help="validation manifest: fits the merged classes' temperature "
                   "and abstention threshold, and the model card's figures")
    p.add_argument("--source_taxonomy", help="taxonomy of the manifests' labels (default: the model's own, "
                   "mapped as its outputs are)")
    p.add_argument("--train_txt", help="training manifest, for the model card's counts (default: the model's)")
    p.add_argument("--out_dir", required=True, help="where the new best.pt and MODEL_CARD.md go (not the "
                   "model's own folder: its card would be overwritten)")
    p.add_argument("--coverage", type=float, default=DEFAULT_COVERAGE, help="share of validation faces the abstention "
                   "threshold answers")
    p.add_argument("--batch_size", type=int, default=64, help="images per model call while scoring --val_txt")
    p.add_argument("--workers", type=int, default=2, help="image-loading processes")


def add_ensemble_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model_path", required=True, nargs="+", help="two or more race-classifier checkpoints "
                   "(best.pt) with the same classes and preprocessing, each calibrated by its training run")
    p.add_argument("--val_txt", required=True, help="validation manifest: fits the ensemble's temperature and "
                   "abstention threshold, and the model card's figures (not the members' training images)")
    p.add_argument("--train_txt", help="training manifest, for the model card's counts (default: the first "
                   "member's)")
    p.add_argument("--out_dir", required=True, help="where the ensemble's best.pt and MODEL_CARD.md go")
    p.add_argument("--coverage", type=float, default=DEFAULT_COVERAGE, help="share of validation faces the abstention "
                   "threshold answers")
    p.add_argument("--batch_size", type=int, default=64, help="images per model call while scoring --val_txt")
    p.add_argument("--workers", type=int, default=2, help="image-loading processes")
