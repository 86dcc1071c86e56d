"""The audit report: one self-contained HTML file (inline CSS, inline PNG plots and JPEG thumbnails).

It opens offline: nothing is fetched from a network, no CDN, fonts or scripts. Every figure is shown per
group with its confidence interval (95% unless the evaluation says otherwise) where the evaluation provides
one. File names and class names are user data, so the template is rendered with autoescaping on and no HTML
is built in Python.
"""
from __future__ import annotations

import base64
import io
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import pandas as pd
from jinja2 import Environment, FileSystemLoader, StrictUndefined
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from race_classifier.data.image_io import load_rgb
from race_classifier.evaluation.formatting import (
    _missing,
    ci_label,
    fmt_ci,
    fmt_count,
    fmt_ece_floor,
    fmt_num,
    fmt_p,
    fmt_pct,
    fmt_points,
    fmt_pp,
    fmt_pp_ci,
    fmt_value,
)
from race_classifier.utils import atomic_write_text

TEMPLATE_DIR = Path(__file__).resolve().parent / "templates"
TEMPLATE_NAME = "report.html.j2"

THUMBNAIL_PX = 96
MAX_UNREADABLE_LISTED = 50
SUBGROUP_TITLES = {"gender": "Gender", "age": "Age", "age_group": "Age group (the model's groups)",
                   "race_x_gender": "Race \u00d7 gender"}
HEAD_TITLES = {"gender": "Gender head", "age": "Age-group head"}

# Colours that stay distinguishable for the common colour-vision deficiencies.
BLUE, ORANGE, GREY = "#0072B2", "#D55E00", "#999999"


def _environment() -> Environment:
    env = Environment(loader=FileSystemLoader(str(TEMPLATE_DIR)), autoescape=True, undefined=StrictUndefined,
                      trim_blocks=True, lstrip_blocks=True)
    env.filters.update(pct=fmt_pct, pp=fmt_pp, ci=fmt_ci, num=fmt_num, integer=fmt_count, points=fmt_points, p=fmt_p,
                       value=fmt_value, ece_floor=lambda floor: fmt_ece_floor(floor, percent=True))
    env.globals["pp_ci"] = fmt_pp_ci
    return env


# ------------------------------------------------------------------------------------------- small helpers

def _class_name(classes: list[str], index) -> str:
    """A class index (or a name already) as its name; out-of-range indices stay visible, never crash."""
    if isinstance(index, str):
        return index
    if _missing(index):
        return "n/a"
    i = int(index)
    if i == -1:
        return "(unreadable)"
    return str(classes[i]) if 0 <= i < len(classes) else f"class #{i}"


def _text(value) -> str:
    """A cell of the predictions table as text: NaN/None become ''."""
    return "" if _missing(value) else str(value)


def _mpl_text(value) -> str:
    """Matplotlib reads $...$ as mathtext; a class name is plain text."""
    return str(value).replace("$", r"\$")


def _file_name(path) -> str:
    text = _text(path)
    return Path(text).name or text


def _labels(predictions: pd.DataFrame, column: str) -> pd.Series:
    """An integer label column; a missing prediction (NaN) counts as unreadable (-1)."""
    return pd.to_numeric(predictions[column], errors="coerce").fillna(-1).astype(int)


def _unreadable_mask(predictions: pd.DataFrame) -> pd.Series:
    mask = _labels(predictions, "y_pred") < 0
    if "error" in predictions:
        mask |= predictions["error"].map(_text).str.len() > 0
    return mask


# ------------------------------------------------------------------------------------------------- plots

def _new_figure(width: float, height: float):
    # Figure + the Agg canvas directly: no pyplot, no global backend switch, nothing left open.
    fig = Figure(figsize=(width, height))
    FigureCanvasAgg(fig)
    return fig


def _png(fig) -> str:
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=100, bbox_inches="tight", metadata={"Software": None})
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode("ascii")


