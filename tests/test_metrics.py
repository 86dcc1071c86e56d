"""Evaluation metrics and model comparison, checked against values computed by hand."""
from __future__ import annotations

import json
import math

import numpy as np
import pandas as pd
import pytest

from race_classifier.evaluation.compare import compare_predictions, mcnemar_exact
from race_classifier.evaluation import metrics
from race_classifier.evaluation.metrics import (
    age_group,
    bootstrap_weights,
    evaluate_predictions,
    expected_calibration_error,
    summarize,
)

CLASSES = ["A", "B", "C"]

# The 10-row example (y_true, y_pred), rows 1..10:
#   1 A A   2 A A   3 A B   4 A C   5 B B   6 B B   7 B A   8 C C   9 C C   10 C C
# Confusion matrix (rows = true):  A [2 1 1]   B [1 2 0]   C [0 0 3]
# accuracy = (2 + 2 + 3) / 10 = 0.7
# recall:    A 2/4 = 0.5,  B 2/3,  C 3/3 = 1   -> balanced accuracy = (1/2 + 2/3 + 1) / 3 = 13/18
# precision: predicted A = rows 1,2,7 -> 2/3;  predicted B = rows 3,5,6 -> 2/3;  predicted C = rows 4,8,9,10 -> 3/4
# F1:        A 2*(2/3*1/2)/(2/3+1/2) = 4/7;  B 2/3;  C 2*(3/4*1)/(3/4+1) = 6/7  -> macro-F1 = (4/7+2/3+6/7)/3 = 44/63
Y_TRUE = [0, 0, 0, 0, 1, 1, 1, 2, 2, 2]
Y_PRED = [0, 0, 1, 2, 1, 1, 0, 2, 2, 2]
# Gender: rows 1-5 Female, 6-9 Male, row 10 unknown (left out of gender and race × gender).
GENDER = ["Female"] * 5 + ["Male"] * 4 + [""]
AGE = ["20-29"] * 5 + ["3-9"] * 4 + ["more than 70"]


def example_df(classes=CLASSES, with_probs=True, errors=True) -> pd.DataFrame:
    k = len(classes)
    rows = []
    for i, (t, p) in enumerate(zip(Y_TRUE, Y_PRED)):
        # The predicted class gets 0.5, the other two 0.25 each (k = 3; extra classes get 0).
        probs = [0.5 if c == p else (0.25 if c < 3 else 0.0) for c in range(k)]
        rows.append({"path": f"img{i}.jpg", "y_true": t, "y_pred": p, "confidence": 0.5,
                     **({f"prob_{c}": probs[c] for c in range(k)} if with_probs else {}),
                     "gender": GENDER[i], "age": AGE[i], "error": ""})
    if errors:  # two unreadable images: excluded from every metric, counted in n_errors
        for j, y_pred in enumerate([-1, 2]):
            rows.append({"path": f"bad{j}.jpg", "y_true": 0, "y_pred": y_pred, "confidence": float("nan"),
                         **({f"prob_{c}": float("nan") for c in range(k)} if with_probs else {}),
                         "gender": "Female", "age": "20-29", "error": "cannot identify image file"})
    return pd.DataFrame(rows)


@pytest.fixture(scope="module")
def report() -> dict:
    return evaluate_predictions(example_df(), CLASSES, n_boot=300, seed=0, min_group_size=4)


# --------------------------------------------------------------------------- evaluate_predictions

def test_overall_figures_by_hand(report):
    assert report["n"] == 10 and report["n_errors"] == 2
    assert report["accuracy"]["value"] == pytest.approx(0.7)
    assert report["balanced_accuracy"]["value"] == pytest.approx(13 / 18)
    assert report["macro_f1"] == pytest.approx(44 / 63)
    assert report["confusion_matrix"] == [[2, 1, 1], [1, 2, 0], [0, 0, 3]]
    assert report["confusion_matrix_normalized"][0] == pytest.approx([0.5, 0.25, 0.25])
    assert report["worst_class"] == {"class": "A", "accuracy": pytest.approx(0.5)}
    json.dumps(report, allow_nan=False)  # plain JSON: no numpy types, no NaN


