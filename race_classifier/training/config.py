"""Training options: command-line flags, with defaults that a YAML file (-c config.yaml) can change.

As in timm's train.py: the config file sets defaults, flags given on the command line win.
"""
from __future__ import annotations

import argparse
import os
from pathlib import Path

import yaml

from race_classifier.models.bundled import bundled_names, model_file
from race_classifier.post_training.options import DEFAULT_COVERAGE
from race_classifier.utils import add_amp_argument, add_hidden_aliases

BALANCE_MODES = ("none", "sampler", "loss", "group")
BEST_METRICS = ("val_accuracy", "val_balanced_accuracy", "val_worst_class_accuracy", "val_loss")


def add_arguments(p: argparse.ArgumentParser) -> argparse.ArgumentParser:
    p.add_argument("-c", "--config", help="YAML file of option defaults (keys are the flag names)")
    g = p.add_argument_group("data")
    g.add_argument("--dataset", required=True, help="name of the run; names its outputs")
    g.add_argument("--train_txt", required=True, help="training manifest: '<image path> <label>' per line")
    g.add_argument("--val_txt", required=True, help="validation manifest")
    g.add_argument("--taxonomy", help="class list: seed5 (default), fairface7, race4, utkface5, a class file, "
                   "or 'A,B,C'; default: classes.txt beside --train_txt if there, else seed5")
    g.add_argument("--source_taxonomy", help="taxonomy the manifests' labels are in, when it differs; "
                   "labels are then mapped (e.g. fairface7 -> seed5)")
    g.add_argument("--label_map", help="YAML of 'source class: target class' (null drops the class)")
    g.add_argument("--cache_dir", help="build/use a pre-resized uint8 memory-mapped copy of the images here")
    g.add_argument("--shards", default="auto",
                   help="prepared shards to read images from (prepare --shards): auto uses shards/<image_size>/ "
                        "beside --train_txt when present; none reads the image files; or a shard set's folder")
    g.add_argument("--source_weights",
                   help="a mix's share of each epoch's draws per source: a YAML file of 'source: weight' or "
                        "'a=0.5,b=0.5' (default: source_weights.yaml beside --train_txt, as prepare mix writes; none: draw by size)")
    g.add_argument("--workers", type=int, default=min(4, os.cpu_count() or 1), help="DataLoader worker processes")
    g.add_argument("--persistent_workers", action=argparse.BooleanOptionalAction, default=None,
                   help="keep the DataLoader workers alive across epochs (default: on when --workers > 0); "
                        "augmentation is seeded per image, so results do not depend on it")
    g = p.add_argument_group("model")
    g.add_argument("--arch", default="torchvision:mobilenet_v2",
                   help="timm model name, 'torchvision:<name>' for torchvision's, or mobilefacenet (the "
                        "face-recognition backbone; --pretrained its ONNX file) or mobilefacenet_ms (the same with "
                        "its pooled earlier stages beside the GDC output)")
    g.add_argument("--pretrained", help="local weights file (offline), a bundled model (fairface7: fine-tune from it; "
                   "its classifier too where the classes match), 'default' or 'hf-hub:<repo>' (online)")
    g.add_argument("--initial_checkpoint", metavar="CHECKPOINT",
                   help="start from every weight of a checkpoint of this architecture, classes and heads (e.g. a "
                        "run at a lower --image_size, fine-tuned here at a higher one); --pretrained is then unused")
    g.add_argument("--head_init", choices=("random", "linear_probe"), default="random",
                   help="how the new race layer starts: random, or linear_probe: a logistic regression fitted on "
                        "the pretrained backbone's frozen features of the training images, then fine-tuned with "
                        "the rest (LP-FT; docs/training.md)")
    g.add_argument("--image_size", type=int, default=224, help="input size in pixels (square)")
    g.add_argument("--crop", choices=("auto", "fairface", "arcface"), default="auto",
                   help="the face crop the model takes, stored in the checkpoint so that inference cuts the same: "
                        "fairface (FairFace's released chips: dlib alignment, padding 0.25) or arcface (ArcFace's "
                        "112x112 five-point alignment, for face-recognition backbones: a fixed box of each FairFace "
                        "chip; in photos the landmarks are aligned to ArcFace's template); auto: the backbone's "
                        "own (arcface for mobilefacenet), else fairface")
    g.add_argument("--heads", default="race",
                   help="output heads on the shared backbone: race, or e.g. race,gender,age. gender classes come "
                        "from the manifests' gender column, age groups from their age column (--age_bins); a "
                        "sample trains only the heads it has labels for")
    g.add_argument("--age_bins", default="Child:0,Teen:13,Adult:20,Senior:60",
                   help="age groups by lower age; a range such as FairFace's 10-19 goes to the group holding "
                        "most of its years (a tie leaves it unlabelled)")
    g.add_argument("--freeze_until", metavar="MODULE",
                   help="keep the pretrained layers before this module fixed, e.g. features.4 (torchvision:mobilenet_v2) "
                        "or blocks.2 (timm EfficientNets): no gradients for them, so a CPU step is faster "
                        "(docs/training.md)")
    g.add_argument("--drop_rate", type=float, default=0.0, help="dropout before the classifier (timm models)")
    g = p.add_argument_group("optimisation")
    g.add_argument("--batch_size", type=int, default=64, help="images per forward/backward pass (per process)")
    g.add_argument("--accum_steps", type=int, default=1,
                   help="gradient accumulation: one optimizer step per N batches (effective batch N x "
                        "--batch_size); the LR schedule and --save_every_steps count optimizer steps")
    g.add_argument("--num_epochs", type=int, default=50, help="epochs to train (fewer with --patience)")
    g.add_argument("--learning_rate", type=float, default=1e-3, help="peak AdamW learning rate")
    g.add_argument("--backbone_lr_ratio", type=float, default=1.0,
                   help="learning rate of every layer but the classifier, as a fraction of the classifier's "
                        "(e.g. 0.1: a pretrained backbone fine-tuned more gently than its new head); the "
                        "schedule scales both")
    g.add_argument("--weight_decay", type=float, default=0.05, help="AdamW weight decay")
    g.add_argument("--warmup_epochs", type=float, default=1.0, help="linear warm-up, then cosine decay")
    g.add_argument("--min_lr_ratio", type=float, default=0.01, help="final learning rate / peak")
    g.add_argument("--label_smoothing", type=float, default=0.1,
                   help="share of each target spread evenly over the classes (0: hard labels)")
    g.add_argument("--mixup", type=float, default=0.0, metavar="ALPHA",
                   help="mixup: blend each batch with itself reversed, Beta(ALPHA, ALPHA) weights (0: off; race only)")
    g.add_argument("--cutmix", type=float, default=0.0, metavar="ALPHA",
                   help="CutMix: paste a box of the reversed batch, Beta(ALPHA, ALPHA) area (0: off); with --mixup "
                        "too, each batch gets one or the other at random")
    g.add_argument("--mix_prob", type=float, default=1.0, help="share of batches mixed (with --mixup/--cutmix)")
    g.add_argument("--soft_labels", metavar="FILE",
                   help="knowledge distillation: train the race head towards teachers' probabilities, from a file "
                        "written by `race-classifier soft-labels` for this training manifest (race only)")
    g.add_argument("--distill_weight", type=float, default=0.5,
                   help="with --soft_labels: weight of the teachers' probabilities in the targets (the label has "
                        "the rest)")
    g.add_argument("--model_ema_decay", type=float, default=0.0,
                   help="keep an exponential moving average of the weights with this decay (e.g. 0.998; 0: off), "
                        "warmed up over the first steps (timm's ModelEmaV3); best.pt holds the averaged weights")
    g.add_argument("--balance", choices=BALANCE_MODES, default="none",
                   help="sampler: draw classes equally; loss: weight the loss by inverse class frequency; "
                        "group: draw race x gender cells equally (the manifest's gender column; unknown "
                        "gender is a cell of its own in each class)")
    g.add_argument("--hflip", type=float, default=0.5, help="probability of a horizontal flip (augmentation)")
    g.add_argument("--scale_min", type=float, default=0.8, help="smallest random-resized-crop area")
    g.add_argument("--color_jitter", type=float, default=0.2,
                   help="strength of random brightness, contrast and saturation changes (0: off)")
    g.add_argument("--amp", choices=("auto", "bf16", "fp16", "off"), default="auto",
                   help="mixed precision. CUDA: auto is bf16 where supported, else fp16. CPU: auto is off; "
                        "bf16 is faster on CPUs with AVX512-BF16/AMX (weights stay fp32; docs/training.md)")
    g.add_argument("--channels_last", action="store_true",
                   help="NHWC memory format: faster convolutions with AMP on GPU and with oneDNN on CPU")
    g.add_argument("--compile", action=argparse.BooleanOptionalAction, default=False,
                   help="torch.compile the training model (inductor: needs Triton on GPU, a C++ compiler on "
                        "CPU); the first steps are slow while it compiles (--no-compile: off where a config sets it)")
    g.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:1, ...")
    g = p.add_argument_group("run control")
    g.add_argument("--checkpoint_dir", help="where best.pt, last.pt and the run's files go (default runs/<dataset>)")
    g.add_argument("--log_file", help="CSV log, one row per epoch (default <checkpoint_dir>/log.csv)")
    g.add_argument("--best_metric", choices=BEST_METRICS, default="val_accuracy",
                   help="the validation figure that chooses best.pt and drives --patience: val_accuracy, "
                        "val_balanced_accuracy (mean recall over classes), val_worst_class_accuracy or val_loss "
                        "(lower is better)")
    g.add_argument("--patience", type=int, default=10, help="stop after this many epochs without improvement (0: never)")
    g.add_argument("--seed", type=int, default=0,
                   help="seeds initialisation, sampling order, augmentation and dropout: a run is reproducible")
    g.add_argument("--resume", action="store_true", help="continue the run in --checkpoint_dir from last.pt")
    g.add_argument("--overwrite", action="store_true", help="start afresh even if the run's files exist")
    g.add_argument("--save_every_steps", type=int, default=0,
                   help="also checkpoint mid-epoch every N steps, so a killed run loses at most N steps")
    g.add_argument("--abstain_coverage", type=float, default=DEFAULT_COVERAGE,
                   help="after training, best.pt gets a temperature and an abstention threshold fitted on the "
                        "validation set; the threshold answers this share of validation faces")
    return p


