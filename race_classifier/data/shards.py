"""Prepared shards: ``prepare --shards 224`` stores the manifests' images, pre-resized for training at
224 px, as a shard set (``cache.py``) in ``shards/224/`` beside train.txt and val.txt; training at
``--image_size 224`` finds and reads them (``--shards auto``, the default).

The set holds train and val images together, in manifest order, at ``cache_size_for(image size)``
pixels (a little larger than the input, for random-resized crops, but no larger than the images), like
``--cache_dir`` at training start but built once, ahead of time, where the data is prepared. Where that
is not the input size, training reads the validation images from their files, so that validation
scores exactly what evaluation will.
"""
from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from race_classifier.data.cache import INDEX_NAME, ImageCache, cache_size_for
from race_classifier.data.manifest import manifest_image_paths
from race_classifier.data.options import IMAGES_PER_SHARD

SHARDS_FOLDER = "shards"
MANIFESTS = ("train.txt", "val.txt")


def shard_dir(manifest_dir: str | Path, image_size: int) -> Path:
    return Path(manifest_dir) / SHARDS_FOLDER / str(image_size)


def parse_sizes(text: str) -> list[int]:
    """'224' or '112,224' -> [224] or [112, 224]."""
    try:
        sizes = [int(part) for part in str(text).split(",") if part.strip()]
    except ValueError:
        raise ValueError(f"--shards takes image sizes such as 224 or 112,224, not {text!r}") from None
    if not sizes or min(sizes) < 1:
        raise ValueError(f"--shards takes positive image sizes such as 224 or 112,224, not {text!r}")
    return sorted(set(sizes))


def build_prepared_shards(manifest_dir: str | Path, image_sizes: Sequence[int], workers: int = 2,
                          per_shard: int = IMAGES_PER_SHARD) -> list[dict]:
    """A shard set per training image size of the images in ``manifest_dir``'s train.txt and val.txt;
    returns one summary per size (folder, images, shards, unreadable images by path)."""
    paths = list(dict.fromkeys(p for name in MANIFESTS for p in manifest_image_paths(Path(manifest_dir) / name)))
    summaries = []
    for image_size in image_sizes:
        shards = ImageCache.build(paths, cache_size_for(image_size, paths), shard_dir(manifest_dir, image_size),
                                  workers, per_shard)
        summaries.append({"image_size": image_size, "stored_size": shards.size, "dir": str(shards.root),
                          "images": len(shards.paths), "shards": len(shards.shards),
                          "unreadable": {shards.paths[i]: reason for i, reason in sorted(shards.errors.items())}})
    return summaries


def format_shard_summary(summary: dict) -> list[str]:
    lines = [f"shards: {summary['images']} image(s) for {summary['image_size']} px training "
             f"(stored at {summary['stored_size']} px) in {summary['shards']} shard(s), {summary['dir']}"]
    if summary["unreadable"]:
        lines.append(f"skipped: {len(summary['unreadable'])} unreadable image(s), not stored (training skips them):")
        lines += [f"  {path}: {reason}" for path, reason in list(summary["unreadable"].items())[:20]]
    return lines


def find_shards(spec: str | None, train_txt: str | Path, image_size: int) -> Path | None:
    """The shard set training reads: ``spec`` 'auto' finds ``shards/<image_size>`` beside ``train_txt`` (None
    when there is none or it is incomplete); 'none' turns shards off; anything else is a shard set's folder."""
    if spec is None or str(spec).lower() in ("none", "off", "no", ""):
        return None
    if str(spec).lower() == "auto":
        found = shard_dir(Path(train_txt).resolve().parent, image_size)
        return found if (found / INDEX_NAME).is_file() else None
    if not (Path(spec) / INDEX_NAME).is_file():
        raise FileNotFoundError(f"--shards {spec}: no complete shard set there (no {INDEX_NAME}); build one with "
                                "race-classifier prepare ... --shards SIZE")
    return Path(spec)