def test_per_class_by_hand(report):
    rows = {r["class"]: r for r in report["per_class"]}
    assert [rows[c]["support"] for c in CLASSES] == [4, 3, 3]
    assert [rows[c]["accuracy"]["value"] for c in CLASSES] == pytest.approx([0.5, 2 / 3, 1.0])
    assert [rows[c]["precision"] for c in CLASSES] == pytest.approx([2 / 3, 2 / 3, 3 / 4])
    assert [rows[c]["f1"] for c in CLASSES] == pytest.approx([4 / 7, 2 / 3, 6 / 7])
    # Class C is right 3 of 3: its Wilson interval is [0.438, 1], not the bootstrap's point [1, 1].
    assert rows["C"]["accuracy"]["ci_low"] == pytest.approx(0.4385, abs=1e-4)
    assert rows["C"]["accuracy"]["ci_high"] == 1.0


def test_log_loss_and_ece_by_hand(report):
    # p(true class) = 0.5 on the 7 correct rows, 0.25 on the 3 wrong ones.
    assert report["log_loss"] == pytest.approx(-(7 * math.log(0.5) + 3 * math.log(0.25)) / 10)
    # Every confidence is 0.5 -> one bin (7/15, 8/15] with accuracy 0.7: ECE = |0.7 - 0.5| = 0.2.
    assert report["ece"] == pytest.approx(0.2)
    assert len(report["reliability"]) == 15
    full = [b for b in report["reliability"] if b["count"]]
    assert len(full) == 1 and full[0]["count"] == 10
    assert full[0]["lo"] == pytest.approx(7 / 15) and full[0]["hi"] == pytest.approx(8 / 15)
    assert full[0]["accuracy"] == pytest.approx(0.7) and full[0]["confidence"] == pytest.approx(0.5)
    # Its noise floor: a calibrated model at 0.5 gets hits ~ Binomial(10, 1/2) and ECE |hits - 5| / 10, so
    # E[ECE] = 2 * (5*1 + 4*10 + 3*45 + 2*120 + 1*210) / 10240 = 0.123 and P(ECE >= 0.2) = 352/1024 = 0.344.
    floor = report["ece_if_calibrated"]
    assert floor["mean"] == pytest.approx(1260 / 10240, abs=0.015) and floor["n_draws"] == 1000
    assert floor["p_value"] == pytest.approx(352 / 1024, abs=0.05)


def test_ece_tiny_case_by_hand():
    # Bin (13/15, 14/15]: confidences 0.9, 0.9, one right -> |0.5 - 0.9| = 0.4, weight 2/4.
    # Bin (4/15, 5/15]:  confidences 0.3, 0.3, both right -> |1.0 - 0.3| = 0.7, weight 2/4.
    ece, bins = expected_calibration_error([0.9, 0.9, 0.3, 0.3], [1, 0, 1, 1])
    assert ece == pytest.approx(0.5 * 0.4 + 0.5 * 0.7)  # 0.55
    assert bins[13]["count"] == 2 and bins[13]["accuracy"] == pytest.approx(0.5)
    assert bins[4]["count"] == 2 and bins[4]["confidence"] == pytest.approx(0.3)
    assert bins[0] == {"lo": 0.0, "hi": pytest.approx(1 / 15), "count": 0, "accuracy": None, "confidence": None}


def test_labels_only_baseline_has_no_calibration():
    result = evaluate_predictions(example_df(with_probs=False), CLASSES, n_boot=50)
    assert result["log_loss"] is None and result["ece"] is None and result["ece_if_calibrated"] is None
    assert result["accuracy"]["value"] == pytest.approx(0.7)


