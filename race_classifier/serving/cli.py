"""``race-classifier serve``: the HTTP service and its web page (FastAPI + uvicorn).

    race-classifier serve                      # the bundled seed5 model on http://127.0.0.1:8000/
    race-classifier serve --model_path model.onnx --host 127.0.0.1 --port 8000 [--workers 2] [--abstain]
    race-classifier serve --model_path best.pt --device cuda --amp fp16 [--tta]

Open http://127.0.0.1:8000/ for the page, /docs for the API (offline), /openapi.json for its schema.
"""
from __future__ import annotations

import argparse
import logging
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager

from race_classifier.inference.cli import add_metadata_arguments, add_runtime_arguments
from race_classifier.serving.limits import MB

log = logging.getLogger("race_classifier.serve")


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


def build_app(args):
    from race_classifier.inference.classifier import Classifier
    from race_classifier.serving.app import create_app
    from race_classifier.serving.limits import Limits
    limits = Limits(max_bytes=args.max_bytes, max_pixels=args.max_pixels, max_batch=args.max_batch,
                    workers=args.workers, queue=args.queue)
    classifier = Classifier.load(args.model_path, labels=args.labels, image_size=args.image_size, mean=args.mean,
                                 std=args.std, device=args.device, tta=args.tta, amp=args.amp,
                                 detect=not args.no_detect, min_face=args.min_face,
                                 min_confidence=args.min_confidence, abstain=args.abstain,
                                 detect_size=args.detect_size)
    return create_app(classifier, limits), limits


def run(args) -> int:
    import torch
    import uvicorn
    torch.set_num_threads(max(1, args.threads))
    app, limits = build_app(args)
    log.info("serving %s on http://%s:%d/ (%d workers, queue %d)", args.model_path or "seed5", args.host, args.port,
             limits.workers, limits.queue)
    # uvicorn's own bound sits above the app's (which answers 503 in JSON): it caps open connections, so
    # that uploads being read cannot pile up in memory without limit.
    uvicorn.run(app, host=args.host, port=args.port, log_level=args.log_level,
                limit_concurrency=limits.workers + limits.queue + 16, timeout_keep_alive=5)
    return 0


@contextmanager
def serve_in_thread(app, host: str = "127.0.0.1", port: int = 0, **config) -> Iterator[str]:
    """Run ``app`` under uvicorn in a background thread (tests, benchmarks); yields its base URL.
    Port 0 lets the OS pick a free port, read back once the server is listening: no race for it."""
    import uvicorn
    server = uvicorn.Server(uvicorn.Config(app, host=host, port=port, log_level="warning", **config))
    thread = threading.Thread(target=server.run, name="rc-uvicorn", daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started:
        if not thread.is_alive() or time.monotonic() > deadline:
            raise RuntimeError("the HTTP server did not start")
        time.sleep(0.05)
    bound = server.servers[0].sockets[0].getsockname()
    try:
        yield f"http://{host}:{bound[1]}"
    finally:
        server.should_exit = True
        thread.join(timeout=30)
