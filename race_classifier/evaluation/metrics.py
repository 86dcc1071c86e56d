"""Classification metrics from scikit-learn, summarised per class, per subgroup, with confidence intervals.

A class with no examples has no accuracy (None), never 0% or 100%.

The labels are perceived, socially constructed categories; an audit therefore reports every figure
per group with a confidence interval, so that a small group's noisy accuracy is not read as a fact.

Two entry points:

* ``summarize`` / ``per_class_accuracy``: the light figures training logs every epoch.
* ``evaluate_predictions``: the evaluation report's figures from a predictions table (one row per
  image: ``path``, ``y_true``, ``y_pred``, ``confidence``, ``prob_<i>``, ``gender``, ``age``, ``error``).
  Gender/age heads (``<head>_y_true``, ``<head>_y_pred``, ... columns, see runner.py) get the same figures
  under ``heads``, each over the images labelled for that head (``head_table``); race accuracy is also
  broken down by the model's age groups (``age_group``).

Intervals: an accuracy is a proportion (k of n images right), so accuracy overall, per class and per
group gets a Wilson score interval (``wilson_ci``): it stays honest at small n and at 0% or 100%, where a
percentile bootstrap collapses to a point ("0.00% [0.00, 0.00]" for 0 of 6, "[100.00, 100.00]" for 1 of 1).
The bootstrap is kept where no closed form fits: balanced accuracy, the gaps between groups, and (compare.py)
differences between models.

Bootstrap: image indices are resampled once and turned into an ``(n_boot, n)`` matrix of
per-resample multiplicities ``W``; every statistic is a weighted rate computed from ``W`` (one matrix
product), so all CIs of one report come from the very same resamples.
"""
from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence

import numpy as np
import pandas as pd
from scipy.stats import binomtest
from sklearn.metrics import confusion_matrix, log_loss, precision_recall_fscore_support

from race_classifier.heads import MISSING_VALUES, canonical_gender

N_CALIBRATION_BINS = 15
N_CALIBRATION_DRAWS = 1000  # consistency resamples behind ece_if_calibrated
_DRAW_ELEMENTS = 1 << 22  # uniform numbers drawn at once (32 MB): ece_if_calibrated's chunk size
# FairFace's age ranges, in order; UTKFace's integer ages are binned into them.
AGE_RANGES = ["0-2", "3-9", "10-19", "20-29", "30-39", "40-49", "50-59", "60-69", "more than 70"]
_AGE_UPPER = [2, 9, 19, 29, 39, 49, 59, 69]  # inclusive upper bound of each range but the last
TEXT_COLUMNS = ("path", "gender", "age", "age_group", "error")


# --------------------------------------------------------------------------- training-time summary

def per_class_accuracy(cm: np.ndarray) -> list[float | None]:
    """Recall of each class (the brief's "class-wise accuracy"): diagonal over row sums."""
    support = cm.sum(axis=1)
    return [float(cm[i, i] / support[i]) if support[i] else None for i in range(len(cm))]


def summarize(y_true: Sequence[int], y_pred: Sequence[int], num_classes: int) -> dict:
    """accuracy, balanced accuracy (mean recall over classes present), per-class accuracy, support."""
    labels = list(range(num_classes))
    cm = confusion_matrix(y_true, y_pred, labels=labels) if len(y_true) else np.zeros((num_classes,) * 2, int)
    per_class = per_class_accuracy(cm)
    present = [a for a in per_class if a is not None]
    total = int(cm.sum())
    return {
        "accuracy": float(np.trace(cm) / total) if total else None,
        "balanced_accuracy": float(np.mean(present)) if present else None,
        "per_class_accuracy": per_class,
        "support": cm.sum(axis=1).astype(int).tolist(),
        "confusion_matrix": cm.astype(int).tolist(),
    }


# --------------------------------------------------------------------------- small helpers

def _num(x) -> float | None:
    """A plain float for JSON, or None for an undefined value (None / NaN / inf)."""
    if x is None:
        return None
    x = float(x)
    return x if math.isfinite(x) else None