def test_class_without_support():
    classes = CLASSES + ["D"]  # D: no image, never predicted
    result = evaluate_predictions(example_df(classes), classes, n_boot=100)
    d = result["per_class"][3]
    assert d["support"] == 0
    assert d["accuracy"] == {"value": None, "ci_low": None, "ci_high": None}
    assert result["balanced_accuracy"]["value"] == pytest.approx(13 / 18)  # D left out, not counted as 0
    assert result["macro_f1"] == pytest.approx(44 / 63)
    assert result["confusion_matrix_normalized"][3] is None
    json.dumps(result, allow_nan=False)


# Wilson score 95% intervals, from the closed form (p + z²/2n ± z √(p(1-p)/n + z²/4n²)) / (1 + z²/n), z = 1.96:
# 0 of 6: [0, 0.3903]; 6 of 6: [0.6097, 1]; 1 of 1: [0.2065, 1].
WILSON_0_OF_6, WILSON_6_OF_6, WILSON_1_OF_1 = (0.0, 0.3903), (0.6097, 1.0), (0.2065, 1.0)


@pytest.mark.parametrize("k, n, expected", [(0, 6, WILSON_0_OF_6), (6, 6, WILSON_6_OF_6), (1, 1, WILSON_1_OF_1)])
def test_wilson_interval_pinned(k, n, expected):
    estimate = metrics.wilson_ci(k, n)
    assert estimate["value"] == pytest.approx(k / n)
    assert (estimate["ci_low"], estimate["ci_high"]) == pytest.approx(expected, abs=1e-4)
    assert metrics.wilson_ci(0, 0) == {"value": None, "ci_low": None, "ci_high": None}


def _small_sample_df() -> pd.DataFrame:
    """Class A: 0 of 6 right; class B: 6 of 6; class C: 1 of 1. Gender: one Male image (a C), the rest Female."""
    y_true = [0] * 6 + [1] * 6 + [2]
    y_pred = [1] * 6 + [1] * 6 + [2]
    return pd.DataFrame({"path": [f"p{i}.jpg" for i in range(13)], "y_true": y_true, "y_pred": y_pred,
                         "gender": ["Female"] * 12 + ["Male"], "age": "", "error": ""})


def test_small_sample_accuracies_get_wilson_intervals_everywhere(capsys):
    """A percentile bootstrap collapses to '0.00% [0.00, 0.00]' for 0 of 6 and '[100.00, 100.00]' for 1 of 1;
    every per-class and per-group accuracy (and the overall one) has a Wilson interval instead, in the metrics
    JSON and on the console."""
    from race_classifier.evaluation.cli import print_evaluation
    result = evaluate_predictions(_small_sample_df(), CLASSES, n_boot=200, seed=0)
    assert result["proportion_ci"] == "wilson"
    rows = {r["class"]: r["accuracy"] for r in result["per_class"]}
    for name, expected in (("A", WILSON_0_OF_6), ("B", WILSON_6_OF_6), ("C", WILSON_1_OF_1)):
        assert (rows[name]["ci_low"], rows[name]["ci_high"]) == pytest.approx(expected, abs=1e-4), name
    groups = {g["group"]: g["accuracy"] for g in result["subgroups"]["gender"]}
    assert groups["Male"]["value"] == 1.0
    assert (groups["Male"]["ci_low"], groups["Male"]["ci_high"]) == pytest.approx(WILSON_1_OF_1, abs=1e-4)
    cells = {g["group"]: g["accuracy"] for g in result["subgroups"]["race_x_gender"]}
    assert (cells["A × Female"]["ci_low"], cells["A × Female"]["ci_high"]) == pytest.approx(WILSON_0_OF_6, abs=1e-4)
    assert result["accuracy"]["value"] == pytest.approx(7 / 13)
    assert result["accuracy"]["ci_low"] < 7 / 13 < result["accuracy"]["ci_high"]
    json.dumps(result, allow_nan=False)

    print_evaluation("m", result, CLASSES)
    out = capsys.readouterr().out
    assert "0.00% [0.00, 39.03]" in out and "100.00% [60.97, 100.00]" in out and "100.00% [20.65, 100.00]" in out
    assert "[0.00, 0.00]" not in out and "[100.00, 100.00]" not in out


