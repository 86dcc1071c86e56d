"""The HTML audit report: self-contained, escaped, every section present, robust to missing figures."""
from __future__ import annotations

import base64
import io
import re

import pandas as pd
import pytest
from PIL import Image

from race_classifier.evaluation.report import (
    fmt_ci,
    fmt_p,
    fmt_pct,
    render_report,
    thumbnail_data_uri,
)

CLASSES = ["Alpha", "A&B <x>", "Gamma"]
SECTIONS = ["summary", "per-class", "confusion", "calibration", "subgroups", "mistakes", "counts", "model"]


def ci(value, low, high) -> dict:
    return {"value": value, "ci_low": low, "ci_high": high}


def write_jpeg(path, colour) -> str:
    Image.new("RGB", (40, 48), colour).save(path, format="JPEG")
    return str(path)


def make_predictions(root) -> pd.DataFrame:
    """30 rows, 10 per class: 4 readable mistakes (3 real JPEGs, 1 corrupt file) and 1 unreadable image."""
    rows = []
    for i in range(30):
        y = i % 3
        rows.append({"path": str(root / f"img_{i:02d}.jpg"), "y_true": y, "y_pred": y, "confidence": 0.6 + i / 100,
                     "gender": "Female" if i % 2 else "Male", "age": "20-29" if i < 15 else "30-39", "error": ""})
    rows[1].update(path=write_jpeg(root / "o'neil & <co>.jpg", (200, 30, 30)), y_pred=0, confidence=0.97)
    rows[2].update(path=write_jpeg(root / "b.jpg", (30, 200, 30)), y_pred=1, confidence=0.91)
    rows[4].update(path=write_jpeg(root / "c.jpg", (30, 30, 200)), y_pred=2, confidence=0.75)
    corrupt = root / "corrupt.jpg"
    corrupt.write_bytes(b"\xff\xd8\xff not really a jpeg")
    rows[5].update(path=str(corrupt), y_pred=0, confidence=0.88)
    rows[7].update(path=str(root / "missing" / "ghost.jpg"), y_pred=-1, confidence=float("nan"),
                   error="file not found")
    frame = pd.DataFrame(rows)
    for k in range(3):
        frame[f"prob_{k}"] = [c if p == k else (1 - c) / 2 for c, p in zip(frame["confidence"], frame["y_pred"])]
    return frame


FLOOR = {"mean": 0.0181, "p95": 0.0252, "p_value": 0.0, "n_draws": 1000}


def make_evaluation(ece=0.043, log_loss=0.512, subgroups=True) -> dict:
    evaluation = {
        "n": 30, "n_errors": 1,
        "accuracy": ci(0.8621, 0.6943, 0.9450), "balanced_accuracy": ci(0.8593, 0.69, 0.94),
        "macro_f1": 0.8555, "log_loss": log_loss, "ece": ece, "ece_if_calibrated": FLOOR if ece else None,
        "reliability": [{"lo": b / 5, "hi": (b + 1) / 5, "count": n, "accuracy": a, "confidence": c}
                        for b, (n, a, c) in enumerate([(0, None, None), (0, None, None), (0, None, None),
                                                       (14, 0.857, 0.71), (15, 0.867, 0.87)])],
        "per_class": [
            {"class": "Alpha", "support": 10, "accuracy": ci(0.9, 0.596, 0.982), "precision": 0.818, "f1": 0.857},
            {"class": "A&B <x>", "support": 9, "accuracy": ci(0.778, 0.453, 0.937), "precision": 0.875, "f1": 0.824},
            {"class": "Gamma", "support": 10, "accuracy": ci(0.9, 0.596, 0.982), "precision": 0.9, "f1": 0.9},
        ],
        "confusion_matrix": [[9, 1, 0], [1, 7, 1], [1, 0, 9]],
        "confusion_matrix_normalized": [[0.9, 0.1, 0.0], [1 / 9, 7 / 9, 1 / 9], [0.1, 0.0, 0.9]],
        "subgroups": {}, "subgroup_gaps": {},
        "worst_class": {"class": "A&B <x>", "accuracy": 0.778},
    }
    if subgroups:
        evaluation["subgroups"] = {
            "gender": [{"group": "Female", "n": 14, "accuracy": ci(0.857, 0.6, 0.96)},
                       {"group": "Male", "n": 15, "accuracy": ci(0.867, 0.62, 0.96)}],
            "age": [{"group": "20-29", "n": 14, "accuracy": ci(0.714, 0.45, 0.88)},
                    {"group": "30-39", "n": 15, "accuracy": ci(1.0, 0.8, 1.0)}],
            "race_x_gender": [{"group": "A&B <x> \u00d7 Female", "n": 4, "accuracy": ci(0.75, 0.3, 0.95)},
                              {"group": "Alpha \u00d7 Male", "n": 5, "accuracy": ci(1.0, 0.57, 1.0)}],
        }
        evaluation["subgroup_gaps"] = {
            "gender": {"largest_gap": 0.010, "best_group": "Male", "worst_group": "Female",
                       "ci_low": -0.25, "ci_high": 0.27},
            "age": {"largest_gap": 0.286, "best_group": "30-39", "worst_group": "20-29"},
            "race_x_gender": {"largest_gap": None, "best_group": None, "worst_group": None,
                              "ci_low": None, "ci_high": None},
        }
    return evaluation


