#!/usr/bin/env python
"""Training speed per configuration, and whether the input pipeline keeps up: one command for a GPU machine
(it also runs on a CPU at a small size).

For the default model (torchvision:mobilenet_v2, 224 px) it trains a fresh model per configuration on the same
images, with the training run's augmentation, loss, AdamW and DataLoader (workers, pinned memory, persistent
workers), and measures separately, per batch:

  data wait   time blocked on the loader's next batch (what the model waits for the input pipeline)
  step        host-to-device copy + forward + backward + optimizer step (torch.cuda.synchronize on a GPU)

Configurations: fp32; AMP (bf16, or fp16 where bf16 is missing); AMP + channels_last; + torch.compile (left
out, said why, where it cannot run); that last one reading prepared uint8 shards (``prepare --shards``'s
format) instead of decoding JPEGs. Ratios are against the fp32 row of the same run: machines are shared.

    python bench/gpu_train_speed.py [--images 4096] [--batch_size 64] [--workers 8] [--max_seconds 240] [--json out.json]
    nice python bench/gpu_train_speed.py --images 256 --image_size 64 --batch_size 32 --steps 4   # a CPU check

Images: the first --images FairFace training JPEGs in ../shared/data/fairface, else synthetic 224 px PNGs
(printed in the header; say so in any report). --max_seconds bounds the whole run (shard building and each
row's timed steps share it; a row stops early once its share is spent, after --min_steps; torch.compile's
first step cannot be cut short).
"""
from __future__ import annotations

import argparse
import csv
import json
import os
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from timm.optim import create_optimizer_v2
from torch.utils.data import DataLoader

from race_classifier.data.cache import ImageCache, cache_size_for
from race_classifier.data.dataset import FaceDataset, collate_skipping_failures
from race_classifier.data.manifest import Sample
from race_classifier.data.synthetic import PATTERNS, generate
from race_classifier.data.transforms import Augmentation, Preprocessing, build_transform
from race_classifier.models.factory import create_model
from race_classifier.training.engine import MultiHeadLoss, autocast
from race_classifier.device import resolve_device, resolve_precision
from race_classifier.training.accel import compile_unavailable

FAIRFACE_DIR = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "fairface"
KEEPS_UP = 0.10  # the input keeps up when the model waits for it at most this share of the time


@dataclass(frozen=True)
class Config:
    name: str
    amp: bool = False
    channels_last: bool = False
    compile: bool = False
    shards: bool = False


CONFIGS = (Config("fp32"), Config("amp", amp=True), Config("amp+cl", amp=True, channels_last=True),
           Config("amp+cl+compile", amp=True, channels_last=True, compile=True),
           Config("amp+cl+compile+shards", amp=True, channels_last=True, compile=True, shards=True))


def training_images(n: int, workdir: Path) -> tuple[list[Sample], int, str]:
    """(samples, number of classes, description of the images)."""
    if (FAIRFACE_DIR / "fairface_label_train.csv").is_file():
        with open(FAIRFACE_DIR / "fairface_label_train.csv", newline="") as f:
            rows = [r for _, r in zip(range(n), csv.DictReader(f))]
        classes = sorted({r["race"] for r in rows})
        samples = [Sample(str(FAIRFACE_DIR / r["file"]), classes.index(r["race"])) for r in rows]
        return samples, len(classes), f"FairFace training JPEGs from {FAIRFACE_DIR} (224 px)"
    root = generate(workdir / "synthetic", identities_per_class=n // len(PATTERNS) + 1, images_per_identity=1,
                    size=224)
    paths = sorted(root.rglob("*.png"))[:n]
    samples = [Sample(str(p), PATTERNS.index(p.parts[-3])) for p in paths]
    return samples, len(PATTERNS), f"synthetic 224 px PNGs (no {FAIRFACE_DIR})"


