"""After training: calibrate best.pt on the validation set and write its model card.

``finalize_run`` (called at the end of every training run, and by ``race-classifier calibrate`` for
checkpoints trained before it existed):

1. scores the validation set with best.pt, keeping the raw logits;
2. fits a temperature (``evaluation.calibration.fit_temperature``) and an abstention threshold answering
   ``coverage`` of the validation faces; a model with gender/age heads gets a temperature per head too,
   under ``calibration["heads"][name]``, each fitted on the images labelled for that head (the threshold
   stays race-only);
3. stores them in best.pt under ``calibration`` (re-saved atomically, every other key kept; last.pt is
   never touched, so ``--resume`` works as before);
4. writes MODEL_CARD.md beside the checkpoint (post_training/model_card.py), from the run's own figures.

A fit on fewer than ``MIN_CALIBRATION_IMAGES`` (200) validation images, or a temperature on a bound of its
search (stored as ``calibration["at_search_bound"]``, per head too), is warned about (log and console) and
said in the model card: such a temperature is unreliable (``evaluation.calibration``'s docstring).

    race-classifier calibrate --model_path runs/x/best.pt --val_txt val.txt [--coverage 0.95]
"""
from __future__ import annotations

import argparse
import logging
from pathlib import Path

import numpy as np
import torch

from race_classifier.data.manifest import Sample, read_manifest
from race_classifier.evaluation.calibration import (
    abstention_summary,
    at_search_bound,
    choose_threshold,
    fit_temperature,
    nll,
    softmax,
)
from race_classifier.evaluation.formatting import fmt_ece_floor, fmt_pct
from race_classifier.evaluation.metrics import (
    ece_if_calibrated,
    evaluate_predictions,
    expected_calibration_error,
)
from race_classifier.evaluation.runner import predict_logits, predictions_table
from race_classifier.heads import head_targets
from race_classifier.labels import Taxonomy, get_mapping, get_taxonomy, load_label_map
from race_classifier.models.bundled import bundled_names, resolve_arguments
from race_classifier.models.checkpoint import load_checkpoint
from race_classifier.models.loaders import load_predictor
from race_classifier.post_training.model_card import (
    MODEL_CARD,
    calibration_warnings,
    render_model_card,
)
from race_classifier.post_training.options import DEFAULT_COVERAGE
from race_classifier.utils import atomic_torch_save, atomic_write_text

log = logging.getLogger("race_classifier.calibrate")



def calibrate_logits(logits: np.ndarray, labels: np.ndarray, coverage: float = DEFAULT_COVERAGE,
                     seed: int = 0) -> dict:
    """Temperature, ECE/NLL before and after (with the calibrated ECE's noise floor, ``ece_if_calibrated``),
    and the abstention threshold, from readable rows only."""
    logits, labels = np.asarray(logits, np.float64), np.asarray(labels, np.int64)
    temperature = fit_temperature(logits, labels)
    before, after = softmax(logits), softmax(logits, temperature)
    correct = (before.argmax(1) == labels).astype(float)  # the same for both: T > 0 keeps the argmax
    confidence = after.max(1)
    threshold = choose_threshold(confidence, coverage)
    abstention = abstention_summary(confidence, correct, threshold, coverage)
    ece_after = expected_calibration_error(confidence, correct)[0]
    return {
        "temperature": temperature,
        "at_search_bound": at_search_bound(temperature),
        "ece_before": expected_calibration_error(before.max(1), correct)[0],
        "ece_after": ece_after,
        "ece_if_calibrated": ece_if_calibrated(confidence, ece_after, seed=seed),
        "nll_before": nll(logits, labels),
        "nll_after": nll(logits, labels, temperature),
        "abstention": {k: abstention[k] for k in ("threshold", "target_coverage", "coverage",
                                                  "accuracy_at_coverage", "accuracy_all")},
    }


def calibrate_head(logits: np.ndarray, labels: np.ndarray, seed: int = 0) -> dict:
    """A gender or age head's temperature, with ECE and NLL before and after (and the calibrated ECE's
    noise floor), from its labelled rows."""
    logits, labels = np.asarray(logits, np.float64), np.asarray(labels, np.int64)
    temperature = fit_temperature(logits, labels)
    before, after = softmax(logits), softmax(logits, temperature)
    correct = (before.argmax(1) == labels).astype(float)
    ece_after = expected_calibration_error(after.max(1), correct)[0]
    return {"temperature": temperature, "at_search_bound": at_search_bound(temperature),
            "ece_before": expected_calibration_error(before.max(1), correct)[0],
            "ece_after": ece_after, "ece_if_calibrated": ece_if_calibrated(after.max(1), ece_after, seed=seed),
            "nll_before": nll(logits, labels), "nll_after": nll(logits, labels, temperature),
            "n": int(len(labels))}


