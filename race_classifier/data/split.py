"""Train/validation splits by identity, and mapping records to a target taxonomy: what ``prepare`` and
``prepare mix`` share. Validation is split off by identity (no person on both sides), stratified by source
class and seeded, before mapping, so a seed holds out the same images in every taxonomy."""
from __future__ import annotations

import logging
import warnings
from collections import Counter
from dataclasses import replace

import numpy as np
from sklearn.model_selection import StratifiedGroupKFold, StratifiedKFold

from race_classifier.data.sources import PrepareError, Record
from race_classifier.labels import LabelMapping, UnknownLabelError

log = logging.getLogger("race_classifier.data.prepare")


def check_val_fraction(val_fraction: float) -> int:
    """The number of folds for ``val_fraction`` (validation is one fold)."""
    if not 0 < val_fraction <= 0.5:
        raise PrepareError(f"val_fraction must be in (0, 0.5], got {val_fraction}")
    n_splits = round(1 / val_fraction)
    if abs(1 / n_splits - val_fraction) > 0.005:  # e.g. 0.4: one fold of 2
        log.warning("val_fraction %g holds out one of %d stratified folds: about %.1f%% of the identities",
                    val_fraction, n_splits, 100 / n_splits)
    return n_splits


def split_by_identity(records: list[Record], val_fraction: float = 0.1, seed: int = 0) -> tuple[list[Record], list[Record]]:
    """(train, val): no identity on both sides, stratified by ``label``, the same for the same seed.

    Validation is fold 0 of ``round(1 / val_fraction)`` stratified group folds.
    """
    n_splits = check_val_fraction(val_fraction)
    if not records:
        raise PrepareError("no images to split")
    groups = np.array([r.identity for r in records])
    labels = np.array([r.label for r in records])
    n_groups = len(np.unique(groups))
    if n_groups < n_splits:
        raise PrepareError(f"only {n_groups} identities: val_fraction {val_fraction} needs at least {n_splits} "
                           "(one fold of identities becomes validation)")
    folds = _fold_splitter(n_splits, seed, singletons=n_groups == len(records))
    with warnings.catch_warnings():
        # Sparse classes draw sklearn's generic warning; we name the classes left out of val instead.
        warnings.simplefilter("ignore", UserWarning)
        try:
            train_idx, val_idx = next(folds.split(np.zeros(len(records)), labels, groups))
        except ValueError as e:
            raise PrepareError(f"cannot split {len(records)} images into {n_splits} folds "
                               f"(val_fraction {val_fraction}): {e}") from None
    return [records[i] for i in train_idx], [records[i] for i in val_idx]


def _fold_splitter(n_splits: int, seed: int, singletons: bool):
    if singletons:
        # Every identity has one image (FairFace, UTKFace), so plain stratified folds keep identities
        # apart just as well; StratifiedGroupKFold's per-group loop takes ~10 s on 35,000 images.
        return StratifiedKFold(n_splits=n_splits, shuffle=True, random_state=seed)
    return StratifiedGroupKFold(n_splits=n_splits, shuffle=True, random_state=seed)


def map_records(records: list[Record], mapping: LabelMapping) -> tuple[list[Record], Counter]:
    """Records relabelled with target class names, and a count of dropped images per source class."""
    mapped: list[Record] = []
    dropped: Counter = Counter()
    for record in records:
        try:
            source_index = mapping.source.index(record.label)
        except UnknownLabelError as e:
            raise PrepareError(f"{record.path}: {e}") from None
        target_index = mapping(source_index)
        if target_index is None:
            dropped[mapping.source.classes[source_index]] += 1
        else:
            mapped.append(replace(record, label=mapping.target.classes[target_index]))
    return mapped, dropped


def split_then_map(records: list[Record], mapping: LabelMapping, val_fraction: float,
                   seed: int) -> tuple[list[Record], list[Record], Counter]:
    """(train, val, dropped): split in the source's labels, then map both sides. The same seed thus holds
    out the same images whatever the target taxonomy, so models trained in different taxonomies are
    compared on the same faces."""
    require_images(*map_records(records, mapping), "")
    train, val = split_by_identity(records, val_fraction, seed)
    (train, dropped), (val, val_dropped) = map_records(train, mapping), map_records(val, mapping)
    return train, val, dropped + val_dropped


def require_images(records: list[Record], dropped: Counter, what: str) -> None:
    if not records:
        dropped_text = f" ({sum(dropped.values())} dropped by the label mapping)" if dropped else ""
        raise PrepareError(f"no {what}images left to write{dropped_text}")
