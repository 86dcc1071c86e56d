"""The training/evaluation dataset: samples from a manifest, read robustly, optionally from a cache.

An image that cannot be read never ends a run: ``__getitem__`` returns a failure record, the collate
function drops it from the batch and hands it on, and the trainer counts and lists it.
"""
from __future__ import annotations

import contextlib
import logging
from collections.abc import Sequence

import torch
from torch.utils.data import DataLoader, Dataset

from race_classifier.data.image_io import ImageLoadError, load_rgb
from race_classifier.data.manifest import Sample
from race_classifier.data.transforms import Preprocessing, build_transform
from race_classifier.rng import seeded

log = logging.getLogger(__name__)


class FaceDataset(Dataset):
    def __init__(self, samples: Sequence[Sample], transform, cache=None, draft_size: int | None = None,
                 targets: torch.Tensor | None = None):
        """``targets``: (N, heads) class indices per head (heads.head_targets), -1 where unknown;
        default: the race label alone."""
        self.samples = list(samples)
        self.targets = targets if targets is not None else torch.tensor(
            [[s.label] for s in self.samples], dtype=torch.long).reshape(len(self.samples), 1)
        self.transform = transform
        self.cache = cache
        self.draft_size = draft_size

    def __len__(self) -> int:
        return len(self.samples)

    @property
    def labels(self) -> list[int]:
        return [s.label for s in self.samples]

    def load_image(self, index: int):
        if self.cache is not None and self.cache.covers(index):
            return self.cache.get(index)
        return load_rgb(self.samples[index].path, draft_size=self.draft_size)

    def __getitem__(self, key: int | tuple[int, int]) -> dict:
        """``key``: an index, or an (index, seed) pair from SeededEpochSampler: the random transform then draws
        from that seed alone, so a training image's augmentation does not depend on the process loading it."""
        index, seed = key if isinstance(key, (tuple, list)) else (key, None)
        try:
            image = self.load_image(index)
            with seeded(seed) if seed is not None else contextlib.nullcontext():
                image = self.transform(image)
        except ImageLoadError as e:
            return {"index": index, "error": e.reason}
        return {"index": index, "image": image, "targets": self.targets[index]}


def collate_skipping_failures(items: list[dict]) -> dict:
    """Stack the readable items; pass the unreadable ones on as (index, reason) pairs. ``labels`` is the race
    column of ``targets`` (one column per head)."""
    good = [it for it in items if "error" not in it]
    return {
        "images": torch.stack([it["image"] for it in good]) if good else None,
        "labels": torch.tensor([int(it["targets"][0]) for it in good], dtype=torch.long),  # race
        "targets": torch.stack([it["targets"] for it in good]) if good else torch.zeros(0, 1, dtype=torch.long),
        "indices": torch.tensor([it["index"] for it in good], dtype=torch.long),
        "failures": [(it["index"], it["error"]) for it in items if "error" in it],
    }


def eval_loader(samples: Sequence[Sample], preprocessing: Preprocessing, batch_size: int = 64,
                workers: int = 0) -> DataLoader:
    """``samples`` in order, in batches of ``collate_skipping_failures``, preprocessed as evaluation does it
    (no augmentation): what evaluation, calibration, feature extraction and the export's checks all run on."""
    dataset = FaceDataset(samples, build_transform(preprocessing, train=False), draft_size=preprocessing.image_size)
    return DataLoader(dataset, batch_size=batch_size, num_workers=workers, collate_fn=collate_skipping_failures)


def preprocessed_batches(samples: Sequence[Sample], preprocessing: Preprocessing, batch_size: int = 64,
                         workers: int = 0):
    """(images, labels) batches of ``eval_loader``; each unreadable image is logged and dropped."""
    for batch in eval_loader(samples, preprocessing, batch_size, workers):
        for index, reason in batch["failures"]:
            log.warning("skipping unreadable image %s: %s", samples[index].path, reason)
        if batch["images"] is not None:
            yield batch["images"], batch["labels"]
