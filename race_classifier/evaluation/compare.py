"""Paired comparison of two models on the same images: candidate (A) against a baseline (B).

Both predictions tables are joined on ``path``; an image either model could not read is dropped from
both, so every figure compares the two models on exactly the same images. For overall accuracy,
balanced accuracy, each class's accuracy and each subgroup's accuracy we report A, B, A − B with a
paired bootstrap CI (one set of resampled image indices applied to both models: the CI reflects the
per-image pairing, which is much tighter than two independent CIs) and McNemar's exact test on the
discordant images. A gender or age head both tables scored (in the same classes: runner.scored_heads)
is compared the same way, overall and per class, on the images labelled for it, under ``heads``.
"""
from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np
import pandas as pd
from scipy.stats import binomtest

from race_classifier.evaluation.metrics import (
    balanced_rate,
    bootstrap_weights,
    head_table,
    normalize_predictions,
    percentile_ci,
    race_labelled,
    subgroup_masks,
    weighted_rate,
    _num,
)


def mcnemar_exact(correct_a, correct_b) -> tuple[int, int, float]:
    """(b01, b10, p): b01 = images A gets right and B wrong, b10 = the reverse; p = two-sided exact
    binomial test of b01 out of b01 + b10 at 1/2 (1.0 when there is no discordant image)."""
    a = np.asarray(correct_a, bool)
    b = np.asarray(correct_b, bool)
    b01, b10 = int(np.sum(a & ~b)), int(np.sum(~a & b))
    p = 1.0 if b01 + b10 == 0 else float(binomtest(b01, b01 + b10, 0.5).pvalue)
    return b01, b10, p


def pair_predictions(df_a: pd.DataFrame, df_b: pd.DataFrame, classes: Sequence[str]) -> tuple[pd.DataFrame, dict]:
    """(paired rows both models read, counts): inner join on path; columns y_true, y_pred_a, y_pred_b,
    gender, age (A's value, B's where A's is empty). Counts: n_common, n_dropped, n_only_a, n_only_b.
    A path listed more than once (as evaluate counts it) pairs its n-th listing in A with its n-th in B."""
    a, b = normalize_predictions(df_a, classes), normalize_predictions(df_b, classes)
    a["listing"], b["listing"] = a.groupby("path").cumcount(), b.groupby("path").cumcount()
    joined = a.merge(b, on=["path", "listing"], how="inner", suffixes=("_a", "_b"))
    if (joined["y_true_a"] != joined["y_true_b"]).any():
        raise ValueError("the two tables disagree on y_true for some images: not the same labels")
    kept = joined[~(joined["is_error_a"] | joined["is_error_b"])].reset_index(drop=True)
    counts = {"n_common": len(kept), "n_dropped": len(joined) - len(kept),
              "n_only_a": len(a) - len(joined), "n_only_b": len(b) - len(joined)}
    if kept.empty:
        raise ValueError(f"no image read fine by both models (joined {len(joined)}, dropped {counts['n_dropped']})")
    paired = pd.DataFrame({
        "path": kept["path"], "y_true": kept["y_true_a"],
        "y_pred_a": kept["y_pred_a"], "y_pred_b": kept["y_pred_b"],
        "gender": kept["gender_a"].where(kept["gender_a"] != "", kept["gender_b"]),
        "age": kept["age_a"].where(kept["age_a"] != "", kept["age_b"]),
        "age_group": kept["age_group_a"],  # the scored age groups: the evaluated model's (A's)
    })
    if "age_y_true_a" in kept:
        paired["age_y_true"] = kept["age_y_true_a"]  # orders the age groups
    return paired, counts


def _significant(p: float | None, low: float | None, high: float | None, alpha: float) -> bool:
    if p is not None:
        return p < alpha
    return low is not None and (low > 0 or high < 0)


def _entry(name: str, n: int, a: float | None, b: float | None, diff_samples: np.ndarray,
           p: float | None, alpha: float) -> dict:
    diff = None if a is None or b is None else a - b
    low, high = percentile_ci(diff_samples, 1 - alpha) if diff is not None else (None, None)
    return {"name": name, "n": n, "a": a, "b": b, "diff": _num(diff), "ci_low": low, "ci_high": high,
            "p_mcnemar": p if n else None, "significant": _significant(p if n else None, low, high, alpha)}


