#!/usr/bin/env python
"""Training input speed: images/s from JPEG files vs from the pre-resized uint8 cache, in one run.

Measures, for each input path, the loader alone (decode + augment) and full training steps
(loader + forward + backward + AdamW), on the same images, model and thread count. Speeds are
reported as a ratio against the JPEG path measured in the same run: machines here are shared and noisy.

    python bench/train_throughput.py [--images 2048] [--image_size 112] [--upscale 1024] [--json out.json]

Uses ../shared/data/fairface when present, else the synthetic pattern set (say so in any report).
"""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import torch
from PIL import Image
from torch.utils.data import DataLoader

from race_classifier.data.cache import ImageCache, cache_size_for
from race_classifier.data.dataset import FaceDataset, collate_skipping_failures
from race_classifier.data.manifest import Sample
from race_classifier.data.synthetic import generate
from race_classifier.data.transforms import Preprocessing, build_transform
from race_classifier.models.factory import create_model

FAIRFACE = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "fairface" / "train"


def sample_images(n: int, workdir: Path, upscale: int | None) -> tuple[list[Sample], str]:
    if FAIRFACE.is_dir():
        paths = [FAIRFACE / f"{i}.jpg" for i in range(1, n + 1)]
        source = "FairFace JPEGs (224 px)"
    else:
        root = generate(workdir / "synthetic", identities_per_class=n // 4 + 1, images_per_identity=1, size=224)
        paths = sorted(root.rglob("*.png"))[:n]
        source = "synthetic PNGs (224 px; no ../shared)"
    if upscale:
        # Large originals (scraped photos, 1-megapixel crops) are where decoding starves the model.
        big = workdir / f"up{upscale}"
        big.mkdir()
        for i, p in enumerate(paths):
            Image.open(p).convert("RGB").resize((upscale, upscale), Image.Resampling.BICUBIC).save(big / f"{i}.jpg", quality=95)
        paths = [big / f"{i}.jpg" for i in range(len(paths))]
        source += f", re-saved as {upscale} px JPEGs"
    return [Sample(str(p), i % 5) for i, p in enumerate(paths)], source


def measure(loader: DataLoader, model, optimizer, steps: int, warmup: int = 2) -> float:
    """Images/s over ``steps`` batches after ``warmup``; with no model, the loader alone."""
    seen, started = 0, None
    for i, batch in enumerate(loader):
        if i == warmup:
            started, seen = time.perf_counter(), 0
        if model is not None:
            loss = torch.nn.functional.cross_entropy(model(batch["images"]), batch["labels"])
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
        seen += len(batch["labels"])
        if i + 1 == warmup + steps:
            break
    return seen / (time.perf_counter() - started)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--images", type=int, default=2048)
    p.add_argument("--image_size", type=int, default=112)
    p.add_argument("--batch_size", type=int, default=64)
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--steps", type=int, default=10, help="timed training steps per path")
    p.add_argument("--arch", default="torchvision:mobilenet_v2")
    p.add_argument("--upscale", type=int, help="re-save the images at this size first (large originals)")
    p.add_argument("--json", help="also write the results here")
    args = p.parse_args(argv)

    with tempfile.TemporaryDirectory() as tmp:
        samples, source = sample_images(args.images, Path(tmp), args.upscale)
        pre = Preprocessing(image_size=args.image_size)
        transform = build_transform(pre, train=True)
        t0 = time.perf_counter()
        cache = ImageCache.build_or_load(samples, cache_size_for(args.image_size), Path(tmp) / "cache", args.workers)
        cache_build_s = time.perf_counter() - t0
        model = create_model(args.arch, 5)
        optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
        results = {}
        for name, c in (("jpeg", None), ("cache", cache)):
            dataset = FaceDataset(samples, transform, cache=c, draft_size=args.image_size)
            loader = DataLoader(dataset, batch_size=args.batch_size, shuffle=True, num_workers=args.workers,
                                collate_fn=collate_skipping_failures, drop_last=True, persistent_workers=False)
            loader_steps = min(len(loader) - 2, 3 * args.steps)
            results[name] = {"loader_images_per_s": measure(loader, None, None, loader_steps),
                             "train_images_per_s": measure(loader, model.train(), optimizer, args.steps)}

    jpeg, cached = results["jpeg"], results["cache"]
    table = {
        "source": source, "upscale": args.upscale, "images": args.images, "image_size": args.image_size, "arch": args.arch,
        "batch_size": args.batch_size, "workers": args.workers, "torch_threads": torch.get_num_threads(),
        "cache_build_s": round(cache_build_s, 2),
        "results": results,
        "ratio_loader_cache_vs_jpeg": cached["loader_images_per_s"] / jpeg["loader_images_per_s"],
        "ratio_train_cache_vs_jpeg": cached["train_images_per_s"] / jpeg["train_images_per_s"],
    }
    print(f"source: {source}; {args.images} images, {args.arch} at {args.image_size} px, batch {args.batch_size}, "
          f"{args.workers} workers, {torch.get_num_threads()} torch threads; cache built in {cache_build_s:.1f} s")
    print(f"{'input':<8}{'loader img/s':>14}{'train img/s':>14}")
    for name, r in results.items():
        print(f"{name:<8}{r['loader_images_per_s']:>14.1f}{r['train_images_per_s']:>14.1f}")
    print(f"{'ratio':<8}{table['ratio_loader_cache_vs_jpeg']:>13.2f}x{table['ratio_train_cache_vs_jpeg']:>13.2f}x"
          "   (cache / jpeg)")
    if args.json:
        Path(args.json).write_text(json.dumps(table, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
