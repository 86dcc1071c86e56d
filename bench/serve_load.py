#!/usr/bin/env python
"""Load test of the HTTP service: throughput, latency percentiles and errors under concurrent clients.

Starts ``race-classifier serve`` itself, as a separate process on 127.0.0.1 and a free port (so the clients
do not share its interpreter), waits for /healthz, then sends --requests POST /v1/predict of one photo from
--concurrency client threads (keep-alive connections), and stops the server. Bounded: at most --requests
requests and --max_seconds of sending. The photo is composed from four ../shared FairFace crops (640x480),
or, without ../shared, a synthetic one (no faces: detection only). Exits 1 on any error.

    python bench/serve_load.py [--model_path seed5] [--requests 2000] [--concurrency 8] [--json out.json]
"""
from __future__ import annotations

import argparse
import io
import json
import socket
import subprocess
import sys
import threading
import time
from collections import Counter
from pathlib import Path

import httpx
import numpy as np
from PIL import Image

from race_classifier.utils import add_hidden_aliases

FAIRFACE = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "fairface" / "train"


def test_photo() -> tuple[bytes, str]:
    if FAIRFACE.is_dir():
        from race_classifier.inference.compose import compose_photo
        photo, _ = compose_photo([Image.open(FAIRFACE / f"{5001 + i}.jpg") for i in range(4)], seed=0)
        kind = "640x480, 4 FairFace faces"
    else:
        photo = Image.fromarray(np.random.default_rng(0).integers(0, 255, (480, 640, 3), dtype=np.uint8))
        kind = "640x480 noise, no faces (../shared absent)"
    buf = io.BytesIO()
    photo.save(buf, "JPEG", quality=90)
    return buf.getvalue(), kind


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(args, port: int) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "race_classifier.cli", "serve", "--model_path", args.model_path, "--host", "127.0.0.1",
           "--port", str(port), "--workers", str(args.workers), "--queue", str(args.queue), "--log-level", "warning"]
    proc = subprocess.Popen(cmd)
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"the server exited with code {proc.returncode}")
        try:
            if httpx.get(f"http://127.0.0.1:{port}/healthz", timeout=1).status_code == 200:
                return proc
        except httpx.TransportError:
            pass
        time.sleep(0.2)
    proc.terminate()
    raise RuntimeError("the server did not answer /healthz within 120 s")


def load(url: str, photo: bytes, requests: int, concurrency: int, max_seconds: float) -> dict:
    latencies, statuses, errors, faces = [], Counter(), [], Counter()
    lock, sent = threading.Lock(), [0]
    deadline = time.monotonic() + max_seconds

    def client():
        with httpx.Client(base_url=url, timeout=60) as http:
            while time.monotonic() < deadline:
                with lock:
                    if sent[0] >= requests:
                        return
                    sent[0] += 1
                t = time.perf_counter()
                try:
                    r = http.post("/v1/predict", files={"image": ("photo.jpg", photo, "image/jpeg")})
                    status = r.status_code
                    n_faces = len(r.json().get("faces", [])) if status == 200 else None
                except httpx.HTTPError as e:
                    status, n_faces = type(e).__name__, None
                elapsed = time.perf_counter() - t
                with lock:
                    latencies.append(elapsed)
                    statuses[status] += 1
                    faces[n_faces] += 1
                    if status != 200 and len(errors) < 10:
                        errors.append(str(status))

    start = time.perf_counter()
    threads = [threading.Thread(target=client) for _ in range(concurrency)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    seconds = time.perf_counter() - start
    ms = np.array(latencies) * 1000
    return {"requests": len(latencies), "seconds": round(seconds, 2),
            "throughput_rps": round(len(latencies) / seconds, 2),
            "p50_ms": round(float(np.percentile(ms, 50)), 1), "p95_ms": round(float(np.percentile(ms, 95)), 1),
            "p99_ms": round(float(np.percentile(ms, 99)), 1), "max_ms": round(float(ms.max()), 1),
            "errors": sum(v for k, v in statuses.items() if k != 200),
            "statuses": {str(k): v for k, v in statuses.items()},
            "faces_per_response": {str(k): v for k, v in faces.items()}, "first_errors": errors}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model_path", default="seed5", help="a bundled model name or a model file (default seed5)")
    p.add_argument("--requests", type=int, default=2000)
    p.add_argument("--concurrency", type=int, default=8, help="client threads, one keep-alive connection each")
    p.add_argument("--workers", type=int, default=2, help="the server's inference workers")
    p.add_argument("--queue", type=int, default=16, help="the server's queue bound (>= concurrency - workers: no 503)")
    p.add_argument("--max_seconds", type=float, default=300, help="stop sending after this long")
    p.add_argument("--json", help="write the results here")
    add_hidden_aliases(p)
    args = p.parse_args(argv)

    photo, kind = test_photo()
    port = free_port()
    server = start_server(args, port)
    try:
        result = load(f"http://127.0.0.1:{port}", photo, args.requests, args.concurrency, args.max_seconds)
    finally:
        server.terminate()
        server.wait(timeout=30)
    result.update(model=args.model_path, photo=kind, photo_bytes=len(photo), concurrency=args.concurrency,
                  workers=args.workers, queue=args.queue)

    print(f"POST /v1/predict, {kind} ({len(photo)} bytes); {args.concurrency} clients, "
          f"server: {args.workers} workers, queue {args.queue}; model {args.model_path}")
    print(f"{'requests':>8} {'seconds':>8} {'req/s':>7} {'p50 ms':>7} {'p95 ms':>7} {'p99 ms':>7} {'max ms':>7} {'errors':>6}")
    print(f"{result['requests']:>8} {result['seconds']:>8} {result['throughput_rps']:>7} {result['p50_ms']:>7} "
          f"{result['p95_ms']:>7} {result['p99_ms']:>7} {result['max_ms']:>7} {result['errors']:>6}")
    print(f"statuses {result['statuses']}; faces per response {result['faces_per_response']}")
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2))
    if result["requests"] < args.requests:
        print(f"stopped after --max_seconds {args.max_seconds:g}: {result['requests']} of {args.requests} requests")
    return 1 if result["errors"] else 0


if __name__ == "__main__":
    sys.exit(main())
