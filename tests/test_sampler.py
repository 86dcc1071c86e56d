"""The epoch sampler: reproducible order per (seed, epoch), exact skipping for mid-epoch resume,
and class-balanced drawing."""
from __future__ import annotations

from collections import Counter

import torch

from race_classifier.data.sampler import EpochSampler, class_balanced_weights


def test_order_depends_only_on_seed_and_epoch():
    a, b = EpochSampler(100, seed=3), EpochSampler(100, seed=3)
    a.set_epoch(2)
    b.set_epoch(2)
    torch.manual_seed(123)  # the global RNG must not matter
    assert list(a) == list(b) and sorted(a) == list(range(100))
    b.set_epoch(3)
    assert list(a) != list(b)
    assert list(EpochSampler(100, seed=4)) != list(EpochSampler(100, seed=3))


def test_start_skips_exactly_the_consumed_prefix():
    s = EpochSampler(50, seed=1)
    s.set_epoch(5)
    full = list(s)
    s.set_epoch(5, start=16)
    assert list(s) == full[16:] and len(s) == 34


def test_class_balanced_weights_draw_classes_equally():
    labels = [0] * 900 + [1] * 90 + [2] * 10
    weights = class_balanced_weights(labels, num_classes=4)  # class 3 absent
    assert torch.allclose(torch.stack([weights[torch.tensor(labels) == c].sum() for c in range(3)]),
                          torch.tensor(1.0, dtype=weights.dtype))
    s = EpochSampler(len(labels), seed=0, weights=weights)
    drawn = Counter(labels[i] for i in s)
    assert sum(drawn.values()) == 1000
    for c in range(3):
        assert 250 < drawn[c] < 420  # about a third each, not 90% / 9% / 1%
