"""``race-classifier serve``'s flags: argparse only, so that ``race-classifier --help`` never imports torch (the
command's work: cli.py)."""
from __future__ import annotations

import argparse

from race_classifier.inference.options import (
    add_metadata_arguments,
    add_runtime_arguments,
)
from race_classifier.serving.limits import MB


def add_arguments(p: argparse.ArgumentParser) -> argparse.ArgumentParser:
    p.add_argument("--model_path", help="a bundled model (seed5, the default, or fairface7), or a checkpoint, "
                   "exported ONNX, FairFace ResNet-34 or TorchScript file")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default: this machine only)")
    p.add_argument("--port", type=int, default=8000, help="TCP port to listen on (0: any free port)")
    p.add_argument("--workers", type=int, default=2, help="inferences run at once (threads in one process)")
    p.add_argument("--queue", type=int, default=16, help="requests that may wait for a worker; more get 503")
    p.add_argument("--max_bytes", type=int, default=10 * MB, help="largest upload of one image, bytes (413)")
    p.add_argument("--max_pixels", type=int, default=40_000_000, help="largest image, width x height (413)")
    p.add_argument("--max_batch", type=int, default=16, help="most images in one /v1/predict/batch request")
    p.add_argument("--no_detect", action="store_true", help="uploads are face crops already: classify each whole")
    p.add_argument("--min_face", type=int, default=32, help="ignore faces smaller than this (pixels, shorter side)")
    p.add_argument("--min_confidence", type=float, help="label faces below this confidence 'uncertain'")
    p.add_argument("--abstain", action="store_true", help="by default label faces below the model's stored "
                   "abstention threshold 'uncertain' (a request's ?abstain=0/1 overrides)")
    p.add_argument("--detect_size", type=int, default=480, help="longer side photos are shrunk to for detection")
    add_metadata_arguments(p)
    add_runtime_arguments(p)
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads per inference (see predict --help)")
    p.add_argument("--log_level", default="info", help="uvicorn's log level")
    return p