def endless(loader: DataLoader):
    while True:
        yield from loader


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def measure(config: Config, dataset: FaceDataset, num_classes: int, args, device: torch.device,
            seconds: float) -> dict:
    """Train ``config`` for --warmup untimed and up to --steps timed batches (stopping after ``seconds`` of
    timed steps, once --min_steps are done); mean data wait and step time per timed batch."""
    amp_dtype = resolve_precision("auto" if device.type == "cuda" else "bf16", device) if config.amp else None
    memory_format = torch.channels_last if config.channels_last else torch.contiguous_format
    model = create_model(args.arch, num_classes).to(device, memory_format=memory_format).train()
    train_model = torch.compile(model) if config.compile else model
    optimizer = create_optimizer_v2(model, "adamw", lr=1e-3, weight_decay=0.05)
    scaler = torch.amp.GradScaler(device.type, enabled=amp_dtype == torch.float16)
    criterion = MultiHeadLoss([slice(0, num_classes)], label_smoothing=0.1).to(device)
    loader = DataLoader(dataset, batch_size=args.batch_size, shuffle=True, num_workers=args.workers,
                        collate_fn=collate_skipping_failures, drop_last=True, pin_memory=device.type == "cuda",
                        persistent_workers=args.workers > 0, generator=torch.Generator().manual_seed(0))
    batches = endless(loader)
    waits, steps, images = [], [], 0
    started = warmup_s = None
    first = time.perf_counter()
    try:
        for i in range(args.warmup + args.steps):
            if i == args.warmup:
                started, warmup_s = time.perf_counter(), time.perf_counter() - first
            t0 = time.perf_counter()
            batch = next(batches)
            t1 = time.perf_counter()
            x = batch["images"].to(device, non_blocking=True, memory_format=memory_format)
            y = batch["targets"].to(device, non_blocking=True)
            with autocast(device, amp_dtype):
                loss = criterion(train_model(x), y)
            optimizer.zero_grad(set_to_none=True)
            scaler.scale(loss).backward()
            scaler.step(optimizer)
            scaler.update()
            synchronize(device)
            t2 = time.perf_counter()
            if i >= args.warmup:
                waits.append(t1 - t0)
                steps.append(t2 - t1)
                images += len(y)
                if len(steps) >= args.min_steps and time.perf_counter() - started > seconds:
                    break
    finally:
        batches.close()
        del loader  # its persistent workers go with it
    wall = sum(waits) + sum(steps)
    wait, step = sum(waits) / len(waits), sum(steps) / len(steps)
    return {"config": config.name, "amp": str(amp_dtype).replace("torch.", "") if amp_dtype else None,
            "channels_last": config.channels_last, "compile": config.compile,
            "input": "shards" if config.shards else "images", "timed_batches": len(steps),
            "warmup_s": round(warmup_s, 2), "images_per_s": images / wall,
            "data_wait_ms": 1000 * wait, "step_ms": 1000 * step, "data_share": wait / (wait + step),
            "model_images_per_s": args.batch_size / step, "keeps_up": wait / (wait + step) <= KEEPS_UP}


def chosen_configs(names: str | None, device: torch.device) -> tuple[list[Config], list[str]]:
    """The rows to run and notes on the ones left out."""
    configs, notes = list(CONFIGS), []
    if names:
        wanted = [n.strip() for n in names.split(",") if n.strip()]
        unknown = sorted(set(wanted) - {c.name for c in CONFIGS})
        if unknown:
            raise SystemExit(f"--configs: unknown {', '.join(unknown)} (choose from {', '.join(c.name for c in CONFIGS)})")
        configs = [c for c in CONFIGS if c.name in wanted]
    reason = compile_unavailable(device)
    if reason and any(c.compile for c in configs):
        notes.append(f"torch.compile rows left out: {reason}")
        # The shards row then measures the best configuration without compile.
        configs = [Config("amp+cl+shards", amp=True, channels_last=True, shards=True) if c.shards else c
                   for c in configs if c.shards or not c.compile]
    return configs, notes


