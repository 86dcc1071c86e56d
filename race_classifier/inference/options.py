"""``race-classifier predict`` flags, and the runtime and metadata flags that ``serve`` shares: argparse only,
so that ``race-classifier --help`` never imports torch (the command's work: cli.py)."""
from __future__ import annotations

import argparse

from race_classifier.utils import add_amp_argument

EXIT_STATUS = ("exit status: 0 every input was read (images without a face included); 1 some inputs could not "
               "be read (missing, not an image), the others were classified; 3 no input could be read; 2 bad "
               "usage (unknown flag, bad value, no input, unreadable model). With 1 and 3 the output is still "
               "written, with an error row for each input that failed.")


def add_arguments(p: argparse.ArgumentParser) -> argparse.ArgumentParser:
    p.add_argument("inputs", nargs="*", metavar="PATH",
                   help="images, folders (searched recursively), lists of paths (.txt, one a line), or - to "
                        "read the list from standard input")
    p.add_argument("--model_path", help="a bundled model (seed5, the default, or fairface7), or a checkpoint, "
                   "exported ONNX, FairFace ResNet-34 or TorchScript file")
    p.add_argument("--output", help="out.csv or out.json (default: CSV on standard output)")
    p.add_argument("--no_detect", action="store_true", help="inputs are face crops already: classify each whole")
    p.add_argument("--min_face", type=int, default=32, help="ignore faces smaller than this (pixels, shorter side)")
    p.add_argument("--min_confidence", type=float, help="label faces below this confidence 'uncertain'")
    p.add_argument("--abstain", action="store_true", help="label faces below the model's stored abstention "
                   "threshold 'uncertain' (fitted on validation data; --min_confidence, if given, wins)")
    p.add_argument("--batch_size", type=int, default=32, help="face crops per model call, across images")
    p.add_argument("--detect_size", type=int, default=480,
                   help="longer side photos are shrunk to for detection (crops come from the full image)")
    p.add_argument("--detect_threshold", type=float, default=0.5, help="detector score threshold")
    g = p.add_argument_group("video")
    g.add_argument("--video", help="a video file, or a camera index (0, 1, ...)")
    g.add_argument("--every", type=int, default=1, help="classify every N-th frame")
    g.add_argument("--annotate", help="write an annotated copy, a box and label per face: of the video (.mp4 or "
                   ".avi), of the one photo (.jpg or .png), or of each photo into this folder")
    g.add_argument("--max_frames", type=int, help="stop after this many frames (e.g. for a camera)")
    add_metadata_arguments(p)
    add_runtime_arguments(p)
    p.add_argument("--threads", type=int, default=1,
                   help="CPU threads for the classifier (default 1: on a machine shared with other work more threads "
                        "can be slower, docs/inference.md; raise it on a dedicated machine)")
    p.epilog = EXIT_STATUS
    return p


def add_runtime_arguments(p: argparse.ArgumentParser) -> None:
    """How the model runs; predict and serve."""
    p.add_argument("--tta", action="store_true", help="test-time augmentation: average each face's probabilities "
                   "with its horizontal mirror's (two model passes per face)")
    p.add_argument("--device", default="cpu", help="cpu, cuda, cuda:1, ... (PyTorch models; ONNX runs on the CPU)")
    add_amp_argument(p)


def add_metadata_arguments(p: argparse.ArgumentParser) -> None:
    """What a model file without metadata (TorchScript, foreign ONNX) cannot say itself; predict and serve."""
    g = p.add_argument_group("model files without metadata (TorchScript, foreign ONNX)")
    g.add_argument("--labels", help="class order: a taxonomy name, a class file or 'A,B,...'")
    g.add_argument("--image_size", type=int, help="input size in pixels (default 224)")
    g.add_argument("--mean", type=float, nargs=3, help="normalisation mean, RGB (default ImageNet's)")
    g.add_argument("--std", type=float, nargs=3, help="normalisation std, RGB (default ImageNet's)")
