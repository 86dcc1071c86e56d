#!/usr/bin/env python
"""Inference speed on photos with faces: detector alone, end-to-end latency per photo, throughput in batches.

Photos are composed from ../shared FairFace crops (4 faces each, 100-200 px, rotated up to 10 degrees, on a
640x480 noisy background), so detection recall is measured too. In one run, on the same photos:

* detector only (RetinaFace-MobileNet0.25 at the default detection size, and at --detect_sizes);
* end to end per photo, one photo at a time (detect + align + classify): median and p95 latency;
* throughput: all photos through ``Classifier.predict_batch`` with crops batched by --batch_size.

Speeds are also given as ratios within the run (detection's share of the end-to-end time; batched vs
one-at-a-time throughput): machines here are shared and noisy. ``--detectors retinaface,mtcnn`` adds
facenet-pytorch's MTCNN for comparison when it is importable (install it with --no-deps).

    python bench/predict_latency.py [--model_path seed5] [--photos 20] [--json out.json]
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
from PIL import Image

from race_classifier.inference.classifier import Classifier
from race_classifier.inference.compose import compose_photo
from race_classifier.inference.detector import FaceDetector
from race_classifier.utils import add_hidden_aliases

FAIRFACE = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "fairface" / "train"


def photos(n: int, first: int = 5001):
    out = []
    for k in range(n):
        crops = [Image.open(FAIRFACE / f"{first + 4 * k + i}.jpg") for i in range(4)]
        out.append(compose_photo(crops, seed=k))
    return out


def timed(fn, items, warmup: int = 2) -> tuple[list[float], list]:
    for item in items[:warmup]:
        fn(item)
    times, results = [], []
    for item in items:
        t = time.perf_counter()
        results.append(fn(item))
        times.append(time.perf_counter() - t)
    return times, results


def recall(found_boxes: list[list], placed) -> float:
    hit = total = 0
    for boxes, (_, placements) in zip(found_boxes, placed):
        for p in placements:
            hit += any(abs((b[0] + b[2]) / 2 - p.centre[0]) < 0.25 * p.side
                       and abs((b[1] + b[3]) / 2 - p.centre[1]) < 0.25 * p.side for b in boxes)
            total += 1
    return hit / total


def mtcnn_detect():
    """facenet-pytorch's MTCNN as a detect(image) -> boxes function, or None when not installed."""
    try:
        import types
        for name in ("requests", "requests.adapters"):  # imported by facenet_pytorch for downloads we never do
            if name not in sys.modules:
                try:
                    __import__(name)
                except ImportError:
                    stub = types.ModuleType(name)
                    stub.HTTPAdapter, stub.adapters = object, stub
                    sys.modules[name] = stub
        from facenet_pytorch import MTCNN
    except ImportError:
        return None
    mtcnn = MTCNN(keep_all=True, device="cpu")

    def detect(image):
        boxes, _, _ = mtcnn.detect(image, landmarks=True)
        return [] if boxes is None else [list(b) for b in boxes]
    return detect


def row(name: str, times: list[float], **extra) -> dict:
    ms = 1000 * np.asarray(times)
    return {"what": name, "median_ms": float(np.median(ms)), "p95_ms": float(np.percentile(ms, 95)), **extra}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model_path", default="seed5", help="a bundled model name or a model file (default seed5)")
    ap.add_argument("--photos", type=int, default=20)
    ap.add_argument("--batch_size", type=int, default=32)
    ap.add_argument("--detect_sizes", default="480,640", help="detection sizes to time (longer side)")
    ap.add_argument("--detectors", default="retinaface", help="retinaface[,mtcnn]")
    ap.add_argument("--threads", type=int, default=1, help="torch threads (as predict's --threads; 0: torch's)")
    ap.add_argument("--json")
    add_hidden_aliases(ap)
    args = ap.parse_args(argv)
    if not FAIRFACE.is_dir():
        print(f"needs FairFace crops at {FAIRFACE} to compose photos with faces", file=sys.stderr)
        return 2
    if args.threads:
        import torch
        torch.set_num_threads(args.threads)
    placed = photos(args.photos)
    images = [np.asarray(p) for p, _ in placed]
    rows = []
    for size in [int(s) for s in args.detect_sizes.split(",")]:
        det = FaceDetector(max_side=size)
        t, faces = timed(det.detect, images)
        rows.append(row(f"detector retinaface @{size}", t, recall=recall([[f.box for f in fs] for fs in faces], placed)))
    if "mtcnn" in args.detectors:
        detect = mtcnn_detect()
        if detect is None:
            print("MTCNN skipped: facenet_pytorch not importable (pip install --no-deps facenet-pytorch)",
                  file=sys.stderr)
        else:
            t, boxes = timed(detect, [p for p, _ in placed])
            rows.append(row("detector mtcnn (facenet-pytorch)", t, recall=recall(boxes, placed)))
    clf = Classifier.load(args.model_path, batch_size=args.batch_size)
    t_det, _ = timed(clf.detector.detect, images)
    t_e2e, results = timed(lambda im: clf.predict(im, channels="RGB"), images)
    share = float(np.median(t_det) / np.median(t_e2e))
    rows.append(row("end to end, 1 photo at a time", t_e2e, photos_per_s=len(images) / sum(t_e2e),
                    detection_share=share))
    started = time.perf_counter()
    batched = clf.predict_batch(images, channels="RGB")
    elapsed = time.perf_counter() - started
    faces = sum(len(r.faces) for r in batched)
    rows.append({"what": f"end to end, batch {args.batch_size}", "photos_per_s": len(images) / elapsed,
                 "faces_per_s": faces / elapsed, "speedup_vs_one_at_a_time": (len(images) / elapsed) /
                 (len(images) / sum(t_e2e))})
    print(f"{len(images)} photos of 640x480, 4 FairFace faces each; model {args.model_path} "
          f"({clf.predictor.preprocessing.image_size} px); {faces} faces classified")
    print(f"{'':36s} {'median ms':>10s} {'p95 ms':>8s} {'recall':>7s} {'photos/s':>9s}  ratio")
    for r in rows:
        ratio = (f"detection {100 * r['detection_share']:.0f}% of total" if "detection_share" in r else
                 f"{r['speedup_vs_one_at_a_time']:.2f}x one-at-a-time" if "speedup_vs_one_at_a_time" in r else "")
        cell = lambda key, width, scale=1.0, unit="": (f"{scale * r[key]:.1f}{unit}" if key in r else "-").rjust(width)  # noqa: E731
        print(f"{r['what']:36s} {cell('median_ms', 10)} {cell('p95_ms', 8)} {cell('recall', 7, 100, '%')} "
              f"{cell('photos_per_s', 9)}  {ratio}")
    if args.json:
        Path(args.json).write_text(json.dumps({"photos": len(images), "faces": faces, "rows": rows}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