def print_table(rows: list[dict], header: str, notes: list[str]) -> None:
    print(header)
    for note in notes:
        print(f"note: {note}")
    print(f"{'config':<24}{'img/s':>9}{'vs fp32':>9}{'data ms':>10}{'step ms':>10}{'data %':>8}"
          f"{'model img/s':>13}  input keeps up")
    for r in rows:
        if "error" in r:
            print(f"{r['config']:<24}  failed: {r['error']}")
            continue
        ratio = f"{r['ratio_vs_fp32']:.2f}x" if r.get("ratio_vs_fp32") else "-"
        print(f"{r['config']:<24}{r['images_per_s']:>9.1f}{ratio:>9}{r['data_wait_ms']:>10.1f}{r['step_ms']:>10.1f}"
              f"{100 * r['data_share']:>7.0f}%{r['model_images_per_s']:>13.1f}  "
              f"{'yes' if r['keeps_up'] else 'no: the model waits for the loader'}")
    print(f"data ms: mean wait for the next batch; step ms: copy + forward + backward + optimizer; model img/s: "
          f"batch / step (the speed with free input); keeps up: data wait <= {KEEPS_UP:.0%} of the time")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--images", type=int, default=4096, help="images to train on (cycled)")
    p.add_argument("--image_size", type=int, default=224)
    p.add_argument("--batch_size", type=int, default=64)
    p.add_argument("--workers", type=int, default=min(8, os.cpu_count() or 1), help="DataLoader workers")
    p.add_argument("--arch", default="torchvision:mobilenet_v2")
    p.add_argument("--device", default="auto")
    p.add_argument("--warmup", type=int, default=5, help="untimed batches per row (worker start, cuDNN tuning, compile)")
    p.add_argument("--steps", type=int, default=50, help="timed batches per row, at most")
    p.add_argument("--min_steps", type=int, default=3, help="timed batches per row, at least")
    p.add_argument("--max_seconds", type=float, default=240, help="budget for the whole run")
    p.add_argument("--configs", help=f"comma-separated subset of {', '.join(c.name for c in CONFIGS)}")
    p.add_argument("--json", help="also write the results here")
    args = p.parse_args(argv)
    for name in ("images", "image_size", "batch_size", "steps", "min_steps"):
        if getattr(args, name) < 1:
            p.error(f"--{name} must be at least 1")
    if args.images < args.batch_size:
        p.error("--images must be at least --batch_size (whole batches only)")
    if args.workers < 0 or args.warmup < 0:
        p.error("--workers and --warmup must not be negative")
    deadline = time.perf_counter() + args.max_seconds

    device = resolve_device(args.device)
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True  # as training does
    configs, notes = chosen_configs(args.configs, device)
    with tempfile.TemporaryDirectory() as tmp:
        samples, num_classes, source = training_images(args.images, Path(tmp))
        transform = build_transform(Preprocessing(image_size=args.image_size), True, Augmentation())
        shards, shard_s = None, 0.0
        if any(c.shards for c in configs):
            t0 = time.perf_counter()
            shards = ImageCache.build([s.path for s in samples], cache_size_for(args.image_size),
                                      Path(tmp) / "shards", args.workers).for_samples(samples)
            shard_s = time.perf_counter() - t0
        gpu = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU"
        header = (f"{args.arch} at {args.image_size} px, batch {args.batch_size}, {args.workers} workers, "
                  f"{len(samples)} images: {source}\ndevice {device} ({gpu}), torch {torch.__version__}, "
                  f"{torch.get_num_threads()} threads" + (f"; shards built in {shard_s:.1f} s" if shards else ""))
        rows = []
        for k, config in enumerate(configs):
            dataset = FaceDataset(samples, transform, cache=shards if config.shards else None,
                                  draft_size=args.image_size)
            share = max(0.0, (deadline - time.perf_counter()) / (len(configs) - k))
            print(f"measuring {config.name} ...", file=sys.stderr, flush=True)
            try:
                rows.append(measure(config, dataset, num_classes, args, device, share))
            except Exception as e:  # noqa: BLE001 - one failing row (compile on an odd machine) must not end the run
                first_line = (str(e).strip().splitlines() or [type(e).__name__])[0]
                rows.append({"config": config.name, "error": f"{type(e).__name__}: {first_line}"})
    base = next((r for r in rows if r["config"] == "fp32" and "error" not in r), None)
    for r in rows:
        if base is not None and "error" not in r:
            r["ratio_vs_fp32"] = r["images_per_s"] / base["images_per_s"]
    print_table(rows, header, notes)
    if args.json:
        Path(args.json).write_text(json.dumps({
            "source": source, "arch": args.arch, "image_size": args.image_size, "batch_size": args.batch_size,
            "workers": args.workers, "images": len(samples), "device": str(device), "device_name": gpu,
            "torch": torch.__version__, "threads": torch.get_num_threads(), "shards_build_s": shard_s,
            "notes": notes, "rows": rows}, indent=2))
    return 0 if rows and all("error" not in r for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