def test_bootstrap_ci_contains_estimate_is_seeded_and_narrows():
    small = evaluate_predictions(example_df(), CLASSES, n_boot=300, seed=1)
    again = evaluate_predictions(example_df(), CLASSES, n_boot=300, seed=1)
    assert small["accuracy"] == again["accuracy"] and small["balanced_accuracy"] == again["balanced_accuracy"]
    for key in ("accuracy", "balanced_accuracy"):
        est = small[key]
        assert est["ci_low"] <= est["value"] <= est["ci_high"]
    big_df = pd.concat([example_df(errors=False).assign(path=lambda d, i=i: d["path"] + f"_{i}")
                        for i in range(20)], ignore_index=True)
    big = evaluate_predictions(big_df, CLASSES, n_boot=300, seed=1)
    assert big["accuracy"]["value"] == pytest.approx(0.7)
    width = lambda e: e["ci_high"] - e["ci_low"]  # noqa: E731
    assert width(big["accuracy"]) < width(small["accuracy"]) / 2
    assert width(big["balanced_accuracy"]) < width(small["balanced_accuracy"]) / 2


def test_bootstrap_weights_are_one_draw_made_in_blocks(monkeypatch):
    """Blocks of resamples give exactly the counts of one (n_boot, n) draw, each row n draws, and memory
    peaks near the weight matrix itself (one-shot counting held ~4 copies of it: indices, offsets, counts)."""
    import tracemalloc

    n, n_boot, seed = 5000, 120, 7
    draw = np.random.default_rng(seed).integers(0, n, size=(n_boot, n))
    expected = np.stack([np.bincount(row, minlength=n) for row in draw]).astype(float)
    monkeypatch.setattr(metrics, "_DRAW_ELEMENTS", 3 * n + 17)  # blocks of 3 rows, the last one short
    tracemalloc.start()
    weights = bootstrap_weights(n, n_boot, seed)
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    np.testing.assert_array_equal(weights, expected)
    assert (weights.sum(axis=1) == n).all()
    assert peak < 1.2 * weights.nbytes
    assert bootstrap_weights(0, 4, seed).shape == (4, 0)


def test_subgroups_by_hand(report):
    groups = {dim: {g["group"]: (g["n"], g["accuracy"]["value"]) for g in rows}
              for dim, rows in report["subgroups"].items()}
    # Female rows 1-5: right on 1, 2, 5 -> 3/5. Male rows 6-9: right on 6, 8, 9 -> 3/4. Row 10 unknown: left out.
    assert groups["gender"] == {"Female": (5, pytest.approx(0.6)), "Male": (4, pytest.approx(0.75))}
    # A × Female rows 1-4: 2/4; B × Female row 5: 1/1; B × Male rows 6-7: 1/2; C × Male rows 8-9: 2/2.
    assert groups["race_x_gender"] == {"A × Female": (4, 0.5), "B × Female": (1, 1.0),
                                       "B × Male": (2, 0.5), "C × Male": (2, 1.0)}
    # Age, in FairFace's order: 3-9 = rows 6-9 (3/4), 20-29 = rows 1-5 (3/5), more than 70 = row 10 (1/1).
    assert list(groups["age"]) == ["3-9", "20-29", "more than 70"]
    assert groups["age"]["3-9"] == (4, 0.75) and groups["age"]["more than 70"] == (1, 1.0)
    # Gap with min_group_size=4: Male 0.75 - Female 0.6 = 0.15.
    gap = report["subgroup_gaps"]["gender"]
    assert gap["largest_gap"] == pytest.approx(0.15)
    assert (gap["best_group"], gap["worst_group"]) == ("Male", "Female")
    assert gap["ci_low"] <= gap["largest_gap"] <= gap["ci_high"]
    # race × gender: only A × Female has n >= 4 -> no gap. Age: 3-9 (0.75) vs 20-29 (0.6); n=1 group skipped.
    assert report["subgroup_gaps"]["race_x_gender"] is None
    assert report["subgroup_gaps"]["age"]["worst_group"] == "20-29"
    assert report["subgroup_gaps"]["age"]["largest_gap"] == pytest.approx(0.15)