def plot_per_class_accuracy(per_class: list[dict], overall: float | None, worst: str | None,
                            level: str = "95%") -> str | None:
    """Horizontal bars of per-class accuracy with CI whiskers; classes without images say so."""
    if not per_class:
        return None
    names = [_mpl_text(row["name"]) for row in per_class]
    fig = _new_figure(7, 0.45 * len(per_class) + 1.3)
    ax = fig.add_subplot()
    for y, row in enumerate(per_class):
        acc = row["accuracy"]
        value = acc.get("value")
        if _missing(value):
            ax.text(0.01, y, "n/a (no images)", va="center", fontsize=9, color=GREY)
            continue
        value = float(value)
        colour = ORANGE if row["name"] == worst else BLUE
        ax.barh(y, value, color=colour, height=0.6)
        low, high = acc.get("ci_low"), acc.get("ci_high")
        if not (_missing(low) or _missing(high)):
            ax.errorbar(value, y, xerr=[[max(value - float(low), 0)], [max(float(high) - value, 0)]],
                        fmt="none", ecolor="black", capsize=4, linewidth=1)
        ax.text(min(value, 1.0) + 0.01, y + 0.28, f"{100 * value:.1f}%", fontsize=8, va="center")
    label = f"Accuracy (recall) with {level} CI"
    if not _missing(overall):
        ax.axvline(float(overall), color=GREY, linestyle="--", linewidth=1)
        label += "; dashed line: overall accuracy"
    ax.set_yticks(range(len(names)), names)
    ax.invert_yaxis()
    ax.set_xlim(0, 1.08)
    ax.set_xlabel(label)
    ax.xaxis.set_major_formatter(lambda x, _: f"{100 * x:.0f}%")
    ax.grid(axis="x", alpha=0.3)
    return _png(fig)


def plot_confusion(matrix: list[list], classes: list[str], normalized: bool) -> str | None:
    """A heat map with the class names on both axes and each cell's number written in it."""
    k = len(matrix)
    if k == 0:
        return None
    values = np.array([[np.nan] * k if row is None else [np.nan if _missing(v) else float(v) for v in row]
                       for row in matrix], dtype=float)
    names = [_mpl_text(_class_name(classes, i)) for i in range(k)]
    side = max(4.0, 0.7 * k + 2.0)
    fig = _new_figure(side + 1.0, side)
    ax = fig.add_subplot()
    cmap = "Blues"
    vmax = 1.0 if normalized else max(float(np.nanmax(values)) if np.isfinite(values).any() else 1.0, 1.0)
    image = ax.imshow(np.ma.masked_invalid(values), cmap=cmap, vmin=0, vmax=vmax)
    fig.colorbar(image, ax=ax, fraction=0.046, pad=0.04)
    fontsize = max(5, min(10, int(80 / k)))
    for i in range(k):
        for j in range(k):
            v = values[i, j]
            if np.isnan(v):
                text, colour = "n/a", GREY
            else:
                text = f"{100 * v:.1f}%" if normalized else f"{int(v)}"
                colour = "white" if v > 0.6 * vmax else "black"
            ax.text(j, i, text, ha="center", va="center", fontsize=fontsize, color=colour)
    ax.set_xticks(range(k), names, rotation=45, ha="right")
    ax.set_yticks(range(k), names)
    ax.set_xlabel("Predicted class")
    ax.set_ylabel("True (annotated) class")
    ax.set_title("Row-normalised (each row sums to 100%)" if normalized else "Counts")
    return _png(fig)


def plot_reliability(bins: list[dict], ece) -> str | None:
    """Reliability diagram: each confidence bin's accuracy against its mean confidence, with its count."""
    filled = [b for b in bins if b.get("count") and not _missing(b.get("accuracy"))]
    if not filled:
        return None
    fig = _new_figure(6, 6.5)
    grid = fig.add_gridspec(2, 1, height_ratios=[3, 1], hspace=0.08)
    ax = fig.add_subplot(grid[0])
    ax_count = fig.add_subplot(grid[1], sharex=ax)
    ax.plot([0, 1], [0, 1], linestyle="--", color=GREY, label="perfect calibration")
    for b in filled:
        lo, hi = float(b["lo"]), float(b["hi"])
        ax.bar((lo + hi) / 2, float(b["accuracy"]), width=(hi - lo) * 0.9, color=BLUE, alpha=0.8,
               edgecolor="black", linewidth=0.5)
        if not _missing(b.get("confidence")):
            ax.plot(float(b["confidence"]), float(b["accuracy"]), "o", color=ORANGE, markersize=4)
    ax.plot([], [], "s", color=BLUE, label="accuracy in bin")
    ax.plot([], [], "o", color=ORANGE, label="mean confidence in bin")
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1.05)
    ax.set_ylabel("Accuracy")
    ax.set_title(f"Reliability diagram (ECE {fmt_pct(ece, 2)})")
    ax.legend(loc="upper left", fontsize=8)
    ax.grid(alpha=0.3)
    ax.tick_params(labelbottom=False)
    for b in bins:
        lo, hi = float(b["lo"]), float(b["hi"])
        count = int(b.get("count") or 0)
        ax_count.bar((lo + hi) / 2, count, width=(hi - lo) * 0.9, color=GREY)
        if count:
            ax_count.text((lo + hi) / 2, count, str(count), ha="center", va="bottom", fontsize=7)
    ax_count.set_xlabel("Confidence (top predicted probability)")
    ax_count.set_ylabel("Images")
    ax_count.margins(y=0.25)
    return _png(fig)