def make_comparison() -> dict:
    def row(name, n, a, b, low, high, p, significant):
        return {"name": name, "n": n, "a": a, "b": b, "diff": a - b, "ci_low": low, "ci_high": high,
                "p_mcnemar": p, "significant": significant}
    return {
        "n_common": 29, "n_dropped": 1, "alpha": 0.05,
        "overall": [row("accuracy", 29, 0.862, 0.655, 0.05, 0.36, 0.008, True),
                    row("balanced_accuracy", 29, 0.859, 0.65, -0.02, 0.4, None, False)],
        "per_class": [row("Alpha", 10, 0.9, 0.6, 0.01, 0.59, 0.03, True),
                      row("A&B <x>", 9, 0.778, 0.667, -0.2, 0.42, 0.5, False),
                      row("Gamma", 10, 0.9, 0.7, -0.1, 0.5, 0.25, False)],
        "subgroups": {"gender": [row("Female", 14, 0.857, 0.643, -0.05, 0.48, 0.22, False),
                                 row("Male", 15, 0.867, 0.667, -0.03, 0.43, 0.13, False) | {"small_group": True}]},
        "baseline_info": {"name": "baseline-v1", "path": "runs/old/best.pt"},
    }


MODEL_INFO = {"name": "mnv3-candidate", "path": "runs/new/best.pt", "kind": "timm", "arch": "mobilenetv3_small_050",
              "taxonomy": "test3", "classes": CLASSES, "preprocessing": {"size": 112, "mean": [0.5, 0.5, 0.5]},
              "epoch": 7, "training": {"val_accuracy": 0.8621, "val_loss": 0.5123}}


@pytest.fixture(scope="module")
def rendered(tmp_path_factory):
    """One full report (with comparison) and one bare one (no comparison, no ECE/log loss, no subgroups)."""
    root = tmp_path_factory.mktemp("report")
    predictions = make_predictions(root)
    full, bare = root / "out" / "full.html", root / "out" / "bare.html"
    render_report(make_evaluation(), predictions, CLASSES, MODEL_INFO, full, comparison=make_comparison())
    render_report(make_evaluation(ece=None, log_loss=None, subgroups=False), predictions, CLASSES, {}, bare,
                  title="Bare report")
    return {"root": root, "full_path": full, "full": full.read_text("utf-8"), "bare": bare.read_text("utf-8")}


def section(html: str, section_id: str) -> str:
    match = re.search(rf'<section id="{re.escape(section_id)}">(.*?)</section>', html, re.DOTALL)
    assert match, f"section {section_id!r} missing"
    return match.group(1)


def test_file_written_atomically(rendered):
    assert rendered["full_path"].is_file()
    assert [p.name for p in rendered["full_path"].parent.iterdir() if p.name.endswith(".tmp")] == []