def test_subgroups_only_where_known():
    df = example_df().assign(gender="", age=np.nan)  # unknown everywhere (NaN as read from a CSV)
    result = evaluate_predictions(df, CLASSES, n_boot=50)
    assert result["subgroups"] == {} and result["subgroup_gaps"] == {}


def test_unknown_markers_are_no_group_and_gender_spellings_one():
    df = example_df(errors=False).assign(gender=["F", "female", "Female", "-", "unknown", "m", "Male", "MALE", "?", ""],
                             age=["-", "na", "25", "-1", "unknown", "25", "25", "?", "25", "25"])
    result = evaluate_predictions(df, CLASSES, n_boot=50)
    assert [g["group"] for g in result["subgroups"]["gender"]] == ["Female", "Male"]
    assert [g["group"] for g in result["subgroups"]["age"]] == ["20-29"]
    assert all("×" in g["group"] and g["group"].split(" × ")[1] in ("Female", "Male")
               for g in result["subgroups"]["race_x_gender"])


def test_integer_ages_are_binned():
    df = example_df(errors=False).assign(age=[1, 5, 15, 25, 35, 45, 55, 65, 70, 90])
    ages = [g["group"] for g in evaluate_predictions(df, CLASSES, n_boot=50)["subgroups"]["age"]]
    assert ages == ["0-2", "3-9", "10-19", "20-29", "30-39", "40-49", "50-59", "60-69", "more than 70"]


@pytest.mark.parametrize("value, expected", [
    ("0", "0-2"), ("2", "0-2"), ("3", "3-9"), ("9", "3-9"), ("10", "10-19"), ("25", "20-29"),
    ("69", "60-69"), ("70", "more than 70"), ("116", "more than 70"), (25.0, "20-29"), (41, "40-49"),
    ("3-9", "3-9"), ("more than 70", "more than 70"), ("", ""), (None, ""), (float("nan"), ""),
    ("-", ""), ("unknown", ""), ("NA", ""), ("-1", ""), (-1, ""),
])
def test_age_group(value, expected):
    assert age_group(value) == expected


def test_summarize_still_works():
    result = summarize(Y_TRUE, Y_PRED, 3)
    assert result["accuracy"] == pytest.approx(0.7)
    assert result["balanced_accuracy"] == pytest.approx(13 / 18)
    assert result["per_class_accuracy"] == pytest.approx([0.5, 2 / 3, 1.0])
    assert result["support"] == [4, 3, 3]
    assert result["confusion_matrix"] == [[2, 1, 1], [1, 2, 0], [0, 0, 3]]
    assert summarize([], [], 2)["accuracy"] is None


# --------------------------------------------------------------------------- comparison

def test_mcnemar_exact_by_hand():
    # b01 = 8 (A right, B wrong), b10 = 2: p = 2 * sum_{k<=2} C(10,k) / 2^10 = 2 * 56 / 1024 = 0.109375
    a = [1] * 8 + [0] * 2 + [1] * 5
    b = [0] * 8 + [1] * 2 + [1] * 5
    assert mcnemar_exact(a, b) == (8, 2, pytest.approx(0.109375))
    assert mcnemar_exact([1, 0], [1, 0]) == (0, 0, 1.0)


def test_compare_identical_models():
    df = example_df()
    result = compare_predictions(df, df, CLASSES, n_boot=200)
    assert result["n_common"] == 10 and result["n_dropped"] == 2
    for row in [*result["overall"], *[r for r in result["per_class"] if r["n"]]]:
        assert row["diff"] == 0 and row["ci_low"] == row["ci_high"] == 0
        assert not row["significant"]
    assert result["overall"][0]["p_mcnemar"] == 1.0
    assert result["overall"][1]["p_mcnemar"] is None  # balanced accuracy: no McNemar
    json.dumps(result, allow_nan=False)


