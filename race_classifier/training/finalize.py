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
4. writes MODEL_CARD.md beside the checkpoint (Mitchell et al. 2019), filled from the run's own figures.

A fit on fewer than ``MIN_CALIBRATION_IMAGES`` (200) validation images, or a temperature on a bound of its
search (stored as ``calibration["at_search_bound"]``, per head too), is warned about (log and console) and
said in the model card: such a temperature is unreliable (``evaluation.calibration``'s docstring).

    race-classifier calibrate --model_path runs/x/best.pt --val_txt val.txt [--coverage 0.95]
"""
from __future__ import annotations

import argparse
import logging
from collections import Counter
from datetime import datetime, timezone
from pathlib import Path

from typing import TYPE_CHECKING

from race_classifier.models.bundled import bundled_names, resolve_arguments
from race_classifier.utils import atomic_torch_save

if TYPE_CHECKING:  # the CLI parser imports this module for every subcommand: heavy imports happen when used
    import numpy as np
    import torch

    from race_classifier.data.manifest import Sample
    from race_classifier.heads import HeadLayout
    from race_classifier.labels import Taxonomy

log = logging.getLogger("race_classifier.calibrate")

MODEL_CARD = "MODEL_CARD.md"
CARD_TEMPLATE = "model_card.md.j2"
TEMPLATE_DIR = Path(__file__).resolve().parents[1] / "evaluation" / "templates"
# The card's section headings, in order (Mitchell et al. 2019, "Model Cards for Model Reporting").
CARD_SECTIONS = ("Model details", "Intended use", "Out-of-scope uses", "Factors", "Metrics",
                 "Calibration and abstention", "Training and evaluation data", "Ethical considerations",
                 "Caveats and recommendations")
DEFAULT_COVERAGE = 0.95


def calibrate_logits(logits: np.ndarray, labels: np.ndarray, coverage: float = DEFAULT_COVERAGE,
                     seed: int = 0) -> dict:
    """Temperature, ECE/NLL before and after (with the calibrated ECE's noise floor, ``ece_if_calibrated``),
    and the abstention threshold, from readable rows only."""
    import numpy as np

    from race_classifier.evaluation.calibration import (abstention_summary, at_search_bound, choose_threshold,
                                                        fit_temperature, nll, softmax)
    from race_classifier.evaluation.metrics import ece_if_calibrated, expected_calibration_error
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
    import numpy as np

    from race_classifier.evaluation.calibration import at_search_bound, fit_temperature, nll, softmax
    from race_classifier.evaluation.metrics import ece_if_calibrated, expected_calibration_error
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


def calibration_warnings(calibration: dict) -> list[str]:
    """What makes this calibration unreliable, one sentence each (empty: nothing): too few images
    (``MIN_CALIBRATION_IMAGES``), a temperature on a bound of its search; each extra head's likewise."""
    from race_classifier.evaluation.calibration import MIN_CALIBRATION_IMAGES, TEMPERATURE_BOUNDS
    low, high = TEMPERATURE_BOUNDS

    def about(c: dict, what: str) -> list[str]:
        out = []
        n = c.get("n")
        if n is not None and n < MIN_CALIBRATION_IMAGES:
            out.append(f"{what} was fitted on only {n} validation images (fewer than {MIN_CALIBRATION_IMAGES}): "
                       "it is rough; calibrate again on a larger validation set")
        if c.get("at_search_bound"):
            t = c["temperature"]
            effect = ("every face gets nearly the same probability for every class (the model does no better "
                      "than chance on these images)" if t > 1 else
                      "every face gets a probability of nearly 1 for its predicted class")
            out.append(f"{what} {t:.3f} sits on a bound of its search [{low:g}, {high:g}]: the fit found no "
                       f"minimum, so it is unreliable; with it {effect}")
        return out

    warnings = about(calibration, "the temperature")
    for name, head in (calibration.get("heads") or {}).items():
        warnings += about(head, f"the {name} head's temperature")
    return warnings


def finalize_run(best_path: str | Path, val_samples: list[Sample], *, val_txt: str | Path,
                 train_samples: list[Sample] | None = None, train_txt: str | Path | None = None,
                 coverage: float = DEFAULT_COVERAGE, batch_size: int = 64, workers: int = 0,
                 device: str | torch.device = "cpu", n_boot: int = 1000, seed: int = 0,
                 model_card: bool = True, epochs_run: int | None = None) -> dict | None:
    """Calibrate ``best_path`` on ``val_samples`` (labels in its taxonomy), store the result in it and write
    MODEL_CARD.md beside it. Returns the ``calibration`` dict, or None when there was nothing to fit
    (no best.pt, or no readable validation image)."""
    import numpy as np

    from race_classifier.evaluation.calibration import softmax
    from race_classifier.evaluation.formatting import fmt_ece_floor, fmt_pct
    from race_classifier.evaluation.metrics import evaluate_predictions
    from race_classifier.evaluation.runner import predict_logits, predictions_table
    from race_classifier.heads import targets_tensor
    from race_classifier.models.checkpoint import load_checkpoint
    from race_classifier.models.loaders import load_predictor
    from race_classifier.utils import atomic_torch_save, atomic_write_text
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
        head_truth = dict(zip(heads.names[1:], targets_tensor(heads, val_samples, str(val_txt)).numpy()[:, 1:].T))
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


# --- the model card -------------------------------------------------------------------------------------

def _counts(samples: list[Sample] | None, taxonomy: Taxonomy) -> list[int] | None:
    if samples is None:
        return None
    counts = Counter(s.label for s in samples)  # -1 (no race label) is not a class: not counted
    return [counts.get(i, 0) for i in range(taxonomy.num_classes)]


def render_model_card(ckpt: dict, evaluation: dict, calibration: dict, taxonomy: Taxonomy, *,
                      val_samples: list[Sample], val_txt, train_samples: list[Sample] | None = None,
                      train_txt=None, checkpoint: Path | None = None, epochs_run: int | None = None,
                      heads: HeadLayout | None = None) -> str:
    """The card's markdown. ``heads``: the model's layout; its gender/age heads get their own figures
    (``evaluation["heads"]``, ``calibration["heads"]``) and caveats."""
    from jinja2 import Environment, FileSystemLoader, StrictUndefined

    from race_classifier.evaluation.formatting import fmt_ece_floor, fmt_interval, fmt_num, fmt_pct, fmt_points

    from race_classifier import __version__
    env = Environment(loader=FileSystemLoader(str(TEMPLATE_DIR)), autoescape=False, undefined=StrictUndefined,
                      trim_blocks=True, lstrip_blocks=True, keep_trailing_newline=True)
    env.filters.update(pct=lambda v, digits=2: fmt_pct(v, digits), ci=lambda e, digits=2: fmt_interval(e, digits),
                       num=lambda v, digits=4: fmt_num(v, digits), ece_floor=fmt_ece_floor,
                       points=lambda v, digits=2: fmt_points(v, digits))
    train_args = ckpt.get("train_args") or {}
    val_counts, train_counts = _counts(val_samples, taxonomy), _counts(train_samples, taxonomy)
    context = {
        "sections": CARD_SECTIONS,
        "dataset": train_args.get("dataset") or "n/a",
        "arch": ckpt.get("arch"),
        "taxonomy": taxonomy,
        "preprocessing": ckpt.get("preprocessing") or {},
        "version": __version__,
        "date": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "trained_at": ckpt.get("saved_at") or "not recorded in the checkpoint",
        "checkpoint": str(checkpoint) if checkpoint else "n/a",
        "best_epoch": ckpt.get("epoch"),
        "epochs_run": "n/a" if epochs_run is None else epochs_run,
        "num_epochs": train_args.get("num_epochs"),
        "pretrained": (train_args.get("initialised_from") or train_args.get("pretrained")
                       or "none (random initialisation)"),
        "backbone_provenance": _backbone_provenance(ckpt),
        "seed": train_args.get("seed"),
        "model_ema_decay": train_args.get("model_ema_decay"),
        "distillation": {"weight": train_args.get("distill_weight"), "file": train_args["soft_labels"],
                         "teachers": train_args.get("soft_label_teachers") or "n/a"}
        if train_args.get("soft_labels") else None,
        "best_metric": train_args.get("best_metric"),
        "post_training": _post_training_changes(ckpt),
        "evaluation": evaluation,
        "subgroups": {dim: evaluation["subgroups"].get(dim) or [] for dim in ("gender", "age", "age_group")},
        "heads": _card_heads(heads, evaluation, calibration, val_samples, train_samples),
        "age_bins": heads.age_bins.describe() if heads is not None and heads.age_bins else None,
        "calibration": calibration,
        "calibration_warnings": calibration_warnings(calibration),
        "abstention": calibration.get("abstention") or {},
        "train_txt": str(train_txt or train_args.get("train_txt") or "n/a"),
        "val_txt": str(val_txt),
        "class_counts": [{"name": c, "train": train_counts[i] if train_counts else "n/a", "val": val_counts[i]}
                         for i, c in enumerate(taxonomy.classes)],
        "n_train": len(train_samples) if train_samples is not None else "n/a",
        "n_val": len(val_samples),
        "n_val_unlabelled": sum(s.label < 0 for s in val_samples),
        "n_train_unlabelled": sum(s.label < 0 for s in train_samples or ()),
    }
    return env.get_template(CARD_TEMPLATE).render(**context)


def _backbone_provenance(ckpt: dict) -> dict | None:
    """The face-recognition MobileFaceNet's origin and licence caveat, for any model built on it."""
    from race_classifier.models import mobilefacenet
    if not mobilefacenet.uses_mobilefacenet(ckpt):
        return None
    return {"origin": mobilefacenet.PROVENANCE, "warning": mobilefacenet.LICENCE_WARNING}


def _range_rule(bins) -> str:
    """What the range rule does to FairFace's 10-19 in these groups, for the card's caveat."""
    group = bins.index("10-19")
    if group is None:
        return "FairFace's 10-19 range is split evenly between two groups and left unlabelled"
    name, lower = bins.names[group], bins.lower[group]
    text = f"FairFace's 10-19 range is counted as {name}"
    if lower > 10:
        text += f", so 10-{lower - 1}-year-olds are counted as {name}"
    elif group + 1 < len(bins.lower) and bins.lower[group + 1] <= 19:
        text += f", so {bins.lower[group + 1]}-19-year-olds are counted as {name}"
    return text


def _card_heads(heads: HeadLayout | None, evaluation: dict, calibration: dict, val_samples, train_samples) -> list[dict]:
    """Per extra head: its title, classes, figures, calibration and label counts for the card."""
    if heads is None or not heads.extra:
        return []
    from race_classifier.heads import targets_tensor
    out = []
    for i, head in enumerate(heads.extra, 1):
        counts = {}
        for split, samples in (("val", val_samples), ("train", train_samples)):
            if samples is None:
                counts[split] = ["n/a"] * len(head.classes)
                continue
            column = targets_tensor(heads, samples, f"{split} manifest").numpy()[:, i]
            counts[split] = [int((column == k).sum()) for k in range(len(head.classes))]
        out.append({"name": head.name, "range_rule": _range_rule(heads.age_bins) if head.name == "age" else "", "title": {"gender": "Gender", "age": "Age group"}.get(head.name, head.name),
                    "classes": list(head.classes), "evaluation": evaluation["heads"].get(head.name),
                    "calibration": (calibration.get("heads") or {}).get(head.name),
                    "counts": [{"name": c, "train": counts["train"][k], "val": counts["val"][k]}
                               for k, c in enumerate(head.classes)]})
    return out


def _post_training_change(train_args: dict, where: str = "race biases") -> str | None:
    """What ``race-classifier rebalance`` changed after training, for the card (None: nothing)."""
    from race_classifier.evaluation.formatting import fmt_pct
    from race_classifier.training.rebalance import describe_cross_fit, describe_offsets
    balance = train_args.get("last_layer_rebalance")
    if balance is None:
        return None
    source = train_args.get("rebalanced_from", "n/a")
    if balance != "recall":
        return (f"the race layer of `{source}` was refitted on its frozen features with `{balance}` sample "
                f"weights (last-layer rebalancing)")
    cross_fit = train_args.get("recall_offsets_cross_fit")
    return (f"per-class offsets ({describe_offsets(train_args.get('recall_offsets') or {})}) were added to the "
            f"{where} of `{source}` so that every class's recall on "
            f"the validation set below reaches {fmt_pct(train_args.get('min_recall'), 0)} where they can; fitted on "
            "it, so its figures are optimistic"
            + (f"; {describe_cross_fit(cross_fit)}" if cross_fit else ""))


def _post_training_changes(ckpt: dict) -> str | None:
    """Every change made after training, in the order made (None: none)."""
    merge, ensemble = ckpt.get("merged_classes"), ckpt.get("ensemble")
    on_merged = bool(merge and merge.get("offsets"))  # recall offsets fitted on the merged model
    where = "merged race logits" if on_merged else "averaged race logits" if ensemble else "race biases"
    changes = [_post_training_change(ckpt.get("train_args") or {}, where), _merged_classes_change(merge)]
    if on_merged:
        changes.reverse()
    if ensemble:  # made first, from the trained members
        from race_classifier.models.ensemble import describe_ensemble
        changes.insert(0, f"the model is an ensemble: it answers with {describe_ensemble(ensemble)} (the training "
                          "details above are the first member's)")
    return "; then ".join(c for c in changes if c) or None


def _merged_classes_change(merge: dict | None) -> str | None:
    """What ``race-classifier merge-classes`` changed, for the card (None: nothing)."""
    if not merge:
        return None
    from race_classifier.models.merged import describe_merge
    return (f"the model answers in classes merged from those it was trained in: the race probabilities of "
            f"`{merge.get('source', 'n/a')}` (temperature {merge.get('temperature', 1.0):.3f}) are summed, "
            f"{describe_merge(merge)}; the figures below are the merged classes'")


# --- race-classifier calibrate ----------------------------------------------------------------------------

def add_arguments(p: argparse.ArgumentParser) -> argparse.ArgumentParser:
    p.add_argument("--model_path", required=True, help="a race-classifier checkpoint (best.pt), rewritten in place "
                   "unless --out_dir is given, or a bundled model (seed5, fairface7; needs --out_dir)")
    p.add_argument("--out_dir", help="write the recalibrated model and its card to <out_dir>/best.pt instead")
    p.add_argument("--val_txt", required=True, help="validation manifest to fit the temperature and threshold on "
                   "(never the test set you report)")
    p.add_argument("--coverage", type=float, default=DEFAULT_COVERAGE,
                   help="share of validation faces the abstention threshold answers (default 0.95)")
    p.add_argument("--train_txt", help="training manifest, for the model card's counts "
                   "(default: the one the checkpoint was trained on, when it exists)")
    p.add_argument("--source_taxonomy", help="taxonomy of the manifest's labels, when it differs "
                   "(default: as in training)")
    p.add_argument("--label_map", help="YAML overriding the label mapping (default: as in training)")
    p.add_argument("--no_model_card", action="store_true", help="do not write MODEL_CARD.md beside the model")
    p.add_argument("--batch_size", type=int, default=64, help="images per model call while scoring --val_txt")
    p.add_argument("--workers", type=int, default=2, help="image-loading processes")
    p.add_argument("--n_boot", type=int, default=1000, help="bootstrap resamples for the card's balanced-accuracy and "
                   "gap intervals (accuracies get Wilson score intervals)")
    p.add_argument("--seed", type=int, default=0, help="seeds the bootstrap and the ECE noise floor's draws")
    p.add_argument("--device", default="cpu", help="cpu, cuda, cuda:1, ...")
    return p


def training_label_mapping(train_args: dict, taxonomy: Taxonomy, source_spec: str | None = None,
                           label_map: str | None = None):
    """How manifest labels become ``taxonomy``'s classes: as the run was trained (its --source_taxonomy and
    --label_map) unless ``source_spec``/``label_map`` say otherwise; None when they are its classes."""
    from race_classifier.labels import get_mapping, get_taxonomy, load_label_map
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
    from race_classifier.data.manifest import read_manifest
    val_samples = read_manifest(val_txt, taxonomy, mapping, check_files=False, keep_unlabelled=multi)
    train_samples = None
    if train_txt and Path(train_txt).is_file():
        train_samples = read_manifest(train_txt, taxonomy, mapping, check_files=False, keep_unlabelled=multi)
    elif train_txt:
        log.warning("training manifest %s not found: the model card gives no training counts", train_txt)
        train_txt = None
    return val_samples, train_samples, train_txt


def run(args: argparse.Namespace) -> int:
    from race_classifier.labels import Taxonomy
    from race_classifier.models.checkpoint import load_checkpoint

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
