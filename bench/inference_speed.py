#!/usr/bin/env python
"""Inference speed: PyTorch eager vs ONNX Runtime fp32 vs ONNX Runtime int8, same model, images, threads.

    python bench/inference_speed.py [--model_path best.pt] [--threads 1] [--runs 200] [--json out.json]

Batch-1 latency (median and p95 over --runs calls after a warm-up) and batch-64 throughput. The three
backends are timed interleaved (one call each, in turn), so a background job slows them alike.
torch.set_num_threads(t) and ONNX Runtime's intra_op_num_threads=t, inter_op_num_threads=1.

Model: --model_path, or by default a torchvision MobileNetV2 at 112 px with ImageNet weights from
../shared/weights and a fresh, untrained 5-class head: its accuracy is meaningless, which does not
matter for speed. The ONNX files come from ``race-classifier export`` (int8: static QDQ, per channel,
calibrated on --calib_images images). Images: FairFace JPEGs from ../shared when present, else random.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from race_classifier.data.dataset import preprocessed_batches
from race_classifier.data.manifest import Sample
from race_classifier.data.transforms import Preprocessing
from race_classifier.export.exporter import export_checkpoint
from race_classifier.labels import get_taxonomy
from race_classifier.models.checkpoint import load_model, save_checkpoint
from race_classifier.models.factory import create_model
from race_classifier.models.loaders import load_predictor

SHARED = Path(__file__).resolve().parents[1].parent / "shared"
FAIRFACE = SHARED / "data" / "fairface" / "train"
WEIGHTS = SHARED / "weights" / "mobilenet_v2-b0353104.pth"


def default_checkpoint(workdir: Path, image_size: int) -> tuple[Path, str]:
    torch.manual_seed(0)
    pretrained = str(WEIGHTS) if WEIGHTS.is_file() else None
    model = create_model("torchvision:mobilenet_v2", 5, pretrained=pretrained)
    path = workdir / "mobilenet_v2.pt"
    save_checkpoint(path, model=model, arch="torchvision:mobilenet_v2", taxonomy=get_taxonomy("seed5"),
                    preprocessing=Preprocessing(image_size=image_size), train_args={}, epoch=0, metrics={}, history=[])
    weights = "ImageNet weights from ../shared" if pretrained else "random weights (no ../shared)"
    return path, (f"MobileNetV2 {image_size} px, {weights}, fresh untrained 5-class head "
                  "(accuracy irrelevant for speed)")


def bench_images(n: int, workdir: Path) -> tuple[list[Sample], str]:
    if FAIRFACE.is_dir():
        return [Sample(str(FAIRFACE / f"{i}.jpg"), 0) for i in range(1, n + 1)], "FairFace JPEGs (../shared)"
    from PIL import Image
    rng = np.random.default_rng(0)
    samples = []
    for i in range(n):
        path = workdir / f"random_{i}.png"
        Image.fromarray(rng.integers(0, 256, (224, 224, 3), dtype=np.uint8)).save(path)
        samples.append(Sample(str(path), 0))
    return samples, "random-noise images (no ../shared)"


def ort_session(path: Path, threads: int):
    import onnxruntime as ort
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    name = session.get_inputs()[0].name
    return lambda x: session.run(None, {name: x.numpy()})[0]


def eager_runner(model: torch.nn.Module):
    def run(x):
        with torch.inference_mode():
            return model(x)
    return run


def timed_interleaved(runners: dict, inputs: list[torch.Tensor], runs: int, warmup: int,
                      block: int = 25) -> dict[str, np.ndarray]:
    """Seconds per call of each runner. Runners take turns in blocks of ``block`` calls, so load drifts
    hit all alike while each block runs with warm caches (alternating every call would charge each
    backend for the cache misses the others cause)."""
    times = {name: [] for name in runners}
    for start in range(0, warmup + runs, block):
        for name, run in runners.items():
            for i in range(start, min(start + block, warmup + runs)):
                x = inputs[i % len(inputs)]
                began = time.perf_counter()
                run(x)
                if i >= warmup:
                    times[name].append(time.perf_counter() - began)
    return {name: np.array(t) for name, t in times.items()}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model_path", help="a race-classifier checkpoint (default: MobileNetV2 112 px, see above)")
    p.add_argument("--image_size", type=int, default=112, help="for the default model")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--runs", type=int, default=200, help="timed batch-1 calls per backend")
    p.add_argument("--warmup", type=int, default=20)
    p.add_argument("--batch_size", type=int, default=64)
    p.add_argument("--batch_runs", type=int, default=10, help="timed batch calls per backend")
    p.add_argument("--calib_images", type=int, default=128)
    p.add_argument("--json", help="also write the results here")
    args = p.parse_args(argv)

    torch.set_num_threads(args.threads)
    load_before = os.getloadavg()[0]
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        if args.model_path:
            ckpt, model_desc = Path(args.model_path), f"checkpoint {args.model_path}"
        else:
            ckpt, model_desc = default_checkpoint(tmp, args.image_size)
        samples, images_desc = bench_images(args.batch_size + args.calib_images, tmp)
        # The deployment path itself: export (verified against PyTorch), static int8 QDQ per channel.
        report = export_checkpoint(ckpt, tmp / "int8.onnx", quantize="int8", fp32_output=tmp / "fp32.onnx",
                                   calib_samples=samples[args.batch_size:], calib_images=args.calib_images)
        loaded = load_model(ckpt)
        eager = loaded.model.eval()
        images = next(preprocessed_batches(samples[:args.batch_size], loaded.preprocessing, args.batch_size))[0]
        bf16 = load_predictor(ckpt, amp="bf16").run  # predict/evaluate --amp bf16: autocast, channels_last
        runners = {"PyTorch eager": eager_runner(eager),
                   "PyTorch bf16 autocast": bf16,
                   "ONNX Runtime fp32": ort_session(tmp / "fp32.onnx", args.threads),
                   "ONNX Runtime int8": ort_session(tmp / "int8.onnx", args.threads)}
        singles = [images[i:i + 1].contiguous() for i in range(len(images))]
        latency = timed_interleaved(runners, singles, args.runs, args.warmup)
        batch = timed_interleaved(runners, [images], args.batch_runs, 2)
    load_after = os.getloadavg()[0]

    rows = {name: {"batch1_median_ms": 1000 * float(np.median(latency[name])),
                   "batch1_p95_ms": 1000 * float(np.percentile(latency[name], 95)),
                   f"batch{len(images)}_images_per_s": len(images) / float(np.median(batch[name]))}
            for name in runners}
    fp32, int8, torch_row = rows["ONNX Runtime fp32"], rows["ONNX Runtime int8"], rows["PyTorch eager"]
    ratios = {"ort_fp32_vs_eager_batch1": torch_row["batch1_median_ms"] / fp32["batch1_median_ms"],
              "int8_vs_fp32_batch1": fp32["batch1_median_ms"] / int8["batch1_median_ms"],
              "ort_fp32_vs_eager_batch": fp32[f"batch{len(images)}_images_per_s"] / torch_row[f"batch{len(images)}_images_per_s"],
              "int8_vs_fp32_batch": int8[f"batch{len(images)}_images_per_s"] / fp32[f"batch{len(images)}_images_per_s"],
              "bf16_vs_eager_batch1": torch_row["batch1_median_ms"] / rows["PyTorch bf16 autocast"]["batch1_median_ms"],
              "bf16_vs_eager_batch": (rows["PyTorch bf16 autocast"][f"batch{len(images)}_images_per_s"]
                                      / torch_row[f"batch{len(images)}_images_per_s"])}

    print(f"model: {model_desc}\nimages: {images_desc}; {args.threads} thread(s); torch {torch.__version__}; "
          f"load average {load_before:.2f} before, {load_after:.2f} after (2+ means another job shared the CPUs)")
    print(f"int8: {report.quantization['mode']} {report.quantization.get('format', '')}, "
          f"{report.quantization.get('calibration', '')} calibration on {report.quantization.get('calibration_images', 0)} images; "
          f"top-1 agreement with fp32 {100 * report.int8_vs_fp32.top1_agreement:.1f}% on {report.n_images} {report.images}; "
          f"fp32 max |p - p_torch| {report.fp32.max_abs_diff:.1e}\n")
    key = f"batch{len(images)}_images_per_s"
    print(f"| backend | batch-1 median ms | batch-1 p95 ms | batch-{len(images)} images/s |\n| --- | ---: | ---: | ---: |")
    for name, r in rows.items():
        print(f"| {name} | {r['batch1_median_ms']:.2f} | {r['batch1_p95_ms']:.2f} | {r[key]:.0f} |")
    print(f"\nONNX Runtime fp32 / eager: {ratios['ort_fp32_vs_eager_batch1']:.2f}x at batch 1 (target >= 3x), "
          f"{ratios['ort_fp32_vs_eager_batch']:.2f}x at batch {len(images)}")
    print(f"int8 / fp32:               {ratios['int8_vs_fp32_batch1']:.2f}x at batch 1 (target >= 2x), "
          f"{ratios['int8_vs_fp32_batch']:.2f}x at batch {len(images)}")
    print(f"PyTorch bf16 / eager:      {ratios['bf16_vs_eager_batch1']:.2f}x at batch 1, "
          f"{ratios['bf16_vs_eager_batch']:.2f}x at batch {len(images)} (CPUs without bf16 units: slower)")
    if args.json:
        Path(args.json).write_text(json.dumps({
            "model": model_desc, "images": images_desc, "threads": args.threads, "runs": args.runs,
            "load_average": [load_before, load_after], "results": rows, "ratios": ratios,
            "export": report.to_dict()}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