def age_group(value) -> str:
    """FairFace age range of ``value``: ranges ('3-9', 'more than 70') pass through; integer ages
    (UTKFace) are binned into FairFace's ranges (70 and over -> 'more than 70'); unknown ('-', 'unknown', NaN,
    a negative code such as -1) -> ''."""
    text = "" if value is None else str(value).strip()
    if text.lower() in MISSING_VALUES:
        return ""
    try:
        age = float(text)
    except ValueError:
        return text  # already a range label
    if not math.isfinite(age) or age < 0:
        return ""
    for upper, label in zip(_AGE_UPPER, AGE_RANGES):
        if int(age) <= upper:
            return label
    return AGE_RANGES[-1]


def _age_sort_key(label: str):
    # FairFace's order first, any other label after them, alphabetically.
    return (AGE_RANGES.index(label), "") if label in AGE_RANGES else (len(AGE_RANGES), label)


# --------------------------------------------------------------------------- the predictions table

def normalize_predictions(df: pd.DataFrame, classes: Sequence[str]) -> pd.DataFrame:
    """A copy with text columns as clean strings ('' for missing: CSVs read '' back as NaN), integer
    labels, and a boolean ``is_error`` column (an ``error`` text, or y_pred == -1: unreadable image)."""
    missing = {"path", "y_true", "y_pred"} - set(df.columns)
    if missing:
        raise ValueError(f"predictions table lacks columns: {sorted(missing)}")
    out = df.copy()
    for column in TEXT_COLUMNS:
        values = out[column] if column in out.columns else pd.Series("", index=out.index)
        values = values.astype(object)
        out[column] = values.where(values.notna(), "").astype(str).str.strip()
    out["y_true"] = out["y_true"].astype(int)
    out["y_pred"] = out["y_pred"].fillna(-1).astype(int)
    k = len(classes)
    if not out["y_true"].between(0, k - 1).all():
        raise ValueError(f"y_true outside 0..{k - 1}")
    out["is_error"] = (out["error"] != "") | (out["y_pred"] < 0)
    if not out.loc[~out["is_error"], "y_pred"].between(0, k - 1).all():
        raise ValueError(f"y_pred outside 0..{k - 1} on a row without an error")
    return out


def clean_predictions(df: pd.DataFrame, classes: Sequence[str]) -> tuple[pd.DataFrame, int]:
    """(rows read fine, number of error rows): error rows are excluded from every metric but counted."""
    out = normalize_predictions(df, classes)
    return out[~out["is_error"]].reset_index(drop=True), int(out["is_error"].sum())


def probability_matrix(df: pd.DataFrame, num_classes: int) -> np.ndarray | None:
    """(n, K) probabilities from ``prob_0..prob_{K-1}``, or None when any is missing (a labels-only baseline)."""
    columns = [f"prob_{i}" for i in range(num_classes)]
    if not set(columns) <= set(df.columns):
        return None
    probs = df[columns].to_numpy(dtype=float)
    return None if np.isnan(probs).any() else probs


def head_table(df: pd.DataFrame, head: str) -> pd.DataFrame | None:
    """One extra head's predictions as a table of its own (path, y_true, y_pred, confidence, prob_<k>,
    error), over the images labelled for that head; None when ``df`` has no predictions for it."""
    prefix = f"{head}_"
    if prefix + "y_pred" not in df.columns:
        return None
    rows = df[pd.to_numeric(df[prefix + "y_true"]).astype(int) >= 0]
    out = pd.DataFrame({"path": rows["path"], "y_true": rows[prefix + "y_true"], "y_pred": rows[prefix + "y_pred"],
                        "confidence": rows[prefix + "confidence"]})
    for column in df.columns:
        if column.startswith(prefix + "prob_"):
            out[column.removeprefix(prefix)] = rows[column]
    if "error" in rows:
        out["error"] = rows["error"]
    return out.reset_index(drop=True)


def race_labelled(df: pd.DataFrame) -> pd.DataFrame:
    """The rows with a race label: images kept only for the other heads have y_true -1."""
    if "y_true" not in df.columns:
        return df  # normalize_predictions says what is missing
    return df[pd.to_numeric(df["y_true"]).astype(int) >= 0].reset_index(drop=True)


