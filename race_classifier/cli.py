"""The race-classifier command: one subcommand per stage of the pipeline (plain text: it is the --help description)."""
from __future__ import annotations

import argparse
import sys

from race_classifier import __version__
from race_classifier.utils import add_hidden_aliases, run_command


def _synth(args) -> int:
    from race_classifier.data.synthetic import SMOKE_BANNER, generate
    root = generate(args.out, args.identities, args.images, args.size, args.seed)
    print(f"{SMOKE_BANNER}\nWrote the synthetic pattern dataset to {root}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    from race_classifier.data import prepare
    from race_classifier.evaluation import cli as evaluation
    from race_classifier.export import cli as export
    from race_classifier.inference import cli as predict
    from race_classifier.serving import cli as serve
    from race_classifier.training import config, distill, ensemble, finalize, merge_classes, rebalance

    parser = argparse.ArgumentParser(prog="race-classifier", description=__doc__)
    parser.add_argument("--version", action="version", version=__version__)
    sub = parser.add_subparsers(dest="command", required=True)

    # train is dispatched in main() (YAML config defaults); registered here for --help.
    config.add_arguments(sub.add_parser("train", help="train a classifier from manifests (same flags as train.py)"))

    # name, help, module with add_arguments(parser, **options) and run(args), options
    stages = [
        ("prepare", "write train.txt / val.txt / classes.txt from a folder tree, FairFace CSV or UTKFace folder",
         prepare, {}),
        ("calibrate", "fit a temperature and an abstention threshold on validation data, store them in a "
         "checkpoint and write its MODEL_CARD.md (training does this itself)", finalize, {}),
        ("rebalance", "refit a trained model's race layer on its frozen features with class- or race x gender "
         "group-balanced weights (last-layer debiasing, minutes on a CPU)", rebalance, {}),
        ("merge-classes", "make a model answer in coarser classes than it was trained in (e.g. fairface7 -> seed5): "
         "its calibrated probabilities summed in the model itself, recalibrated, with a model card", merge_classes, {}),
        ("ensemble", "make several trained runs one model file answering with their mean calibrated probabilities, "
         "recalibrated, with a model card", ensemble, {}),
        ("soft-labels", "store teacher models' mean calibrated probabilities for each image of a training "
         "manifest, for knowledge distillation (train --soft_labels)", distill, {}),
        ("evaluate", "score a model on labelled images: CSV, metrics with CIs, HTML report", evaluation, {}),
        ("compare", "score a model and a baseline (e.g. production) on the same images, with paired "
         "significance tests", evaluation, {"baseline_required": True}),
        ("export", "export a checkpoint to a self-describing ONNX file (fp32 or int8), verified against "
         "PyTorch before it is written", export, {}),
        ("predict", "find, align and classify the faces in photos, folders, lists or a video", predict, {}),
        ("serve", "an HTTP service and web page for real-time inference (FastAPI + uvicorn)", serve, {}),
    ]
    for name, help_text, module, options in stages:
        p = sub.add_parser(name, help=help_text)
        module.add_arguments(p, **options)
        add_hidden_aliases(p)
        p.set_defaults(func=module.run)

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
