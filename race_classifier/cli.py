"""The race-classifier command: one subcommand per stage of the pipeline (plain text: it is the --help description)."""
from __future__ import annotations

import argparse
import sys

from race_classifier.data.options import add_prepare_arguments
from race_classifier.evaluation.options import add_arguments as add_evaluate_arguments
from race_classifier.export.options import add_arguments as add_export_arguments
from race_classifier.inference.options import add_arguments as add_predict_arguments
from race_classifier.post_training.options import (
    add_calibrate_arguments,
    add_ensemble_arguments,
    add_merge_classes_arguments,
    add_rebalance_arguments,
)
from race_classifier.serving.options import add_arguments as add_serve_arguments
from race_classifier.training.config import add_arguments as add_train_arguments
from race_classifier.training.config import add_soft_label_arguments
from race_classifier.utils import add_hidden_aliases, run_command
from race_classifier.version import __version__

# Each command's work is imported when it runs, not when the parser is built: `race-classifier --help` and a
# mistyped flag answer without loading torch (tests/test_cli.py).


def _prepare(args) -> int:
    from race_classifier.data.prepare import run
    return run(args)


def _calibrate(args) -> int:
    from race_classifier.post_training.calibrate import run
    return run(args)


def _rebalance(args) -> int:
    from race_classifier.post_training.rebalance import run
    return run(args)


def _merge_classes(args) -> int:
    from race_classifier.post_training.merge_classes import run
    return run(args)


def _ensemble(args) -> int:
    from race_classifier.post_training.ensemble import run
    return run(args)


def _soft_labels(args) -> int:
    from race_classifier.training.distill import run
    return run(args)


def _evaluate(args) -> int:
    from race_classifier.evaluation.cli import run
    return run(args)


def _export(args) -> int:
    from race_classifier.export.cli import run
    return run(args)


def _predict(args) -> int:
    from race_classifier.inference.cli import run
    return run(args)


def _serve(args) -> int:
    from race_classifier.serving.cli import run
    return run(args)


def _synth(args) -> int:
    from race_classifier.data.synthetic import SMOKE_BANNER, generate
    root = generate(args.out, args.identities, args.images, args.size, args.seed)
    print(f"{SMOKE_BANNER}\nWrote the synthetic pattern dataset to {root}")
    return 0


# name, help, add_arguments(parser, **options), run(args), options
STAGES = [
    ("prepare", "write train.txt / val.txt / classes.txt from a folder tree, FairFace CSV or UTKFace folder",
     add_prepare_arguments, _prepare, {}),
    ("calibrate", "fit a temperature and an abstention threshold on validation data, store them in a "
     "checkpoint and write its MODEL_CARD.md (training does this itself)", add_calibrate_arguments, _calibrate, {}),
    ("rebalance", "refit a trained model's race layer on its frozen features with class- or race x gender "
     "group-balanced weights (last-layer debiasing, minutes on a CPU)", add_rebalance_arguments, _rebalance, {}),
    ("merge-classes", "make a model answer in coarser classes than it was trained in (e.g. fairface7 -> seed5): "
     "its calibrated probabilities summed in the model itself, recalibrated, with a model card",
     add_merge_classes_arguments, _merge_classes, {}),
    ("ensemble", "make several trained runs one model file answering with their mean calibrated probabilities, "
     "recalibrated, with a model card", add_ensemble_arguments, _ensemble, {}),
    ("soft-labels", "store teacher models' mean calibrated probabilities for each image of a training "
     "manifest, for knowledge distillation (train --soft_labels)", add_soft_label_arguments, _soft_labels, {}),
    ("evaluate", "score a model on labelled images: CSV, metrics with CIs, HTML report", add_evaluate_arguments,
     _evaluate, {}),
    ("compare", "score a model and a baseline (e.g. production) on the same images, with paired "
     "significance tests", add_evaluate_arguments, _evaluate, {"baseline_required": True}),
    ("export", "export a checkpoint to a self-describing ONNX file (fp32 or int8), verified against "
     "PyTorch before it is written", add_export_arguments, _export, {}),
    ("predict", "find, align and classify the faces in photos, folders, lists or a video", add_predict_arguments,
     _predict, {}),
    ("serve", "an HTTP service and web page for real-time inference (FastAPI + uvicorn)", add_serve_arguments,
     _serve, {}),
]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="race-classifier", description=__doc__)
    parser.add_argument("--version", action="version", version=__version__)
    sub = parser.add_subparsers(dest="command", required=True)

    # train is dispatched in main() (YAML config defaults); registered here for --help.
    add_train_arguments(sub.add_parser("train", help="train a classifier from manifests (same flags as train.py)"))
    for name, help_text, add_arguments, run, options in STAGES:
        p = sub.add_parser(name, help=help_text)
        add_arguments(p, **options)
        add_hidden_aliases(p)
        p.set_defaults(func=run)

    p = sub.add_parser("synth", help="generate the embedded synthetic smoke-test dataset (abstract patterns)")
    p.add_argument("--out", required=True, help="folder to write root/<class>/<identity>/<image>.png into")
    p.add_argument("--identities", type=int, default=24, help="identities per class")
    p.add_argument("--images", type=int, default=3, help="images per identity")
    p.add_argument("--size", type=int, default=48, help="image side in pixels")
    p.add_argument("--seed", type=int, default=0, help="the same seed writes the same images")
    p.set_defaults(func=_synth)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["train"]:
        # train resolves its YAML config defaults itself, shared with the root train.py.
        from race_classifier.training.train import main as train_main
        return train_main(argv[1:], prog="race-classifier train")
    args = build_parser().parse_args(argv)
    return run_command(args.func, args)


if __name__ == "__main__":
    sys.exit(main())