def subgroup_masks(df: pd.DataFrame, classes: Sequence[str]) -> dict[str, list[tuple[str, np.ndarray]]]:
    """dimension -> [(group label, boolean row mask)] for 'gender', 'age' (FairFace's ranges), 'age_group'
    (the model's own age groups, when it has an age head) and 'race_x_gender'.

    Only dimensions where some row has a value; rows with an empty value are left out of that dimension.
    """
    n = len(df)
    # 'M', 'male' and 'Male' are one group, as for the gender head; unknown markers ('-', 'unknown') none
    gender = (np.array([canonical_gender(g) or "" for g in df["gender"]], dtype=str) if "gender" in df
              else np.full(n, ""))
    age = np.array([age_group(a) for a in df["age"]], dtype=str) if "age" in df else np.full(n, "")
    y = df["y_true"].to_numpy(int)
    genders = sorted(str(g) for g in set(gender) - {""})
    dims: dict[str, list[tuple[str, np.ndarray]]] = {}
    if genders:
        dims["gender"] = [(g, gender == g) for g in genders]
    ages = sorted((str(a) for a in set(age) - {""}), key=_age_sort_key)
    if ages:
        dims["age"] = [(a, age == a) for a in ages]
    group = df["age_group"].to_numpy(str) if "age_group" in df else np.full(n, "")
    if (group != "").any():
        # In the groups' own order (Child, Teen, ...), which the true class index of the age head gives.
        order = df["age_y_true"].to_numpy(int) if "age_y_true" in df else np.zeros(n, int)
        names = sorted(set(group) - {""}, key=lambda g: (order[group == g].min(), g))
        dims["age_group"] = [(g, group == g) for g in names]
    if genders:
        # race = the (perceived) true class: how accurate the model is for, say, Black women.
        cells = [(f"{classes[c]} × {g}", (y == c) & (gender == g)) for c in range(len(classes)) for g in genders]
        dims["race_x_gender"] = [(label, mask) for label, mask in cells if mask.any()]
    return dims


# --------------------------------------------------------------------------- bootstrap

