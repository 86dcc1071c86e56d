"""Mixup and CutMix of training batches (timm.data.Mixup), for the race head.

timm draws each batch's mixing from numpy's global generator; here every batch draws inside its own seed,
from (run seed, rank, epoch, batch), so the mixing does not depend on anything else that used the generator,
and a run resumed mid-epoch mixes its remaining batches exactly as the uninterrupted run would have.
"""
from __future__ import annotations

import numpy as np
import torch
from timm.data import Mixup
from timm.data.mixup import mixup_target

from race_classifier.rng import seeded


class BatchMixer:
    """(images, race targets) -> (mixed images, soft targets, label smoothing included)."""

    def __init__(self, mixup: float, cutmix: float, prob: float, num_classes: int, label_smoothing: float,
                 seed: int, rank: int = 0):
        self.mixup = Mixup(mixup_alpha=mixup, cutmix_alpha=cutmix, prob=prob, switch_prob=0.5, mode="batch",
                           label_smoothing=label_smoothing, num_classes=num_classes)
        self.num_classes, self.label_smoothing, self.seed, self.rank = num_classes, label_smoothing, seed, rank

    def batch_seed(self, epoch: int, batch: int) -> int:
        return int(np.random.SeedSequence([self.seed % 2**32, self.rank, epoch, batch]).generate_state(1)[0])

    def __call__(self, images: torch.Tensor, targets: torch.Tensor, soft: torch.Tensor | None = None, *,
                 epoch: int, batch: int):
        """``soft`` (N, classes): target distributions to mix (a teacher's, distill.TeacherTargets) instead of
        the label-smoothed labels ``targets``."""
        if soft is None:
            soft = mixup_target(targets, self.num_classes, 1.0, self.label_smoothing)
        if len(images) % 2:  # timm mixes each image with its mirror in the batch order: an odd batch stays whole
            return images, soft
        with seeded(self.batch_seed(epoch, batch)):
            # What Mixup.__call__ does in batch mode (mixes the images in place, returns the weight), so that
            # any target distribution can be mixed by the same weight; for labels it equals mixup_target.
            lam = self.mixup._mix_batch(images)
        return images, soft * lam + soft.flip(0) * (1.0 - lam)