def finalize_run(best_path: str | Path, val_samples: list[Sample], *, val_txt: str | Path,
                 train_samples: list[Sample] | None = None, train_txt: str | Path | None = None,
                 coverage: float = DEFAULT_COVERAGE, batch_size: int = 64, workers: int = 0,
                 device: str | torch.device = "cpu", n_boot: int = 1000, seed: int = 0,
                 model_card: bool = True, epochs_run: int | None = None) -> dict | None:
    """Calibrate ``best_path`` on ``val_samples`` (labels in its taxonomy), store the result in it and write
    MODEL_CARD.md beside it. Returns the ``calibration`` dict, or None when there was nothing to fit
    (no best.pt, or no readable validation image)."""
    best_path = Path(best_path)
    if not best_path.is_file():
        log.warning("no %s: nothing to calibrate, no model card written", best_path)
        return None
    ckpt = load_checkpoint(best_path)
    predictor = load_predictor(best_path, device=device)
    heads = predictor.heads
    logits, errors = predict_logits(predictor, val_samples, batch_size, workers, desc="calibrating", all_heads=True)
    if errors:  # left out of the fit and the card's figures, and said so
        shown = "; ".join(f"{val_samples[i].path}: {reason}" for i, reason in sorted(errors.items())[:10])
        log.warning("skipped %d unreadable validation image(s) of %s: %s%s", len(errors), val_txt, shown,
                    " ..." if len(errors) > 10 else "")
    ok = ~np.isnan(logits).any(axis=1)
    parts = heads.split(logits)
    # Multi-task validation sets keep images without a race label (-1) for the other heads.
    labels = np.array([s.label for s in val_samples], dtype=np.int64)
    race_rows = ok & (labels >= 0)
    if not race_rows.any():
        log.warning("no readable race-labelled validation image: %s is not calibrated, no model card written",
                    best_path)
        return None
    calibration = calibrate_logits(parts["race"][race_rows], labels[race_rows], coverage, seed)
    calibration.update(fitted_on=str(val_txt), n=int(race_rows.sum()))
    head_truth = {}
    if heads.extra:
        head_truth = dict(zip(heads.names[1:], head_targets(heads, val_samples, str(val_txt))[:, 1:].T))
        calibration["heads"] = {}
        for head in heads.extra:
            rows = ok & (head_truth[head.name] >= 0)
            if not rows.any():
                log.warning("no validation image labelled for the %s head: its temperature stays 1", head.name)
                continue
            calibration["heads"][head.name] = calibrate_head(parts[head.name][rows], head_truth[head.name][rows],
                                                             seed)
    ckpt["calibration"] = calibration
    atomic_torch_save(ckpt, best_path)
    a = calibration["abstention"]
    print(f"Calibrated {best_path} on {calibration['n']} validation images: temperature "
          f"{calibration['temperature']:.3f}, ECE {calibration['ece_before']:.4f} -> {calibration['ece_after']:.4f} "
          f"(perfectly calibrated: {fmt_ece_floor(calibration['ece_if_calibrated'])}); "
          f"abstention threshold {a['threshold']:.4f} answers {100 * a['coverage']:.1f}% "
          f"(accuracy {fmt_pct(a['accuracy_at_coverage'], 2)} vs {fmt_pct(a['accuracy_all'], 2)} on all)", flush=True)
    for name, c in calibration.get("heads", {}).items():
        print(f"  {name} head on {c['n']} images: temperature {c['temperature']:.3f}, "
              f"ECE {c['ece_before']:.4f} -> {c['ece_after']:.4f} "
              f"(perfectly calibrated: {fmt_ece_floor(c['ece_if_calibrated'])})", flush=True)
    for warning in calibration_warnings(calibration):
        log.warning("%s: %s", best_path, warning)
        print(f"Warning: {warning}", flush=True)

    if model_card:
        def calibrated(name: str, temperature: float) -> np.ndarray:
            probs = np.full(parts[name].shape, np.nan)
            probs[ok] = softmax(parts[name][ok], temperature)
            return probs

        head_temperatures = {n: c["temperature"] for n, c in calibration.get("heads", {}).items()}
        head_probs = {h.name: calibrated(h.name, head_temperatures.get(h.name, 1.0)) for h in heads.extra}
        table = predictions_table(val_samples, calibrated("race", calibration["temperature"]), errors,
                                  predictor.taxonomy.num_classes, heads, head_probs, str(val_txt))
        evaluation = evaluate_predictions(table, list(predictor.taxonomy.classes), n_boot=n_boot, seed=seed,
                                          heads={h.name: list(h.classes) for h in heads.extra})
        card = render_model_card(ckpt, evaluation, calibration, predictor.taxonomy, val_samples=val_samples,
                                 val_txt=val_txt, train_samples=train_samples, train_txt=train_txt,
                                 checkpoint=best_path, epochs_run=epochs_run, heads=heads)
        atomic_write_text(best_path.parent / MODEL_CARD, card)
        print(f"Model card: {best_path.parent / MODEL_CARD}", flush=True)
    return calibration