def plot_comparison_diffs(rows: list[dict], name_a: str, name_b: str, level: str = "95%") -> str | None:
    """Per-class accuracy difference A − B with its CI; significant differences in orange."""
    rows = [r for r in rows if not _missing(r.get("diff"))]
    if not rows:
        return None
    fig = _new_figure(7, 0.45 * len(rows) + 1.4)
    ax = fig.add_subplot()
    for y, row in enumerate(rows):
        diff = float(row["diff"])
        colour = ORANGE if row.get("significant") else BLUE
        ax.plot(diff, y, "o", color=colour)
        low, high = row.get("ci_low"), row.get("ci_high")
        if not (_missing(low) or _missing(high)):
            ax.errorbar(diff, y, xerr=[[max(diff - float(low), 0)], [max(float(high) - diff, 0)]],
                        fmt="none", ecolor=colour, capsize=4)
    ax.axvline(0, color="black", linewidth=1)
    ax.set_yticks(range(len(rows)), [_mpl_text(r.get("name", "")) for r in rows])
    ax.invert_yaxis()
    ax.set_xlabel(_mpl_text(f"Accuracy difference, {name_a} \u2212 {name_b} (percentage points, {level} CI)"))
    ax.xaxis.set_major_formatter(lambda x, _: f"{100 * x:+.0f}" if round(100 * x) else "0")
    ax.grid(axis="x", alpha=0.3)
    ax.set_title("Orange: significant difference", fontsize=9)
    return _png(fig)


# ------------------------------------------------------------------------------------------- thumbnails

def thumbnail_data_uri(path, size: int = THUMBNAIL_PX) -> tuple[str | None, str | None]:
    """(JPEG data URI, None), or (None, why) when the image cannot be read: a report never fails on one."""
    try:
        image = load_rgb(_text(path), draft_size=2 * size)
        image.thumbnail((size, size))
        buffer = io.BytesIO()
        image.save(buffer, format="JPEG", quality=80)
        return "data:image/jpeg;base64," + base64.b64encode(buffer.getvalue()).decode("ascii"), None
    except Exception as e:  # noqa: BLE001 - any failure becomes a placeholder
        return None, getattr(e, "reason", None) or f"{type(e).__name__}: {e}"


# ------------------------------------------------------------------------------------------ the sections

def _summary(evaluation: dict, classes: list[str]) -> dict:
    worst = evaluation.get("worst_class") or {}
    return {
        "accuracy": evaluation.get("accuracy") or {},
        "balanced_accuracy": evaluation.get("balanced_accuracy") or {},
        "macro_f1": evaluation.get("macro_f1"),
        "ece": evaluation.get("ece"),
        "ece_if_calibrated": evaluation.get("ece_if_calibrated"),
        "calibration": evaluation.get("calibration"),  # the ECE before the model's temperature, when it has one
        "log_loss": evaluation.get("log_loss"),
        "n": evaluation.get("n"),
        "n_errors": evaluation.get("n_errors"),
        "worst_class": _class_name(classes, worst["class"]) if worst.get("class") is not None else None,
        "worst_accuracy": worst.get("accuracy"),
        "abstention": evaluation.get("abstention"),
    }


def _per_class(evaluation: dict, classes: list[str]) -> list[dict]:
    return [{"name": _class_name(classes, row.get("class", i)), "support": row.get("support"),
             "accuracy": row.get("accuracy") or {}, "precision": row.get("precision"), "f1": row.get("f1")}
            for i, row in enumerate(evaluation.get("per_class") or [])]