def _accuracy_entry(name: str, mask: np.ndarray, ca: np.ndarray, cb: np.ndarray,
                    weights: np.ndarray, alpha: float) -> dict:
    """Accuracy of A and B on the images in ``mask``, paired bootstrap CI of A − B, McNemar p."""
    n = int(mask.sum())
    a = float(ca[mask].mean()) if n else None
    b = float(cb[mask].mean()) if n else None
    samples = weighted_rate(weights, ca, mask) - weighted_rate(weights, cb, mask)
    return _entry(name, n, a, b, samples, mcnemar_exact(ca[mask], cb[mask])[2], alpha)


def _balanced_entry(y: np.ndarray, ca: np.ndarray, cb: np.ndarray, k: int,
                    weights: np.ndarray, alpha: float) -> dict:
    """Balanced accuracy: no McNemar (not a per-image statistic); significance from the CI alone."""
    ones = np.ones((1, len(y)))
    a, b = _num(balanced_rate(ones, y, ca, k)[0]), _num(balanced_rate(ones, y, cb, k)[0])
    samples = balanced_rate(weights, y, ca, k) - balanced_rate(weights, y, cb, k)
    return _entry("balanced_accuracy", len(y), a, b, samples, None, alpha)


def compare_predictions(df_a: pd.DataFrame, df_b: pd.DataFrame, classes: Sequence[str], n_boot: int = 1000,
                        seed: int = 0, alpha: float = 0.05, min_group_size: int = 10,
                        heads: Mapping[str, Sequence[str]] | None = None) -> dict:
    """Candidate A against baseline B on the same images (JSON-serialisable).

    Returns {"n_common", "n_dropped", "n_only_a", "n_only_b", "alpha", "min_group_size",
    "overall": [entry], "per_class": [entry], "subgroups": {dim: [entry]}, "heads": {head: ...}}; each entry is
    {"name", "n", "a", "b", "diff", "ci_low", "ci_high", "p_mcnemar", "significant", "small_group"}.
    CIs are at level 1 − alpha. ``small_group`` flags subgroups with n < min_group_size: reported, but
    too small for their difference to be read as more than noise. No correction for multiple tests.
    ``heads`` ({extra head: its classes}): each head both tables scored, with labelled images, gets a
    comparison of its own (the same keys, no subgroups) under ``heads``.
    """
    result = _compare(race_labelled(df_a), race_labelled(df_b), classes, n_boot, seed, alpha, min_group_size)
    result["heads"] = {}
    for name, head_classes in (heads or {}).items():
        a, b = head_table(df_a, name), head_table(df_b, name)
        if a is not None and b is not None and len(a) and len(b):
            result["heads"][name] = _compare(a, b, head_classes, n_boot, seed, alpha, min_group_size)
    return result


def _compare(df_a: pd.DataFrame, df_b: pd.DataFrame, classes: Sequence[str], n_boot: int, seed: int,
             alpha: float, min_group_size: int) -> dict:
    classes = list(classes)
    k = len(classes)
    paired, counts = pair_predictions(df_a, df_b, classes)
    y = paired["y_true"].to_numpy(int)
    ca = (paired["y_pred_a"].to_numpy(int) == y).astype(float)
    cb = (paired["y_pred_b"].to_numpy(int) == y).astype(float)
    # One set of resampled indices for both models and every statistic: a paired bootstrap.
    weights = bootstrap_weights(len(y), n_boot, seed)

    def entry(name, mask):
        return _accuracy_entry(name, mask, ca, cb, weights, alpha)

    overall = [entry("accuracy", np.ones(len(y), bool)), _balanced_entry(y, ca, cb, k, weights, alpha)]
    per_class = [entry(name, y == c) for c, name in enumerate(classes)]
    subgroups = {dim: [entry(label, mask) for label, mask in groups]
                 for dim, groups in subgroup_masks(paired, classes).items()}
    for row in [*overall, *per_class, *(row for rows in subgroups.values() for row in rows)]:
        row["small_group"] = row["n"] < min_group_size
    return {**counts, "alpha": alpha, "min_group_size": min_group_size,
            "overall": overall, "per_class": per_class, "subgroups": subgroups}
