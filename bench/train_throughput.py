#!/usr/bin/env python
"""Training input speed: images/s from the JPEG tree vs from shards built by ``prepare --shards``, in one run.

Lays the images out as a folder tree, runs ``race-classifier prepare folder ... --shards <image size>`` on
it (timed), then measures, for each input path, the loader alone (decode + augment) and full training
steps (loader + forward + backward + AdamW) over the prepared training manifest, on the same images,
model and thread count. Speeds are reported as a ratio against the JPEG path measured in the same run:
machines here are shared and noisy.

    python bench/train_throughput.py [--images 2048] [--image_size 112] [--upscale 1024] [--json out.json]

Uses ../shared/data/fairface when present, else the synthetic pattern set (say so in any report).
"""
from __future__ import annotations

import argparse
import csv
import json
import sys
import tempfile
import time
from pathlib import Path

import torch
from PIL import Image
from torch.utils.data import DataLoader

from race_classifier.cli import main as cli_main
from race_classifier.data.cache import ImageCache
from race_classifier.data.dataset import FaceDataset, collate_skipping_failures
from race_classifier.data.manifest import read_manifest
from race_classifier.data.shards import find_shards
from race_classifier.data.synthetic import PATTERNS, generate
from race_classifier.data.transforms import Preprocessing, build_transform
from race_classifier.labels import get_taxonomy
from race_classifier.models.factory import create_model

FAIRFACE_DIR = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "fairface"


def image_tree(n: int, workdir: Path, upscale: int | None) -> tuple[Path, list[str], str]:
    """(root/<class>/<identity>/<image> tree of ``n`` images, prepare's taxonomy options, description)."""
    tree = workdir / "tree"
    if (FAIRFACE_DIR / "fairface_label_train.csv").is_file():
        with open(FAIRFACE_DIR / "fairface_label_train.csv", newline="") as f:
            rows = [r for _, r in zip(range(n), csv.DictReader(f))]
        items = [(FAIRFACE_DIR / r["file"], r["race"]) for r in rows]
        options, source = ["--source_taxonomy", "fairface7", "--taxonomy", "seed5"], "FairFace JPEGs (224 px)"
    else:
        root = generate(workdir / "synthetic", identities_per_class=n // 4 + 1, images_per_identity=1, size=224)
        items = [(p, p.parts[-3]) for p in sorted(root.rglob("*.png"))[:n]]
        options, source = ["--taxonomy", ",".join(PATTERNS)], "synthetic PNGs (224 px; no ../shared)"
    for i, (path, label) in enumerate(items):
        target = tree / label / f"id{i}" / (f"{i}.jpg" if upscale else f"{i}{path.suffix}")
        target.parent.mkdir(parents=True)
        if upscale:
            # Large originals (scraped photos, 1-megapixel crops) are where decoding starves the model.
            Image.open(path).convert("RGB").resize((upscale, upscale), Image.Resampling.BICUBIC).save(target, quality=95)
        else:
            target.symlink_to(path)
    return tree, options, source + (f", re-saved as {upscale} px JPEGs" if upscale else "")


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
        tree, taxonomy_options, source = image_tree(args.images, Path(tmp), args.upscale)
        prepared = Path(tmp) / "prepared"
        t0 = time.perf_counter()
        if cli_main(["prepare", "folder", str(tree), "--out", str(prepared), *taxonomy_options, "--val_fraction", "0.1",
                     "--shards", str(args.image_size), "--workers", str(args.workers)]) != 0:
            return 1
        prepare_s = time.perf_counter() - t0
        samples = read_manifest(prepared / "train.txt", get_taxonomy(str(prepared / "classes.txt")))
        shards = ImageCache.open(find_shards("auto", prepared / "train.txt", args.image_size)).for_samples(samples)
        transform = build_transform(Preprocessing(image_size=args.image_size), train=True)
        model = create_model(args.arch, 5)
        optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
        results = {}
        for name, c in (("jpeg", None), ("shards", shards)):
            dataset = FaceDataset(samples, transform, cache=c, draft_size=args.image_size)
            loader = DataLoader(dataset, batch_size=args.batch_size, shuffle=True, num_workers=args.workers,
                                collate_fn=collate_skipping_failures, drop_last=True, persistent_workers=False)
            loader_steps = min(len(loader) - 2, 3 * args.steps)
            results[name] = {"loader_images_per_s": measure(loader, None, None, loader_steps),
                             "train_images_per_s": measure(loader, model.train(), optimizer, min(len(loader) - 2, args.steps))}

    jpeg, sharded = results["jpeg"], results["shards"]
    table = {
        "source": source, "upscale": args.upscale, "images": args.images, "train_images": len(samples),
        "image_size": args.image_size, "arch": args.arch, "batch_size": args.batch_size, "workers": args.workers,
        "torch_threads": torch.get_num_threads(), "prepare_s": round(prepare_s, 2),
        "shards": {"stored_size": shards.size, "files": len(shards.shards), "images_per_shard": shards.per_shard},
        "results": results,
        "ratio_loader_shards_vs_jpeg": sharded["loader_images_per_s"] / jpeg["loader_images_per_s"],
        "ratio_train_shards_vs_jpeg": sharded["train_images_per_s"] / jpeg["train_images_per_s"],
    }
    print(f"source: {source}; {len(samples)} training images, {args.arch} at {args.image_size} px, batch "
          f"{args.batch_size}, {args.workers} workers, {torch.get_num_threads()} torch threads; prepare with "
          f"--shards {args.image_size} took {prepare_s:.1f} s")
    print(f"{'input':<8}{'loader img/s':>14}{'train img/s':>14}")
    for name, r in results.items():
        print(f"{name:<8}{r['loader_images_per_s']:>14.1f}{r['train_images_per_s']:>14.1f}")
    print(f"{'ratio':<8}{table['ratio_loader_shards_vs_jpeg']:>13.2f}x{table['ratio_train_shards_vs_jpeg']:>13.2f}x"
          "   (shards / jpeg)")
    if args.json:
        Path(args.json).write_text(json.dumps(table, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
