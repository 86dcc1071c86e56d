"""``race-classifier serve``: the HTTP service and its web page (FastAPI + uvicorn).

    race-classifier serve                      # the bundled seed5 model on http://127.0.0.1:8000/
    race-classifier serve --model_path model.onnx --host 127.0.0.1 --port 8000 [--workers 2] [--abstain]
    race-classifier serve --model_path best.pt --device cuda --amp fp16 [--tta]

Open http://127.0.0.1:8000/ for the page, /docs for the API (offline), /openapi.json for its schema.
"""
from __future__ import annotations

import logging
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager

import torch
import uvicorn

from race_classifier.inference.classifier import Classifier
from race_classifier.serving.app import create_app
from race_classifier.serving.limits import Limits

log = logging.getLogger("race_classifier.serve")


def build_app(args):
    limits = Limits(max_bytes=args.max_bytes, max_pixels=args.max_pixels, max_batch=args.max_batch,
                    workers=args.workers, queue=args.queue)
    classifier = Classifier.load(args.model_path, labels=args.labels, image_size=args.image_size, mean=args.mean,
                                 std=args.std, device=args.device, tta=args.tta, amp=args.amp,
                                 detect=not args.no_detect, min_face=args.min_face,
                                 min_confidence=args.min_confidence, abstain=args.abstain,
                                 detect_size=args.detect_size)
    return create_app(classifier, limits), limits


def run(args) -> int:
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
