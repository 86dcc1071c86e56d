"""``race-classifier prepare``'s flags: argparse and constants only, so that ``race-classifier --help`` never
imports torch (the command's work: prepare.py)."""
from __future__ import annotations

import argparse
import os

from race_classifier.data.sources import FAIRFACE_VAL_CSV
from race_classifier.labels import DEFAULT_TAXONOMY

KINDS = ("folder", "fairface", "utkface", "mix")
IMAGES_PER_SHARD = 2048  # ~400 MB a shard at 258 px (224 px training); small enough to copy, few enough to list


def add_prepare_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("kind", choices=KINDS, help="folder: root/<race>/<identity>/<image>; "
                        "fairface: FairFace's label CSV or its folder; utkface: a folder of UTKFace images; "
                        "mix: a YAML config of several sources (see race_classifier/data/mix.py)")
    parser.add_argument("source", metavar="SOURCE", help="the folder tree, CSV, folder or mix config to read")
    parser.add_argument("--out", required=True, help="folder to write train.txt, val.txt and classes.txt to")
    parser.add_argument("--taxonomy", default=DEFAULT_TAXONOMY,
                        help="target taxonomy: a built-in name, a class file, or a comma-separated list "
                        f"(default {DEFAULT_TAXONOMY})")
    parser.add_argument("--source_taxonomy", default=None,
                        help="folder only: the taxonomy the folder names are in (default: the target taxonomy)")
    parser.add_argument("--label_map", default=None,
                        help="YAML of source class: target class (null drops the class)")
    parser.add_argument("--val_fraction", type=float, default=0.1,
                        help="share of identities held out for validation, in (0, 0.5] (default 0.1); held "
                        "out as one of round(1/F) stratified folds, so 0.4 holds out 1/2 (warned)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the train/val split (default 0)")
    parser.add_argument("--val_csv", default=None,
                        help="fairface only: a label CSV to use as the validation set instead of a random "
                        f"split (default: {FAIRFACE_VAL_CSV} when SOURCE is a folder holding one)")
    parser.add_argument("--shards", default=None, metavar="SIZES",
                        help="also store the images pre-resized for training at these image sizes (e.g. 224 or "
                        "112,224) as memory-mapped uint8 shards in OUT/shards/<size>/, which training reads")
    parser.add_argument("--images_per_shard", type=int, default=IMAGES_PER_SHARD,
                        help=f"images in each --shards file (default {IMAGES_PER_SHARD})")
    parser.add_argument("--workers", type=int, default=min(4, os.cpu_count() or 1),
                        help="processes decoding images for --shards")
