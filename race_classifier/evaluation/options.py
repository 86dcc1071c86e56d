"""``race-classifier evaluate`` / ``compare`` flags (and the root evaluation.py's): argparse only, so that
``race-classifier --help`` never imports torch (the command's work: cli.py)."""
from __future__ import annotations

import argparse

from race_classifier.utils import add_amp_argument


def add_arguments(p: argparse.ArgumentParser, baseline_required: bool = False) -> argparse.ArgumentParser:
    p.add_argument("--model_path", required=True, help="the model to evaluate: a checkpoint, FairFace "
                   "ResNet-34, TorchScript or ONNX file")
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--root_dir", help="images as root/<race>/<identity>/<image>")
    src.add_argument("--val_txt", help="a manifest (gender/age columns used when present)")
    p.add_argument("--output_csv", required=True, help="per-image predictions")
    p.add_argument("--output_html", help="self-contained HTML report")
    p.add_argument("--taxonomy", help="evaluate in this taxonomy (default: the model's own classes)")
    p.add_argument("--source_taxonomy", help="taxonomy of the data's labels, when it differs (mapped)")
    p.add_argument("--label_map", help="YAML overriding the data-label mapping (class: class or null)")
    p.add_argument("--labels", help="class order of a model file without metadata (TorchScript/ONNX)")
    p.add_argument("--image_size", type=int, help="input size of a model file without metadata")
    p.add_argument("--mean", type=float, nargs=3, help="normalisation mean of a model file without metadata")
    p.add_argument("--std", type=float, nargs=3, help="normalisation std of a model file without metadata")
    g = p.add_argument_group("baseline (e.g. the production model), scored on the same images")
    base = g.add_mutually_exclusive_group(required=baseline_required)
    base.add_argument("--baseline_path", help="checkpoint, FairFace ResNet-34, TorchScript or ONNX file")
    base.add_argument("--baseline_predictions", help="CSV of the baseline's predictions: path, pred_label, "
                      "optional prob_<class> columns")
    g.add_argument("--baseline_labels", help="the baseline's class order/taxonomy (TorchScript, ONNX, CSV)")
    g.add_argument("--baseline_image_size", type=int, help="input size of a baseline file without metadata")
    g.add_argument("--baseline_mean", type=float, nargs=3, help="normalisation mean of a baseline file without "
                   "metadata")
    g.add_argument("--baseline_std", type=float, nargs=3, help="normalisation std of a baseline file without "
                   "metadata")
    p.add_argument("--tta", action="store_true", help="test-time augmentation of the evaluated model: average "
                   "each face's calibrated probabilities with its horizontal mirror's")
    g.add_argument("--baseline_tta", action="store_true", help="the same for the baseline model file")
    p.add_argument("--batch_size", type=int, default=64, help="images per model call")
    p.add_argument("--workers", type=int, default=2, help="image-loading processes")
    p.add_argument("--n_boot", type=int, default=1000, help="bootstrap resamples for the intervals of balanced "
                   "accuracy, group gaps and model differences (accuracies get Wilson score intervals)")
    p.add_argument("--abstain", action="store_true", help="also report coverage and accuracy on the images the "
                   "model answers with its stored abstention threshold (calibrated checkpoints and their exports)")
    p.add_argument("--seed", type=int, default=0, help="seeds the bootstrap and the ECE noise floor's draws")
    p.add_argument("--device", default="auto", help="auto (cuda when available, else cpu), cpu, cuda, cuda:1, ...")
    add_amp_argument(p)
    return p
