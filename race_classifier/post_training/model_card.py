"""MODEL_CARD.md (Mitchell et al. 2019, "Model Cards for Model Reporting"), filled from a model's own
checkpoint and its validation figures: what it is, how it was trained and changed afterwards, every figure
per group with its interval, its calibration, and its intended and out-of-scope uses."""
from __future__ import annotations

from collections import Counter
from datetime import datetime, timezone
from pathlib import Path

from jinja2 import Environment, FileSystemLoader, StrictUndefined

from race_classifier.data.manifest import Sample
from race_classifier.evaluation.calibration import (
    MIN_CALIBRATION_IMAGES,
    TEMPERATURE_BOUNDS,
)
from race_classifier.evaluation.formatting import (
    fmt_ece_floor,
    fmt_interval,
    fmt_num,
    fmt_pct,
    fmt_points,
)
from race_classifier.heads import HeadLayout, head_targets
from race_classifier.labels import Taxonomy
from race_classifier.models import mobilefacenet
from race_classifier.models.ensemble import describe_ensemble
from race_classifier.models.merged import describe_merge
from race_classifier.version import __version__

MODEL_CARD = "MODEL_CARD.md"
CARD_TEMPLATE = "model_card.md.j2"
TEMPLATE_DIR = Path(__file__).resolve().parent / "templates"
# The card's section headings, in order (Mitchell et al. 2019).
CARD_SECTIONS = ("Model details", "Intended use", "Out-of-scope uses", "Factors", "Metrics",
                 "Calibration and abstention", "Training and evaluation data", "Ethical considerations",
                 "Caveats and recommendations")


def calibration_warnings(calibration: dict) -> list[str]:
    """What makes this calibration unreliable, one sentence each (empty: nothing): too few images
    (``MIN_CALIBRATION_IMAGES``), a temperature on a bound of its search; each extra head's likewise."""
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
                       or "none (random initialisation)") + (
            "; the race layer started as a linear probe of them (LP-FT)"
            if train_args.get("head_init") == "linear_probe" else ""),
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
    out = []
    for i, head in enumerate(heads.extra, 1):
        counts = {}
        for split, samples in (("val", val_samples), ("train", train_samples)):
            if samples is None:
                counts[split] = ["n/a"] * len(head.classes)
                continue
            column = head_targets(heads, samples, f"{split} manifest")[:, i]
            counts[split] = [int((column == k).sum()) for k in range(len(head.classes))]
        out.append({"name": head.name, "range_rule": _range_rule(heads.age_bins) if head.name == "age" else "",
                    "title": {"gender": "Gender", "age": "Age group"}.get(head.name, head.name),
                    "classes": list(head.classes), "evaluation": evaluation["heads"].get(head.name),
                    "calibration": (calibration.get("heads") or {}).get(head.name),
                    "counts": [{"name": c, "train": counts["train"][k], "val": counts["val"][k]}
                               for k, c in enumerate(head.classes)]})
    return out


def _post_training_change(train_args: dict, where: str = "race biases") -> str | None:
    """What ``race-classifier rebalance`` changed after training, for the card (None: nothing)."""
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
        changes.insert(0, f"the model is an ensemble: it answers with {describe_ensemble(ensemble)} (the training "
                          "details above are the first member's)")
    return "; then ".join(c for c in changes if c) or None


def _merged_classes_change(merge: dict | None) -> str | None:
    """What ``race-classifier merge-classes`` changed, for the card (None: nothing)."""
    if not merge:
        return None
    return (f"the model answers in classes merged from those it was trained in: the race probabilities of "
            f"`{merge.get('source', 'n/a')}` (temperature {merge.get('temperature', 1.0):.3f}) are summed, "
            f"{describe_merge(merge)}; the figures below are the merged classes'")


def describe_offsets(offsets: dict) -> str:
    """'Class +x.xx, ...' of the recall offsets ``rebalance --balance recall`` added (stored form)."""
    return ", ".join(f"{c} {v:+.2f}" for c, v in offsets.items() if v) or "none needed"


def describe_cross_fit(cross_fit: dict) -> str:
    """'on faces they were not fitted on (2-fold cross-fit): accuracy A, worst class C R' (stored form)."""
    recalls = {c: r for c, r in cross_fit["recalls"].items() if r == r}  # NaN: a class with no faces
    worst = min(recalls, key=recalls.get)
    return (f"on faces they were not fitted on (2-fold cross-fit): accuracy {fmt_pct(cross_fit['accuracy'], 2)}, "
            f"worst class {worst} {fmt_pct(recalls[worst], 1)}")