def _better_pair(n=200):
    """A right on the first 180 images, B on the first 120 (A ⊇ B): b01 = 60, b10 = 0."""
    y = np.arange(n) % 3
    wrong = (y + 1) % 3
    idx = np.arange(n)
    base = {"path": [f"p{i}" for i in idx], "y_true": y,
            "gender": np.where(idx % 2, "Male", "Female"), "age": "", "error": ""}
    a = pd.DataFrame({**base, "y_pred": np.where(idx < 180, y, wrong)})
    b = pd.DataFrame({**base, "y_pred": np.where(idx < 120, y, wrong)})
    return a, b


def test_compare_clearly_better_model():
    a, b = _better_pair()
    result = compare_predictions(a, b, CLASSES, n_boot=500)
    acc, bal = result["overall"]
    assert (acc["a"], acc["b"], acc["diff"]) == (pytest.approx(0.9), pytest.approx(0.6), pytest.approx(0.3))
    assert acc["p_mcnemar"] == pytest.approx(2 * 0.5 ** 60) and acc["significant"]
    assert 0 < acc["ci_low"] < 0.3 < acc["ci_high"]
    assert bal["p_mcnemar"] is None and bal["significant"] and bal["ci_low"] > 0
    assert all(r["significant"] and r["diff"] > 0 for r in result["per_class"])
    assert [r["name"] for r in result["subgroups"]["gender"]] == ["Female", "Male"]


def test_compare_joins_on_path_and_drops_errors():
    a, b = _better_pair()
    reference = compare_predictions(a, b, CLASSES, n_boot=100)
    # B shuffled; one error in each model on different images; one image only A has.
    a_err = pd.concat([a, pd.DataFrame([{"path": "only_a", "y_true": 0, "y_pred": 0, "gender": "", "age": "",
                                         "error": ""}])], ignore_index=True)
    a_err.loc[0, ["y_pred", "error"]] = [-1, "truncated"]
    b_err = b.sample(frac=1, random_state=3).reset_index(drop=True)
    b_err.loc[b_err["path"] == "p150", "error"] = "truncated"
    result = compare_predictions(a_err, b_err, CLASSES, n_boot=100)
    assert (result["n_common"], result["n_dropped"], result["n_only_a"], result["n_only_b"]) == (198, 2, 1, 0)
    acc = result["overall"][0]
    # p0 (both right) and p150 (A right, B wrong) dropped: A 178/198, B 119/198.
    assert acc["a"] == pytest.approx(178 / 198) and acc["b"] == pytest.approx(119 / 198)
    # Row order alone changes nothing.
    shuffled = compare_predictions(a.sample(frac=1, random_state=1), b.sample(frac=1, random_state=2),
                                   CLASSES, n_boot=100)
    assert shuffled["overall"][0]["a"] == reference["overall"][0]["a"]
    assert shuffled["overall"][0]["diff"] == reference["overall"][0]["diff"]


def test_compare_counts_an_image_listed_twice_as_evaluate_does():
    a, b = _better_pair(30)
    twice_a, twice_b = pd.concat([a, a.iloc[[5]]], ignore_index=True), pd.concat([b, b.iloc[[5]]], ignore_index=True)
    result = compare_predictions(twice_a, twice_b.sample(frac=1, random_state=0), CLASSES, n_boot=10)
    assert (result["n_common"], result["n_only_a"], result["n_only_b"]) == (31, 0, 0)
    assert result["overall"][0]["a"] == pytest.approx((twice_a["y_pred"] == twice_a["y_true"]).mean())
    once_in_b = compare_predictions(twice_a, b, CLASSES, n_boot=10)  # the second listing has no partner
    assert (once_in_b["n_common"], once_in_b["n_only_a"]) == (30, 1)


def test_compare_rejects_mismatched_or_disjoint_tables():
    a, b = _better_pair(30)
    with pytest.raises(ValueError, match="y_true"):
        compare_predictions(a, b.assign(y_true=(b["y_true"] + 1) % 3), CLASSES, n_boot=10)
    with pytest.raises(ValueError, match="no image"):
        compare_predictions(a, b.assign(path=b["path"] + "x"), CLASSES, n_boot=10)