def _confusion(evaluation: dict, classes: list[str]) -> dict:
    counts = evaluation.get("confusion_matrix") or []
    normalized = evaluation.get("confusion_matrix_normalized")
    if normalized is None:
        normalized = [[c / sum(row) for c in row] if sum(row) else None for row in counts]
    return {
        "names": [_class_name(classes, i) for i in range(len(counts))],
        "counts": counts,
        "counts_png": plot_confusion(counts, classes, normalized=False),
        "normalized_png": plot_confusion(normalized, classes, normalized=True),
    }


def _subgroups(evaluation: dict) -> list[dict]:
    groups = evaluation.get("subgroups") or {}
    gaps = evaluation.get("subgroup_gaps") or {}
    order = [d for d in SUBGROUP_TITLES if d in groups] + [d for d in groups if d not in SUBGROUP_TITLES]
    tables = []
    for dim in order:
        rows = groups.get(dim) or []
        if not rows:
            continue
        tables.append({
            "dim": dim,
            "title": SUBGROUP_TITLES.get(dim, dim.replace("_", " ").capitalize()),
            "rows": [{"group": _text(r.get("group")), "n": r.get("n"), "accuracy": r.get("accuracy") or {}}
                     for r in rows],
            "gap": gaps.get(dim),
        })
    return tables


def _heads(evaluation: dict) -> list[dict]:
    """One section per extra head (gender, age group): its summary, per-class accuracy and confusion."""
    sections = []
    for name, ev in (evaluation.get("heads") or {}).items():
        classes = [str(c) for c in ev.get("classes") or []]
        summary = _summary(ev, classes)
        per_class = _per_class(ev, classes)
        sections.append({
            "id": f"head-{name}",
            "title": HEAD_TITLES.get(name, f"{name.capitalize()} head"),
            "summary": summary,
            "n_unlabelled": ev.get("n_unlabelled"),
            "calibration": ev.get("calibration"),
            "per_class": per_class,
            "per_class_png": plot_per_class_accuracy(per_class, summary["accuracy"].get("value"),
                                                     summary["worst_class"], ci_label(ev.get("ci_level"))),
            "confusion": _confusion(ev, classes),
        })
    return sections


def _mistakes(predictions: pd.DataFrame, classes: list[str], limit: int) -> list[dict]:
    readable = predictions[~_unreadable_mask(predictions)]
    wrong = readable[_labels(readable, "y_pred") != _labels(readable, "y_true")]
    wrong = wrong.sort_values("confidence", ascending=False, kind="mergesort").head(max(limit, 0))
    gallery = []
    for row in wrong.itertuples(index=False):
        uri, problem = thumbnail_data_uri(row.path)
        gallery.append({"uri": uri, "problem": problem, "path": _text(row.path), "file": _file_name(row.path),
                        "true": _class_name(classes, row.y_true), "pred": _class_name(classes, row.y_pred),
                        "confidence": row.confidence})
    return gallery


def _counts(predictions: pd.DataFrame, classes: list[str]) -> dict:
    unreadable = _unreadable_mask(predictions)
    y_true = _labels(predictions, "y_true")
    y_pred = _labels(predictions, "y_pred")
    true_all = y_true.value_counts()
    true_bad = y_true[unreadable].value_counts()
    predicted = y_pred[~unreadable].value_counts()
    indices = sorted(set(range(len(classes))) | set(true_all.index) | set(predicted.index))
    rows = [{"name": _class_name(classes, i), "true": int(true_all.get(i, 0)),
             "unreadable": int(true_bad.get(i, 0)), "predicted": int(predicted.get(i, 0))} for i in indices]
    bad = predictions[unreadable]
    errors = bad["error"].map(_text) if "error" in bad else pd.Series([""] * len(bad), index=bad.index)
    listed = [{"path": _text(p), "error": e or "unreadable (no error message)"}
              for p, e in zip(bad["path"].head(MAX_UNREADABLE_LISTED), errors.head(MAX_UNREADABLE_LISTED))]
    return {"rows": rows, "total": len(predictions), "n_unreadable": len(bad), "unreadable": listed,
            "more": max(len(bad) - MAX_UNREADABLE_LISTED, 0)}


