"""Classification metrics from scikit-learn, summarised per class.

A class with no examples has no accuracy (None), never 0% or 100%.
"""
from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from sklearn.metrics import confusion_matrix


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