@pytest.mark.parametrize("which", ["full", "bare"])
def test_every_section_present(rendered, which):
    for section_id in SECTIONS:
        assert f'<section id="{section_id}">' in rendered[which]


@pytest.mark.parametrize("which", ["full", "bare"])
def test_self_contained(rendered, which):
    html = rendered[which]
    refs = re.findall(r"""\b(src|href)\s*=\s*["']?\s*([^"'\s>]*)""", html, re.IGNORECASE)
    assert refs
    for attr, url in refs:
        assert not re.match(r"(?:https?:)?//", url, re.IGNORECASE), f"external {attr}: {url}"
        assert url.startswith("data:" if attr.lower() == "src" else "#"), f"{attr}={url[:40]}"
    assert "<link" not in html and "@import" not in html and "url(" not in html


def test_plots_and_thumbnails_inline(rendered):
    html = rendered["full"]
    pngs = re.findall(r'<img class="plot" src="data:image/png;base64,([A-Za-z0-9+/=]+)"', html)
    assert len(pngs) == 5  # per class, confusion counts and normalised, reliability, comparison diffs
    Image.open(io.BytesIO(base64.b64decode(pngs[0]))).verify()
    gallery = section(html, "mistakes")
    thumbs = re.findall(r'<img src="data:image/jpeg;base64,([A-Za-z0-9+/=]+)"', gallery)
    assert len(thumbs) == 3
    assert all(max(Image.open(io.BytesIO(base64.b64decode(t))).size) <= 96 for t in thumbs)
    assert gallery.count("image unavailable") == 1  # the corrupt file: a placeholder, not a crash
    # most confident first, captioned true -> predicted with confidence and the (escaped) file name
    assert gallery.index("o&#39;neil &amp; &lt;co&gt;.jpg") < gallery.index("b.jpg") < gallery.index("c.jpg")
    assert "A&amp;B &lt;x&gt; &rarr; Alpha (97.0%)" in gallery
    assert "ghost.jpg" not in gallery  # unreadable images are not mistakes


def test_user_text_is_escaped(rendered):
    html = rendered["full"]
    assert "A&B <x>" not in html and "<co>" not in html
    for section_id in ("per-class", "confusion", "counts", "comparison"):
        assert "A&amp;B &lt;x&gt;" in section(html, section_id)
    assert "A&amp;B &lt;x&gt; \u00d7 Female" in section(html, "subgroups")


def test_summary_figures(rendered):
    summary = section(rendered["full"], "summary")
    assert "86.21%" in summary and "69.4%" in summary and "94.5%" in summary
    assert "4.30%" in summary and "0.512" in summary
    assert "if perfectly calibrated: 1.81% expected, 95% &lt;= 2.52%; p &lt; 0.001" in summary
    assert "socially constructed" in summary
    assert "A&amp;B &lt;x&gt;" in summary  # worst class


def test_missing_figures_render_na(rendered):
    summary = section(rendered["bare"], "summary")
    assert re.search(r"Expected calibration error \(ECE\)</div><div class=\"value\">n/a", summary)
    assert re.search(r"Log loss</div><div class=\"value\">n/a", summary)
    assert "perfectly calibrated" not in rendered["bare"]
    assert "not available" in section(rendered["bare"], "calibration") or "n/a" in section(rendered["bare"],
                                                                                           "calibration")


def test_subgroups(rendered):
    groups = section(rendered["full"], "subgroups")
    for title in ("Gender", "Age", "Race \u00d7 gender"):
        assert f"<h3>{title}</h3>" in groups
    assert "28.6 percentage points" in groups and "20-29" in groups
    assert "(95% CI [-25.0, +27.0] pp)" in groups and "No gap computed" in groups  # race x gender: no gap
    assert "No subgroup labels" in section(rendered["bare"], "subgroups")


def test_unreadable_listed_with_error(rendered):
    counts = section(rendered["full"], "counts")
    assert "ghost.jpg" in counts and "file not found" in counts
    assert "1 unreadable" in counts


def test_model_metadata(rendered):
    model = section(rendered["full"], "model")
    assert "mobilenetv3_small_050" in model and "preprocessing.size" in model and "training.val_accuracy" in model
    assert "No model metadata" in section(rendered["bare"], "model")


