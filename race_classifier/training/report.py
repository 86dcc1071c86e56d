"""The epoch report: the brief's console lines and the CSV log row, built from the same figures."""
from __future__ import annotations

import csv
import io
import math
from pathlib import Path

from race_classifier.utils import atomic_write_text


def class_key(class_name: str) -> str:
    """'East Asian' -> 'East_Asian_accuracy': one token, usable as a CSV column name."""
    return "_".join(class_name.split()) + "_accuracy"


def _pct(value: float | None) -> str:
    return "n/a" if value is None or (isinstance(value, float) and math.isnan(value)) else f"{100 * value:.2f}%"


def source_key(source: str) -> str:
    """'utkface' -> 'val_utkface_accuracy'."""
    return f"val_{source}_accuracy"


HEAD_TITLES = {"gender": "Gender", "age": "Age group"}


def epoch_row(epoch: int, train_loss: float, train_acc: float | None, val: dict, classes: list[str],
              lr: float, epoch_time: float, skipped: int, heads=None, train_head_acc: dict | None = None,
              without_ema: dict | None = None) -> dict:
    """``heads``: the HeadLayout when the model has heads besides race; their figures get columns
    ``train_<head>_accuracy``, ``val_<head>_accuracy``, ``val_<head>_balanced_accuracy`` and
    ``val_<head>_<class>_accuracy`` after the race columns. ``val["sources"]`` (a mix's per-source race
    accuracy, from ``evaluate``) gets a ``val_<source>_accuracy`` column per source after the race classes.
    ``without_ema``: with a weight average, ``val`` is the average's and this the trained weights' evaluation;
    its loss and race accuracy get the last two columns."""
    present = [a for a in val["per_class_accuracy"] if a is not None]
    row = {
        "epoch": epoch,
        "train_loss": train_loss,
        "train_accuracy": train_acc,
        "val_loss": val["loss"],
        "val_accuracy": val["accuracy"],
        "val_balanced_accuracy": val["balanced_accuracy"],
        "val_worst_class_accuracy": min(present) if present else None,
    }
    for name, acc in zip(classes, val["per_class_accuracy"]):
        row[class_key(name)] = acc
    for source, acc in (val.get("sources") or {}).items():
        row[source_key(source)] = acc
    for head in heads.extra if heads is not None else ():
        summary = val["heads"][head.name]
        row[f"train_{head.name}_accuracy"] = (train_head_acc or {}).get(head.name)
        row[f"val_{head.name}_accuracy"] = summary["accuracy"]
        row[f"val_{head.name}_balanced_accuracy"] = summary["balanced_accuracy"]
        for name, acc in zip(head.classes, summary["per_class_accuracy"]):
            row[f"val_{head.name}_{class_key(name)}"] = acc
    row.update({"lr": lr, "epoch_time_s": epoch_time, "skipped_images": skipped})
    if without_ema is not None:
        row.update({"val_loss_without_ema": without_ema["loss"], "val_accuracy_without_ema": without_ema["accuracy"]})
    return row


def format_epoch(row: dict, num_epochs: int, classes: list[str], heads=None, sources: list[str] | None = None) -> str:
    lines = [
        f"Epoch {row['epoch']}/{num_epochs} | Train Loss: {row['train_loss']:.4f}, "
        f"Train Accuracy: {_pct(row['train_accuracy'])} | Val Loss: {row['val_loss']:.4f}, "
        f"Val Accuracy: {_pct(row['val_accuracy'])}",
        "Class-wise accuracies:",
    ]
    for name in classes:
        acc = row[class_key(name)]
        lines.append(f" - {class_key(name)}: {_pct(acc)}" + (" (no validation images)" if acc is None else ""))
    if sources:
        lines.append("Source-wise accuracies:")
        lines += [f" - {source_key(s)}: {_pct(row[source_key(s)])}" for s in sources]
    for head in heads.extra if heads is not None else ():
        lines.append(f"{HEAD_TITLES.get(head.name, head.name)}: Train Accuracy: "
                     f"{_pct(row[f'train_{head.name}_accuracy'])} | Val Accuracy: {_pct(row[f'val_{head.name}_accuracy'])}")
        for name in head.classes:
            acc = row[f"val_{head.name}_{class_key(name)}"]
            lines.append(f" - {class_key(name)}: {_pct(acc)}" + (" (no validation images)" if acc is None else ""))
    if "val_accuracy_without_ema" in row:  # the figures above are the weight average's
        lines.append(f"Without weight averaging: Val Loss: {row['val_loss_without_ema']:.4f}, "
                     f"Val Accuracy: {_pct(row['val_accuracy_without_ema'])}")
    return "\n".join(lines)


def _csv_text(rows: list[dict], header: bool) -> str:
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=list(rows[0]), lineterminator="\n")
    if header:
        writer.writeheader()
    for row in rows:
        writer.writerow({k: ("" if v is None else round(v, 6) if isinstance(v, float) else v) for k, v in row.items()})
    return buffer.getvalue()


def append_csv_row(path: str | Path, row: dict) -> None:
    """Append one epoch; the header is written once, when the file is new."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    new = not path.is_file() or path.stat().st_size == 0
    with open(path, "a", encoding="utf-8", newline="") as f:
        f.write(_csv_text([row], header=new))


def rewrite_csv(path: str | Path, rows: list[dict]) -> None:
    """Make the log exactly these rows (used on resume: no duplicated or lost epochs)."""
    atomic_write_text(path, _csv_text(rows, header=True) if rows else "")