def bootstrap_weights(n: int, n_boot: int, seed: int) -> np.ndarray:
    """(n_boot, n) float matrix, seeded: how many times each image is drawn in each resample (with
    replacement). Built a block of resamples at a time: the index draws and their counts are temporary,
    so memory peaks near the matrix itself (2 GB at 250,000 images, not four times that); the draws are
    the same as one (n_boot, n) draw, so CIs do not depend on the block size."""
    weights = np.zeros((n_boot, n))
    if n == 0:
        return weights
    rng = np.random.default_rng(seed)
    rows = max(1, _DRAW_ELEMENTS // n)
    for start in range(0, n_boot, rows):
        block = rng.integers(0, n, size=(min(rows, n_boot - start), n))
        offsets = (block + n * np.arange(len(block))[:, None]).ravel()
        weights[start:start + len(block)] = np.bincount(offsets, minlength=block.size).reshape(block.shape)
    return weights


def weighted_rate(weights: np.ndarray, values: np.ndarray, mask: np.ndarray | None = None) -> np.ndarray:
    """Per weight row: weighted mean of ``values`` over ``mask``; NaN where the mask draws nothing."""
    mask = np.ones(weights.shape[1], float) if mask is None else np.asarray(mask, float)
    den = weights @ mask
    num = weights @ (np.asarray(values, float) * mask)
    return np.divide(num, den, out=np.full(len(den), np.nan), where=den > 0)


def class_recalls(weights: np.ndarray, y_true: np.ndarray, correct: np.ndarray, num_classes: int) -> np.ndarray:
    """(rows, K) weighted recall of each class; NaN where a class is not drawn."""
    onehot = (np.asarray(y_true)[:, None] == np.arange(num_classes)).astype(float)
    den = weights @ onehot
    num = weights @ (onehot * np.asarray(correct, float)[:, None])
    return np.divide(num, den, out=np.full(den.shape, np.nan), where=den > 0)


def balanced_rate(weights: np.ndarray, y_true: np.ndarray, correct: np.ndarray, num_classes: int) -> np.ndarray:
    """Per weight row: mean recall over the classes drawn (absent classes have no recall)."""
    recalls = class_recalls(weights, y_true, correct, num_classes)
    present = ~np.isnan(recalls)
    total = np.where(present, recalls, 0.0).sum(axis=1)
    count = present.sum(axis=1)
    return np.divide(total, count, out=np.full(len(count), np.nan), where=count > 0)


def wilson_ci(k: int, n: int, ci: float = 0.95) -> dict:
    """{"value", "ci_low", "ci_high"} of a proportion k / n with its Wilson score interval (scipy's
    ``binomtest(...).proportion_ci(method="wilson")``, without continuity correction); all None when n = 0.
    0 of 6 gives [0, 0.390], 6 of 6 [0.610, 1], 1 of 1 [0.207, 1]."""
    k, n = int(round(k)), int(n)
    if n <= 0:
        return {"value": None, "ci_low": None, "ci_high": None}
    interval = binomtest(k, n).proportion_ci(confidence_level=ci, method="wilson")
    return {"value": k / n, "ci_low": _num(interval.low), "ci_high": _num(interval.high)}


def percentile_ci(samples: np.ndarray, ci: float) -> tuple[float | None, float | None]:
    """Percentile interval of the bootstrap samples, skipping NaN (resamples where it is undefined)."""
    samples = np.asarray(samples, float)
    samples = samples[~np.isnan(samples)]
    if samples.size == 0:
        return None, None
    tail = 100 * (1 - ci) / 2
    low, high = np.percentile(samples, [tail, 100 - tail])
    return _num(low), _num(high)


def bootstrap_ci(statistic: Callable[[np.ndarray], np.ndarray], weights: np.ndarray, ci: float) -> dict:
    """{"value", "ci_low", "ci_high"}, percentile bootstrap: ``statistic`` maps a (rows, n) weight matrix to one
    value per row; all-ones weights give the point estimate, the resample weights its bootstrap distribution."""
    value = _num(statistic(np.ones((1, weights.shape[1])))[0])
    low, high = percentile_ci(statistic(weights), ci) if value is not None else (None, None)
    return {"value": value, "ci_low": low, "ci_high": high}


# --------------------------------------------------------------------------- calibration

def calibration_bin(confidence, n_bins: int = N_CALIBRATION_BINS) -> np.ndarray:
    """Each confidence's bin index: equal-width bins (lo, hi], the first one closed at 0."""
    return np.clip(np.ceil(np.asarray(confidence, float) * n_bins).astype(int) - 1, 0, n_bins - 1)


def expected_calibration_error(confidence, correct, n_bins: int = N_CALIBRATION_BINS) -> tuple[float | None, list[dict]]:
    """(ECE, reliability bins): equal-width confidence bins (lo, hi], the first one closed at 0;
    ECE = sum over bins of count/n * |accuracy - mean confidence|. Empty bins: accuracy/confidence None."""
    confidence = np.asarray(confidence, float)
    correct = np.asarray(correct, float)
    which = calibration_bin(confidence, n_bins)
    bins, ece = [], 0.0
    for b in range(n_bins):
        in_bin = which == b
        count = int(in_bin.sum())
        acc = float(correct[in_bin].mean()) if count else None
        conf = float(confidence[in_bin].mean()) if count else None
        if count:
            ece += count / len(confidence) * abs(acc - conf)
        bins.append({"lo": b / n_bins, "hi": (b + 1) / n_bins, "count": count, "accuracy": acc, "confidence": conf})
    return (float(ece) if len(confidence) else None), bins


def ece_if_calibrated(confidence, observed_ece: float | None, n_draws: int = N_CALIBRATION_DRAWS, seed: int = 0,
                      n_bins: int = N_CALIBRATION_BINS) -> dict | None:
    """The ECE a perfectly calibrated model with these confidences would show: its "noise floor".

    Consistency resampling (Bröcker & Smith 2007; Vaicenavicius et al. 2019): ``n_draws`` times, every image
    is right with probability its confidence, and the draw's ECE is computed with the same bins as
    ``expected_calibration_error``. Returns {"mean", "p95"} of those ECEs, ``p_value``: the fraction of draws
    with ECE >= ``observed_ece`` (small: more miscalibration than sampling noise explains), and ``n_draws``;
    None without images or without an observed ECE.
    """
    confidence = np.asarray(confidence, float)
    n = len(confidence)
    if n == 0 or observed_ece is None or n_draws < 1:
        return None
    # Images sorted by bin, so one reduceat sums each bin's hits; empty bins add nothing to the ECE.
    which = calibration_bin(confidence, n_bins)
    order = np.argsort(which, kind="stable")
    confidence, which = confidence[order], which[order]
    starts = np.flatnonzero(np.r_[True, which[1:] != which[:-1]])
    confidence_sums = np.add.reduceat(confidence, starts)
    rng = np.random.default_rng(seed)
    eces = np.empty(n_draws)
    chunk = max(1, _DRAW_ELEMENTS // n)  # draws simulated at once: bounded memory for 100k images
    for first in range(0, n_draws, chunk):
        size = min(chunk, n_draws - first)
        hits = np.add.reduceat(rng.random((size, n)) < confidence, starts, axis=1, dtype=np.int64)
        # sum over bins of count/n * |hits/count - confidence sum/count|
        eces[first:first + size] = np.abs(hits - confidence_sums).sum(axis=1) / n
    # The observed ECE is summed in another order: a draw equal to it must not miss by a rounding error.
    exceeds = eces >= observed_ece - 1e-12
    return {"mean": float(eces.mean()), "p95": float(np.percentile(eces, 95)),
            "p_value": float(exceeds.mean()), "n_draws": int(n_draws)}


def _calibration(valid: pd.DataFrame, probs: np.ndarray | None, correct: np.ndarray, num_classes: int,
                 seed: int = 0) -> dict:
    """log loss, ECE, its noise floor (``ece_if_calibrated``) and reliability bins; None (and empty bins)
    without probabilities."""
    if probs is None or len(valid) == 0:
        _, empty = expected_calibration_error([], [])
        return {"log_loss": None, "ece": None, "ece_if_calibrated": None, "reliability": empty}
    # Probabilities read back from a CSV are rounded; renormalise so sklearn sees rows summing to 1.
    sums = probs.sum(axis=1, keepdims=True)
    probs = np.divide(probs, sums, out=np.full_like(probs, 1 / num_classes), where=sums > 0)
    pred = valid["y_pred"].to_numpy(int)
    confidence = valid["confidence"].to_numpy(float) if "confidence" in valid else np.full(len(valid), np.nan)
    confidence = np.where(np.isnan(confidence), probs[np.arange(len(pred)), pred], confidence)
    ece, bins = expected_calibration_error(confidence, correct)
    loss = log_loss(valid["y_true"].to_numpy(int), probs, labels=list(range(num_classes)))
    return {"log_loss": _num(loss), "ece": ece, "ece_if_calibrated": ece_if_calibrated(confidence, ece, seed=seed),
            "reliability": bins}


# --------------------------------------------------------------------------- report sections

def _per_class(y: np.ndarray, pred: np.ndarray, correct: np.ndarray, classes: Sequence[str],
               ci: float) -> list[dict]:
    k = len(classes)
    if len(y):
        precision, _, f1, _ = precision_recall_fscore_support(y, pred, labels=list(range(k)), zero_division=0)
    else:
        precision = f1 = np.zeros(k)
    rows = []
    for c, name in enumerate(classes):
        mask = y == c
        # accuracy = recall, a proportion: Wilson score interval (module docstring).
        accuracy = wilson_ci(correct[mask].sum(), mask.sum(), ci)
        rows.append({"class": name, "support": int(mask.sum()), "accuracy": accuracy,
                     "precision": float(precision[c]), "f1": float(f1[c])})
    return rows


def _confusion(y: np.ndarray, pred: np.ndarray, k: int) -> tuple[list, list]:
    cm = np.zeros((k, k), dtype=int)
    np.add.at(cm, (y, pred), 1)
    support = cm.sum(axis=1)
    normalized = [(cm[i] / support[i]).tolist() if support[i] else None for i in range(k)]
    return cm.tolist(), normalized


def _subgroups(valid: pd.DataFrame, classes: Sequence[str], correct: np.ndarray,
               ci: float) -> tuple[dict, dict]:
    """(subgroups, masks): per dimension [{"group", "n", "accuracy"}], and the masks for the gaps."""
    dims = subgroup_masks(valid, classes)
    groups = {
        dim: [{"group": label, "n": int(mask.sum()),
               "accuracy": wilson_ci(correct[mask].sum(), mask.sum(), ci)}
              for label, mask in groups]
        for dim, groups in dims.items()
    }
    return groups, dims


def subgroup_gap(groups: list[dict], masks: list[tuple[str, np.ndarray]], correct: np.ndarray,
                 weights: np.ndarray, ci: float, min_group_size: int) -> dict | None:
    """Largest accuracy gap between groups with n >= min_group_size (best minus worst), with the
    bootstrap CI of that pair's difference; None with fewer than 2 such groups (nothing to compare)."""
    eligible = [(g, m) for g, (_, m) in zip(groups, masks)
                if g["n"] >= min_group_size and g["accuracy"]["value"] is not None]
    if len(eligible) < 2:
        return None
    best = max(eligible, key=lambda e: e[0]["accuracy"]["value"])
    worst = min(eligible, key=lambda e: e[0]["accuracy"]["value"])
    gap = bootstrap_ci(lambda w: weighted_rate(w, correct, best[1]) - weighted_rate(w, correct, worst[1]),
                       weights, ci)
    return {"largest_gap": gap["value"], "best_group": best[0]["group"], "worst_group": worst[0]["group"],
            "ci_low": gap["ci_low"], "ci_high": gap["ci_high"]}


def _worst_class(per_class: list[dict]) -> dict | None:
    present = [c for c in per_class if c["accuracy"]["value"] is not None]
    if not present:
        return None
    worst = min(present, key=lambda c: c["accuracy"]["value"])
    return {"class": worst["class"], "accuracy": worst["accuracy"]["value"]}


def evaluate_predictions(df: pd.DataFrame, classes: Sequence[str], n_boot: int = 1000, seed: int = 0,
                         ci: float = 0.95, min_group_size: int = 10,
                         heads: Mapping[str, Sequence[str]] | None = None) -> dict:
    """The evaluation report's figures for one model's predictions table (JSON-serialisable).

    Keys: classes, n, n_errors, ci_level, n_boot, proportion_ci ("wilson"), accuracy, balanced_accuracy,
    macro_f1, log_loss, ece, ece_if_calibrated (the ECE's noise floor), reliability, per_class, confusion_matrix,
    confusion_matrix_normalized, subgroups, subgroup_gaps, worst_class, n_race_unlabelled, heads. See the
    module docstring for the intervals (Wilson for accuracies, bootstrap for the rest).

    ``heads``: {extra head: its classes}; each head the table scored gets the same keys under
    ``heads[name]`` (its subgroups empty), plus ``n_unlabelled``: images without that head's label.
    """
    race = race_labelled(df)
    evaluation = _evaluate_head(race, classes, n_boot, seed, ci, min_group_size)
    evaluation["n_race_unlabelled"] = len(df) - len(race)
    evaluation["heads"] = {}
    for name, head_classes in (heads or {}).items():
        table = head_table(df, name)
        if table is not None:
            evaluation["heads"][name] = {**_evaluate_head(table, head_classes, n_boot, seed, ci, min_group_size),
                                         "n_unlabelled": len(df) - len(table)}
    return evaluation


def _evaluate_head(df: pd.DataFrame, classes: Sequence[str], n_boot: int, seed: int, ci: float,
                   min_group_size: int) -> dict:
    classes = list(classes)
    k = len(classes)
    valid, n_errors = clean_predictions(df, classes)
    y = valid["y_true"].to_numpy(int)
    pred = valid["y_pred"].to_numpy(int)
    correct = (y == pred).astype(float)
    weights = bootstrap_weights(len(y), n_boot, seed)

    per_class = _per_class(y, pred, correct, classes, ci)
    # Macro-F1 over classes present, like balanced accuracy: a class absent from the set has no F1.
    f1_present = [c["f1"] for c in per_class if c["support"]]
    cm, cm_normalized = _confusion(y, pred, k)
    subgroups, masks = _subgroups(valid, classes, correct, ci)
    gaps = {dim: subgroup_gap(subgroups[dim], masks[dim], correct, weights, ci, min_group_size)
            for dim in subgroups}
    return {
        "classes": classes,
        "n": int(len(y)),
        "n_errors": n_errors,
        "ci_level": ci,
        "n_boot": n_boot,
        # accuracies (overall, per class, per group) have Wilson score intervals; the rest, bootstrap ones
        "proportion_ci": "wilson",
        "accuracy": wilson_ci(correct.sum(), len(correct), ci),
        "balanced_accuracy": bootstrap_ci(lambda w: balanced_rate(w, y, correct, k), weights, ci),
        "macro_f1": float(np.mean(f1_present)) if f1_present else None,
        **_calibration(valid, probability_matrix(valid, k), correct, k, seed),
        "per_class": per_class,
        "confusion_matrix": cm,
        "confusion_matrix_normalized": cm_normalized,
        "subgroups": subgroups,
        "subgroup_gaps": gaps,
        "worst_class": _worst_class(per_class),
    }