def test_comparison_only_when_given(rendered):
    assert 'id="comparison"' not in rendered["bare"]
    comparison = section(rendered["full"], "comparison")
    assert "mnv3-candidate" in comparison and "baseline-v1" in comparison
    assert "is better on accuracy" in comparison
    assert comparison.count('<tr class="sig">') == 2  # overall accuracy and class Alpha
    assert "(small group)" in comparison
    assert "+20.7 pp" in comparison and "0.008" in comparison and "n/a" in comparison  # p None -> n/a


def test_formatting_helpers(tmp_path):
    assert fmt_pct(None) == "n/a" and fmt_pct(float("nan")) == "n/a" and fmt_pct(0.8765, 2) == "87.65%"
    assert fmt_ci(ci(0.5, 0.4, 0.6)) == "50.0% [40.0, 60.0]" and fmt_ci(ci(None, None, None)) == "n/a"
    assert fmt_p(0.0001) == "<0.001" and fmt_p(None) == "n/a"
    uri, problem = thumbnail_data_uri(tmp_path / "nope.jpg")
    assert uri is None and "not found" in problem


def test_ece_noise_floor_in_calibration_and_head_sections(rendered, tmp_path):
    calibration = section(rendered["full"], "calibration")
    assert "<strong>1.81% expected, 95% &lt;= 2.52%; p &lt; 0.001</strong>" in calibration
    assert "1,000 times" in calibration and "30 images" in calibration
    head = {**make_evaluation(ece=0.061, subgroups=False), "classes": CLASSES, "n_unlabelled": 2,
            "ece_if_calibrated": {"mean": 0.02, "p95": 0.03, "p_value": 0.042, "n_draws": 1000},
            "calibration": {"temperature": 1.3, "ece_before": 0.09, "ece_after": 0.061}}
    out = tmp_path / "heads.html"
    render_report({**make_evaluation(), "heads": {"gender": head}}, make_predictions(tmp_path), CLASSES, {}, out)
    gender = section(out.read_text("utf-8"), "head-gender")
    assert "6.10%" in gender and "if perfectly calibrated: 2.00% expected, 95% &lt;= 3.00%; p = 0.042" in gender
    assert "9.00% before temperature 1.300" in gender
    # The race head's summary says the same of its own temperature.
    race = {**make_evaluation(), "calibration": {"temperature": 0.9, "ece_before": 0.052, "ece_after": 0.043}}
    render_report(race, make_predictions(tmp_path), CLASSES, {}, out)
    assert "5.20% before temperature 0.900" in section(out.read_text("utf-8"), "summary")
    assert "before temperature" not in section(rendered["full"], "summary")  # an uncalibrated model: no such line


def test_small_classes_and_groups_show_wilson_intervals(tmp_path):
    """0 of 6, 6 of 6 and 1 of 1 right: the report shows Wilson intervals, never a collapsed [0.0, 0.0] or
    [100.0, 100.0], and says which intervals are Wilson and which bootstrap."""
    from race_classifier.evaluation.metrics import evaluate_predictions
    rows = [{"path": f"p{i}.jpg", "y_true": y, "y_pred": p, "confidence": 0.9,
             "gender": "Male" if i == 12 else "Female", "age": "", "error": ""}
            for i, (y, p) in enumerate(zip([0] * 6 + [1] * 6 + [2], [1] * 12 + [2]))]
    table = pd.DataFrame(rows)
    evaluation = evaluate_predictions(table, CLASSES, n_boot=100)
    out = tmp_path / "small.html"
    render_report(evaluation, table, CLASSES, {}, out)
    html = out.read_text("utf-8")
    per_class = section(html, "per-class")
    assert "0.0% [0.0, 39.0]" in per_class and "100.0% [61.0, 100.0]" in per_class
    assert "100.0% [20.7, 100.0]" in per_class
    assert "100.0% [20.7, 100.0]" in section(html, "subgroups")  # the one Male image
    assert "[0.0, 0.0]" not in html and "[100.0, 100.0]" not in html
    assert "Wilson score intervals for accuracies" in html
