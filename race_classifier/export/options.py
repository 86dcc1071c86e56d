"""``race-classifier export``'s flags and defaults: argparse and constants only, so that ``race-classifier --help``
never imports torch (the command's work: cli.py, exporter.py)."""
from __future__ import annotations

import argparse

DEFAULT_OPSET = 17
FP32_TOLERANCE = 1e-4  # largest |p_onnx - p_torch| an fp32 export may show on any image and class
CALIBRATION_METHODS = ("percentile", "minmax", "entropy")  # int8 activation-range calibration (quantize.py)
DEFAULT_CALIBRATION = "percentile"


def add_arguments(p: argparse.ArgumentParser) -> argparse.ArgumentParser:
    p.add_argument("--model_path", required=True, help="a race-classifier checkpoint (best.pt)")
    p.add_argument("--output", required=True, help="the .onnx file to write (int8 with --quantize int8)")
    p.add_argument("--opset", type=int, default=DEFAULT_OPSET, help="ONNX opset (default %(default)s)")
    p.add_argument("--quantize", choices=["int8"], help="int8: static QDQ with --calib_txt, else dynamic")
    p.add_argument("--calib_txt", help="manifest whose images calibrate static int8 (e.g. train.txt)")
    p.add_argument("--calib_images", type=int, default=256, help="calibration images drawn from --calib_txt "
                   "(default %(default)s)")
    p.add_argument("--calib_method", choices=CALIBRATION_METHODS, default=DEFAULT_CALIBRATION,
                   help="activation range calibration (default %(default)s)")
    p.add_argument("--val_txt", help="labelled images: parity and fp32 / int8 accuracy are measured on them")
    p.add_argument("--source_taxonomy", help="taxonomy of the manifests' labels when it is not the model's (e.g. "
                   "the classes a merge-classes model was trained in: mapped as its outputs are)")
    p.add_argument("--max_val_images", type=int, help="use a seeded random subset of this many --val_txt images")
    p.add_argument("--max_accuracy_drop", type=float, default=1.0,
                   help="refuse an int8 model losing more accuracy points than this on --val_txt (default %(default)s)")
    p.add_argument("--fp32_output", help="with --quantize, also write the verified fp32 model here")
    p.add_argument("--report_json", help="also write the parity/accuracy report here")
    p.add_argument("--batch_size", type=int, default=64, help="images per model call while checking parity and "
                   "accuracy on --val_txt (default %(default)s)")
    p.add_argument("--workers", type=int, default=0, help="image-loading processes (default %(default)s)")
    return p
