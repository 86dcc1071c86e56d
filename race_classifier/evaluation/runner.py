"""Scoring a model on a labelled image set: one row per image, unreadable images included with their error.

The predictions table (a pandas DataFrame) is what metrics, comparison and the report consume:
path, y_true, y_pred (-1 when unreadable), confidence, prob_0..prob_{K-1}, gender, age, error.
Predictions in another taxonomy than the evaluated one are mapped by the tables training uses
(probabilities of merged classes are summed; dropped classes removed and the rest renormalised).

A model with gender/age heads adds, per head, ``<head>_y_true`` (-1: not labelled), ``<head>_y_pred``,
``<head>_confidence`` and ``<head>_prob_<k>``, in the classes of the *scored* layout (``scored_heads``:
the evaluated model's own); with an age head, ``age_group`` is the image's true group by name. A baseline's
heads are summed into those classes (``heads.class_map``). y_true is -1 for an image whose race is not
labelled, kept only for the other heads (a multi-task manifest).
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd

from race_classifier.data.dataset import eval_loader
from race_classifier.data.manifest import Sample, read_manifest
from race_classifier.data.sources import scan_folder_tree
from race_classifier.heads import AgeBins, Head, HeadLayout, class_map, head_targets
from race_classifier.labels import LabelMapping, Taxonomy, get_mapping
from race_classifier.models.loaders import Predictor
from race_classifier.utils import atomic_write_text, progress_bar


def load_eval_samples(taxonomy: Taxonomy, *, root_dir: str | None = None, val_txt: str | None = None,
                      mapping: LabelMapping | None = None, keep_unlabelled: bool = False) -> list[Sample]:
    """The evaluated images from a folder tree or a manifest. Missing files are kept: they become
    rows with an error, so the report accounts for every listed image. ``keep_unlabelled`` (a model with
    gender/age heads): manifest images without a race label are kept (label -1) for those heads."""
    if bool(root_dir) == bool(val_txt):
        raise ValueError("give exactly one of --root_dir and --val_txt")
    if val_txt:
        return read_manifest(val_txt, taxonomy, mapping, check_files=False, keep_unlabelled=keep_unlabelled)
    source = mapping.source if mapping else taxonomy
    samples = []
    for record in scan_folder_tree(root_dir, source):
        index = mapping.map_label(record.label) if mapping else taxonomy.index(record.label)
        if index is not None:
            samples.append(Sample(record.path, index, record.gender, record.age))
    if not samples:
        raise ValueError(f"no images found under {root_dir}")
    return samples


def map_probabilities(probs: np.ndarray, mapping: LabelMapping) -> np.ndarray:
    """(N, K_source) -> (N, K_target): sum merged classes, drop dropped ones, renormalise."""
    out = np.zeros((len(probs), mapping.target.num_classes), dtype=np.float64)
    for source_index, target_index in enumerate(mapping.table):
        if target_index is not None:
            out[:, target_index] += probs[:, source_index]
    return _renormalised(out)


def _renormalised(out: np.ndarray) -> np.ndarray:
    total = out.sum(axis=1, keepdims=True)
    return np.divide(out, total, out=np.full_like(out, 1.0 / out.shape[1]), where=total > 0)


def scored_heads(model_heads: HeadLayout, race_classes) -> HeadLayout:
    """The heads an evaluation scores: race in ``race_classes``, the model's gender head as it is, and its age
    head in its own age groups, or, for a head without groups (FairFace's 9 ranges), in the default groups
    (heads.DEFAULT_AGE_BINS), into which its ranges are summed."""
    heads, bins = [Head("race", tuple(race_classes))], None
    for head in model_heads.extra:
        if head.name == "age":
            bins = model_heads.age_bins or AgeBins.parse()
            head = Head("age", bins.names)
        heads.append(head)
    return HeadLayout(tuple(heads), bins)


def head_truth(heads: HeadLayout, samples: list[Sample], source: str) -> dict[str, np.ndarray]:
    """{extra head: each sample's true class index in ``heads``, -1 where not labelled (or, for gender, a
    class the model does not have)}. A malformed age raises HeadError naming ``source`` and the line."""
    targets = head_targets(heads, samples, source)
    return {h.name: targets[:, i + 1] for i, h in enumerate(heads.extra)}


def _table(samples: list[Sample], probs: np.ndarray | None, errors: dict[int, str], num_classes: int,
           heads: HeadLayout | None = None, head_probs: dict[str, np.ndarray] | None = None,
           source: str = "manifest") -> pd.DataFrame:
    n = len(samples)
    probs = np.full((n, num_classes), np.nan) if probs is None else probs
    ok = ~np.isnan(probs).any(axis=1)
    y_pred = np.where(ok, np.nan_to_num(probs).argmax(axis=1), -1)
    table = pd.DataFrame({
        "path": [s.path for s in samples],
        "y_true": [s.label for s in samples],
        "y_pred": y_pred,
        "confidence": np.where(ok, np.nan_to_num(probs).max(axis=1), np.nan),
    })
    for k in range(num_classes):
        table[f"prob_{k}"] = probs[:, k]
    table["gender"] = [s.gender for s in samples]
    table["age"] = [s.age for s in samples]
    head_probs = head_probs or {}
    truth = head_truth(heads, samples, source) if head_probs else {}
    for head in (heads.extra if heads is not None else ()):
        if head.name not in head_probs:
            continue
        p = head_probs[head.name]
        readable = ~np.isnan(p).any(axis=1)
        table[f"{head.name}_y_true"] = truth[head.name]
        table[f"{head.name}_y_pred"] = np.where(readable, np.nan_to_num(p).argmax(axis=1), -1)
        table[f"{head.name}_confidence"] = np.where(readable, np.nan_to_num(p).max(axis=1), np.nan)
        for k in range(len(head.classes)):
            table[f"{head.name}_prob_{k}"] = p[:, k]
        if head.name == "age":
            table["age_group"] = [head.classes[i] if i >= 0 else "" for i in truth["age"]]
    table["error"] = [errors.get(i, "") for i in range(n)]
    return table


def predict_samples(predictor: Predictor, samples: list[Sample], taxonomy: Taxonomy,
                    batch_size: int = 64, workers: int = 2, desc: str = "evaluating",
                    heads: HeadLayout | None = None, source: str = "manifest") -> pd.DataFrame:
    """Run ``predictor`` over ``samples`` (labels in ``taxonomy``) and return the predictions table.

    ``heads`` (``scored_heads`` of the evaluated model): also score the predictor's gender/age heads in
    those classes, those it has (a head it lacks gets no columns). ``source`` names the data in errors."""
    mapping = None if predictor.taxonomy.classes == taxonomy.classes else get_mapping(predictor.taxonomy, taxonomy)
    head_maps = {h.name: m for h in (heads.extra if heads is not None else ())
                 if (m := class_map(predictor.heads, heads, h.name)) is not None}
    loader = eval_loader(samples, predictor.preprocessing, batch_size, workers)
    probs = np.full((len(samples), taxonomy.num_classes), np.nan)
    head_probs = {name: np.full((len(samples), m.shape[1]), np.nan) for name, m in head_maps.items()}
    errors: dict[int, str] = {}
    for batch in progress_bar(loader, desc):
        errors.update(batch["failures"])
        if batch["images"] is None:
            continue
        rows = batch["indices"].numpy()
        p = predictor.predict_heads(batch["images"], only=("race", *head_maps))  # one forward pass for all heads
        probs[rows] = map_probabilities(p["race"], mapping) if mapping else p["race"]
        for name, m in head_maps.items():
            head_probs[name][rows] = _renormalised(p[name].astype(np.float64) @ m)
    return _table(samples, probs, errors, taxonomy.num_classes, heads, head_probs, source)


def predict_logits(predictor: Predictor, samples: list[Sample], batch_size: int = 64, workers: int = 2,
                   desc: str = "scoring", all_heads: bool = False) -> tuple[np.ndarray, dict[int, str]]:
    """(raw logits (N, K) over the predictor's own classes, NaN rows for unreadable images; {index: error}).
    No temperature is applied: what calibration is fitted on. ``all_heads``: every head's logits side by
    side (N, predictor.heads.num_outputs), race first."""
    loader = eval_loader(samples, predictor.preprocessing, batch_size, workers)
    width = predictor.heads.num_outputs if all_heads else predictor.taxonomy.num_classes
    logits = np.full((len(samples), width), np.nan)
    errors: dict[int, str] = {}
    for batch in progress_bar(loader, desc):
        errors.update(batch["failures"])
        if batch["images"] is not None:
            run = predictor.all_logits if all_heads else predictor.logits
            logits[batch["indices"].numpy()] = run(batch["images"]).numpy()
    return logits, errors


def predictions_table(samples: list[Sample], probs: np.ndarray, errors: dict[int, str], num_classes: int,
                      heads: HeadLayout | None = None, head_probs: dict[str, np.ndarray] | None = None,
                      source: str = "manifest") -> pd.DataFrame:
    """The predictions table from probabilities already computed (NaN rows: unreadable images); ``head_probs``:
    {extra head of ``heads``: its probabilities}."""
    return _table(samples, probs, errors, num_classes, heads, head_probs, source)


def predictions_from_csv(csv_path: str | Path, samples: list[Sample], taxonomy: Taxonomy,
                         labels: Taxonomy | None = None) -> pd.DataFrame:
    """A predictions table from a CSV the user already has: path, a predicted label column
    (pred_label, predicted_label, prediction or label) and optional prob_<class> columns.

    Labels (and probability columns) are in ``labels`` (default: the evaluated taxonomy) and mapped
    into ``taxonomy``. Evaluated images the CSV does not cover become rows with an error.
    """
    csv_path = Path(csv_path)
    df = pd.read_csv(csv_path, dtype=str, keep_default_na=False)
    label_col = next((c for c in ("pred_label", "predicted_label", "prediction", "label") if c in df.columns), None)
    if "path" not in df.columns or label_col is None:
        raise ValueError(f"{csv_path}: needs a 'path' column and a predicted label column "
                         f"(pred_label, predicted_label, prediction or label); found {', '.join(df.columns)}")
    labels = labels or taxonomy
    mapping = None if labels.classes == taxonomy.classes else get_mapping(labels, taxonomy)
    prob_cols = [f"prob_{c}" for c in labels.classes]
    has_probs = all(c in df.columns for c in prob_cols)
    base = csv_path.resolve().parent
    kept = np.array([t is not None for t in mapping.table]) if mapping else np.ones(labels.num_classes, bool)
    rows, failed = {}, {}  # by resolved path: probabilities, or why the CSV gives none usable
    for line, rec in enumerate(df.to_dict("records"), 2):
        path = str((Path(rec["path"]) if Path(rec["path"]).is_absolute() else base / rec["path"]).resolve())
        if rec.get("error") or not rec[label_col]:  # e.g. an unreadable image in this tool's own CSV
            failed[path] = f"{csv_path.name}:{line}: {rec.get('error') or 'no predicted label'}"
            continue
        try:
            index = labels.index(rec[label_col])
            if has_probs:
                p = np.array([[float(rec[c]) for c in prob_cols]])
            else:
                p = np.zeros((1, labels.num_classes))
                p[0, index] = 1.0
        except ValueError as e:
            raise ValueError(f"{csv_path}:{line}: {e}") from None
        if not p[0, kept].sum() > 0:  # all of it on classes the evaluated taxonomy drops: no answer in it
            failed[path] = (f"{csv_path.name}:{line}: predicted {rec[label_col]!r}, which {taxonomy.name} does "
                            "not have")
            continue
        rows[path] = map_probabilities(p, mapping)[0] if mapping else p[0]
    probs = np.full((len(samples), taxonomy.num_classes), np.nan)
    errors = {}
    for i, s in enumerate(samples):
        key = str(Path(s.path).resolve())
        found = rows.get(key)
        if found is None:
            errors[i] = failed.get(key) or f"no prediction for this image in {csv_path.name}"
        else:
            probs[i] = found
    table = _table(samples, probs, errors, taxonomy.num_classes)
    if not has_probs:  # labels only: calibration figures would be meaningless
        table = table.drop(columns=[f"prob_{k}" for k in range(taxonomy.num_classes)])
    return table


# The CSV's name of each head's columns: true_<key>, pred_<key>, <key>_confidence, prob_<key>_<class>.
CSV_HEAD_KEYS = {"gender": "gender", "age": "age_group"}


def write_predictions_csv(table: pd.DataFrame, classes: list[str] | tuple[str, ...], path: str | Path,
                          heads: HeadLayout | None = None) -> None:
    """The per-image CSV users read: class names instead of indices, one probability column per class;
    with ``heads``, each extra head the table scored: true_<head>, pred_<head>, <head>_confidence,
    prob_<head>_<class>, correct_<head> (true_ empty where the image is not labelled for that head)."""
    ok = table["error"] == ""
    labelled = table["y_true"] >= 0
    out = pd.DataFrame({
        "path": table["path"],
        "true_label": [classes[i] if i >= 0 else "" for i in table["y_true"]],
        "predicted_label": [classes[i] if i >= 0 else "" for i in table["y_pred"]],
        "confidence": table["confidence"].round(6),
    })
    for k, name in enumerate(classes):
        if f"prob_{k}" in table:
            out[f"prob_{name}"] = table[f"prob_{k}"].round(6)
    out["correct"] = np.where(ok & labelled, table["y_true"] == table["y_pred"], "")
    out["gender"], out["age"] = table["gender"], table["age"]
    for head in (heads.extra if heads is not None else ()):
        if f"{head.name}_y_pred" not in table:
            continue
        key, y_true, y_pred = CSV_HEAD_KEYS.get(head.name, head.name), table[f"{head.name}_y_true"], table[f"{head.name}_y_pred"]
        out[f"true_{key}"] = [head.classes[i] if i >= 0 else "" for i in y_true]
        out[f"pred_{key}"] = [head.classes[i] if i >= 0 else "" for i in y_pred]
        out[f"{key}_confidence"] = table[f"{head.name}_confidence"].round(6)
        for k, name in enumerate(head.classes):
            out[f"prob_{key}_{name}"] = table[f"{head.name}_prob_{k}"].round(6)
        out[f"correct_{key}"] = np.where(ok & (y_true >= 0), y_true == y_pred, "")
    out["error"] = table["error"]
    atomic_write_text(path, out.to_csv(index=False))