# --- race-classifier calibrate ----------------------------------------------------------------------------

def training_label_mapping(train_args: dict, taxonomy: Taxonomy, source_spec: str | None = None,
                           label_map: str | None = None):
    """How manifest labels become ``taxonomy``'s classes: as the run was trained (its --source_taxonomy and
    --label_map) unless ``source_spec``/``label_map`` say otherwise; None when they are its classes."""
    source_spec = source_spec or train_args.get("source_taxonomy")
    label_map = label_map or train_args.get("label_map")
    if not (source_spec or label_map):
        return None
    source = get_taxonomy(source_spec) if source_spec else taxonomy
    return get_mapping(source, taxonomy, load_label_map(label_map) if label_map else None)


def output_path(out_dir: str | Path, *model_paths: str | Path) -> Path:
    """``out_dir``/best.pt for a post-training command, refused when ``out_dir`` holds one of its input models:
    their checkpoint (or model card) would be overwritten."""
    out = Path(out_dir) / "best.pt"
    for path in model_paths:
        if out.resolve().parent == Path(path).resolve().parent:
            raise ValueError(f"--out_dir {out_dir} is {path}'s own folder: it and its model card would be "
                             "overwritten; give another folder")
    return out


def read_manifests(val_txt, train_txt, taxonomy: Taxonomy, mapping, multi: bool) -> tuple:
    """(validation samples, training samples or None, train_txt or None) for calibration and the model card;
    a missing training manifest only costs the card its counts. ``multi`` (a model with gender/age heads)
    keeps images without a race label: they calibrate those heads."""
    val_samples = read_manifest(val_txt, taxonomy, mapping, check_files=False, keep_unlabelled=multi)
    train_samples = None
    if train_txt and Path(train_txt).is_file():
        train_samples = read_manifest(train_txt, taxonomy, mapping, check_files=False, keep_unlabelled=multi)
    elif train_txt:
        log.warning("training manifest %s not found: the model card gives no training counts", train_txt)
        train_txt = None
    return val_samples, train_samples, train_txt


def run(args: argparse.Namespace) -> int:
    if not 0 < args.coverage <= 1:
        raise ValueError(f"--coverage must be in (0, 1], got {args.coverage}")
    bundled = not Path(args.model_path).exists() and args.model_path in bundled_names()
    resolve_arguments(args, "model_path", checkpoint=True)
    ckpt = load_checkpoint(args.model_path)
    if args.out_dir:  # a copy that holds its own weights (a bundled seed5.pt shares fairface7.pt's)
        out = output_path(args.out_dir, args.model_path)
        out.parent.mkdir(parents=True, exist_ok=True)
        ckpt.pop("weights_from", None)
        atomic_torch_save(ckpt, out)
        args.model_path = str(out)
    elif bundled:
        raise ValueError(f"{args.model_path} is a model installed with the package: give --out_dir for the "
                         "recalibrated copy")
    taxonomy = Taxonomy.from_dict(ckpt["taxonomy"])
    train_args = ckpt.get("train_args") or {}
    mapping = training_label_mapping(train_args, taxonomy, args.source_taxonomy, args.label_map)
    val_samples, train_samples, train_txt = read_manifests(
        args.val_txt, args.train_txt or train_args.get("train_txt"), taxonomy, mapping, bool(ckpt.get("heads")))
    result = finalize_run(args.model_path, val_samples, val_txt=args.val_txt, train_samples=train_samples,
                          train_txt=train_txt, coverage=args.coverage, batch_size=args.batch_size,
                          workers=args.workers, device=args.device, n_boot=args.n_boot, seed=args.seed,
                          model_card=not args.no_model_card)
    if result is None:
        raise ValueError(f"{args.model_path} was not calibrated: no readable image in {args.val_txt}")
    return 0