def parse_args(argv: list[str] | None = None, prog: str = "train.py") -> argparse.Namespace:
    parser = add_arguments(argparse.ArgumentParser(prog=prog, description="Train a face race classifier."))
    add_hidden_aliases(parser)
    return resolve(parser, argv)


def resolve(parser: argparse.ArgumentParser, argv: list[str] | None) -> argparse.Namespace:
    """Apply the YAML config's defaults, parse, and fill in the defaults that depend on other options."""
    config_parser = argparse.ArgumentParser(add_help=False)
    config_parser.add_argument("-c", "--config")
    known, _ = config_parser.parse_known_args(argv)
    if known.config:
        with open(known.config, encoding="utf-8") as f:
            cfg = yaml.safe_load(f) or {}
        valid = {a.dest for a in parser._actions}
        unknown = sorted(set(cfg) - valid)
        if unknown:
            parser.error(f"{known.config}: unknown option(s) {', '.join(unknown)}")
        # Options given in the file no longer need to be on the command line.
        for action in parser._actions:
            if action.dest in cfg:
                action.required = False
        parser.set_defaults(**cfg)
    args = parser.parse_args(argv)
    for name in ("pretrained", "initial_checkpoint"):  # a bundled model's name: its checkpoint
        value = getattr(args, name)
        if value in bundled_names() and not Path(value).exists():
            setattr(args, name, str(model_file(value, checkpoint=True)))
    if not args.checkpoint_dir:
        args.checkpoint_dir = str(Path("runs") / args.dataset)
    if not args.log_file:
        args.log_file = str(Path(args.checkpoint_dir) / "log.csv")
    if not args.taxonomy:
        beside = Path(args.train_txt).resolve().parent / "classes.txt"
        args.taxonomy = str(beside) if beside.is_file() else "seed5"
    if args.source_weights is not None and args.source_weights.lower() == "none":
        args.source_weights = None
    elif not args.source_weights:
        beside = Path(args.train_txt).resolve().parent / "source_weights.yaml"
        args.source_weights = str(beside) if beside.is_file() else None
    for name in ("batch_size", "num_epochs", "image_size", "accum_steps"):
        if getattr(args, name) < 1:
            parser.error(f"--{name} must be at least 1")
    for name in ("workers", "save_every_steps"):
        if getattr(args, name) < 0:
            parser.error(f"--{name} must not be negative")
    # Persistent workers need workers; with none there is nothing to keep alive.
    args.persistent_workers = args.workers > 0 and args.persistent_workers is not False
    args.heads = ",".join(h.strip() for h in str(args.heads).split(",") if h.strip())
    if args.mixup < 0 or args.cutmix < 0 or not 0 < args.mix_prob <= 1:
        parser.error("--mixup and --cutmix must not be negative, --mix_prob must be in (0, 1]")
    if not 0 < args.distill_weight <= 1:
        parser.error("--distill_weight must be in (0, 1]")
    if not 0 <= args.model_ema_decay < 1:
        parser.error("--model_ema_decay must be in [0, 1) (0: no weight averaging)")
    if not 0 < args.abstain_coverage <= 1:
        parser.error("--abstain_coverage must be in (0, 1]")
    return args


def add_soft_label_arguments(p: argparse.ArgumentParser) -> None:
    """``race-classifier soft-labels`` (training/distill.py): teachers' probabilities for ``train --soft_labels``."""
    p.add_argument("--model_path", required=True, nargs="+", help="the teacher model(s): their calibrated "
                   "probabilities are averaged (any file `predict` loads: checkpoint, ONNX, ...)")
    p.add_argument("--train_txt", required=True, help="the training manifest whose images get soft labels")
    p.add_argument("--out", required=True, help="the .npz file to write (train --soft_labels reads it)")
    p.add_argument("--taxonomy", help="the classes the student is trained in (default: the first teacher's); "
                   "teachers in finer classes are summed into them as evaluation does")
    p.add_argument("--source_taxonomy", help="taxonomy of the manifest's labels, when not --taxonomy")
    p.add_argument("--tta", action="store_true", help="each teacher also sees the mirror image (the mean of both)")
    p.add_argument("--batch_size", type=int, default=64, help="images per teacher call")
    p.add_argument("--workers", type=int, default=2, help="image-loading processes")
    p.add_argument("--device", default="cpu", help="cpu, cuda, cuda:1, ... (PyTorch teachers; ONNX runs on the CPU)")
    add_amp_argument(p)