def _flatten(info: dict, prefix: str = "") -> list[tuple[str, str]]:
    items = []
    for key, value in info.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            items.extend(_flatten(value, f"{name}.") if value else [(name, "n/a")])
        else:
            items.append((name, fmt_value(value)))
    return items


def _model_name(info: dict | None, fallback: str) -> str:
    info = info or {}
    name = info.get("name") or (Path(str(info["path"])).name if info.get("path") else None)
    return f"{fallback}: {name}" if name else fallback


def _comparison(comparison: dict, model_info: dict) -> dict:
    name_a = _model_name(model_info, "A")
    name_b = _model_name(comparison.get("baseline_info"), "B")

    def rows(raw) -> list[dict]:
        out = []
        for r in raw or []:
            r = dict(r)
            significant = bool(r.get("significant"))
            diff = r.get("diff")
            r["better"] = ("A" if float(diff) > 0 else "B" if float(diff) < 0 else "\u2014") \
                if significant and not _missing(diff) else "\u2014"
            r["significant"] = significant
            out.append(r)
        return out

    overall = rows(comparison.get("overall"))
    per_class = rows(comparison.get("per_class"))
    subgroups = [{"title": SUBGROUP_TITLES.get(dim, dim), "rows": rows(raw)}
                 for dim, raw in (comparison.get("subgroups") or {}).items() if raw]
    headline = overall[0] if overall else None
    heads = [{"title": HEAD_TITLES.get(name, name), "overall": rows(raw.get("overall")),
              "per_class": rows(raw.get("per_class")), "n_common": raw.get("n_common")}
             for name, raw in (comparison.get("heads") or {}).items()]
    alpha = comparison.get("alpha")
    level = ci_label(None if _missing(alpha) else 1 - float(alpha))
    return {"name_a": name_a, "name_b": name_b, "n_common": comparison.get("n_common"),
            "n_dropped": comparison.get("n_dropped"), "n_only_a": comparison.get("n_only_a"),
            "n_only_b": comparison.get("n_only_b"), "alpha": "n/a" if _missing(alpha) else f"{float(alpha):g}",
            "overall": overall, "per_class": per_class, "subgroups": subgroups, "headline": headline, "heads": heads,
            "ci_label": level, "diff_png": plot_comparison_diffs(per_class, "A", "B", level)}


# ------------------------------------------------------------------------------------------------ entry

def render_report(evaluation: dict, predictions: pd.DataFrame, classes: list[str], model_info: dict,
                  out_path, comparison: dict | None = None, title: str | None = None,
                  *, max_mistakes: int = 24, data_source: str | None = None) -> None:
    """Write the audit report for one model (and, given ``comparison``, against a baseline) to ``out_path``.

    ``evaluation`` comes from metrics.evaluate_predictions, ``comparison`` from compare.compare_predictions;
    ``predictions`` has path, y_true, y_pred (-1 unreadable), confidence, gender, age, error (race-labelled
    rows: the mistakes and counts are the race head's). Each extra head in ``evaluation["heads"]`` gets a
    section of its own. ``data_source``: where the images came from (the manifest or folder), said under the title.
    """
    classes = [str(c) for c in classes]
    model_info = model_info or {}
    summary = _summary(evaluation, classes)
    per_class = _per_class(evaluation, classes)
    bins = evaluation.get("reliability") or []
    level = ci_label(evaluation.get("ci_level"))
    context = {
        "title": title or f"Audit report \u2014 {_model_name(model_info, 'model')}",
        "generated": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "data_source": data_source,
        "classes": classes,
        "summary": summary,
        "per_class": per_class,
        "ci_label": level,
        "per_class_png": plot_per_class_accuracy(per_class, summary["accuracy"].get("value"),
                                                 summary["worst_class"], level),
        "confusion": _confusion(evaluation, classes),
        "reliability": bins,
        "reliability_png": plot_reliability(bins, summary["ece"]),
        "subgroups": _subgroups(evaluation),
        "heads": _heads(evaluation),
        "mistakes": _mistakes(predictions, classes, max_mistakes),
        "max_mistakes": max_mistakes,
        "counts": _counts(predictions, classes),
        "model": _flatten(model_info),
        "comparison": _comparison(comparison, model_info) if comparison is not None else None,
    }
    html = _environment().get_template(TEMPLATE_NAME).render(**context)
    atomic_write_text(out_path, html)
