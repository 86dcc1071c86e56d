"""The epoch sampler: reproducible order per (seed, epoch), exact skipping for mid-epoch resume,
class-balanced and race x gender group-balanced drawing."""
from __future__ import annotations

from collections import Counter

import pytest
import torch

from race_classifier.data.sampler import EpochSampler, class_balanced_weights, group_balanced_weights


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


def test_group_balanced_weights_draw_race_x_gender_cells_equally():
    # class 0: 800 Male, 100 Female; class 1: 60 Female, 30 of unknown gender ("" is a cell of its own)
    labels = [0] * 900 + [1] * 90
    groups = ["Male"] * 800 + ["Female"] * 100 + ["Female"] * 60 + [""] * 30
    weights = group_balanced_weights(labels, groups)
    cells = {(0, "Male"), (0, "Female"), (1, "Female"), (1, "")}
    totals = {c: float(sum(w for w, y, g in zip(weights.tolist(), labels, groups) if (y, g) == c)) for c in cells}
    assert all(abs(t - 1.0) < 1e-9 for t in totals.values())
    s = EpochSampler(len(labels), seed=0, weights=weights)
    s.set_epoch(1)
    drawn = Counter((labels[i], groups[i]) for i in s)
    assert set(drawn) == cells and sum(drawn.values()) == len(labels)
    for c in cells:
        assert 180 < drawn[c] < 320  # about a quarter each (247.5), not 81% / 10% / 6% / 3%


def test_group_cells_follow_the_gender_heads_spelling():
    """'M' and 'Male' are one cell, '-' and '' both unknown: spellings do not make cells of their own."""
    labels = [0] * 6 + [1] * 4
    spelt = ["Male", "M", "male", "Female", "f", "-", "Male", "MALE", "unknown", ""]
    canonical = ["Male", "Male", "Male", "Female", "Female", "", "Male", "Male", "", ""]
    assert torch.equal(group_balanced_weights(labels, spelt), group_balanced_weights(labels, canonical))


def test_group_balanced_weights_without_groups_is_class_balanced():
    labels = [0] * 30 + [1] * 10 + [2] * 5
    assert torch.allclose(group_balanced_weights(labels, [""] * len(labels)),
                          class_balanced_weights(labels, num_classes=3))


def test_group_balanced_weights_needs_a_group_per_label():
    with pytest.raises(ValueError, match="3 labels but 2 groups"):
        group_balanced_weights([0, 1, 1], ["Male", "Female"])
