"""The ECE's noise floor (consistency resampling, ``metrics.ece_if_calibrated``): what a perfectly calibrated
model would score, a p-value that separates sampling noise from miscalibration, and where it is shown."""
from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest

from race_classifier.evaluation import metrics
from race_classifier.evaluation.cli import print_evaluation
from race_classifier.evaluation.formatting import fmt_ece_floor
from race_classifier.evaluation.metrics import ece_if_calibrated, evaluate_predictions, expected_calibration_error


def _model(n: int, seed: int, miscalibration: float = 0.0) -> tuple[np.ndarray, np.ndarray]:
    """(confidence, correct): confidences uniform on [0.2, 1], each image right with probability
    confidence - miscalibration (0: perfectly calibrated; 0.15: over-confident by 15 points)."""
    rng = np.random.default_rng(seed)
    confidence = rng.uniform(0.2, 1.0, n)
    correct = rng.random(n) < np.clip(confidence - miscalibration, 0, 1)
    return confidence, correct.astype(float)


def _floor(confidence, correct, **kwargs) -> tuple[float, dict]:
    ece = expected_calibration_error(confidence, correct)[0]
    return ece, ece_if_calibrated(confidence, ece, **kwargs)


def test_a_calibrated_model_sits_on_its_noise_floor():
    ece, floor = _floor(*_model(3500, seed=1))
    assert set(floor) == {"mean", "p95", "p_value", "n_draws"} and floor["n_draws"] == 1000
    assert 0.012 < floor["mean"] < 0.026  # ~0.019 on 3,500 faces (the brief's figure)
    assert floor["mean"] < floor["p95"]
    assert floor["p_value"] > 0.05
    assert ece == pytest.approx(floor["mean"], rel=0.5)


def test_p_values_of_calibrated_models_are_uniform():
    """Under "calibrated" p is uniform: over 60 calibrated data sets about 5% fall below 0.05, mean 0.5."""
    p = np.array([_floor(*_model(1000, seed=s), n_draws=400, seed=s)[1]["p_value"] for s in range(60)])
    assert 0.38 < p.mean() < 0.62
    assert (p < 0.05).mean() <= 0.12


def test_an_overconfident_model_is_far_above_its_floor():
    ece, floor = _floor(*_model(3500, seed=2, miscalibration=0.15))
    assert floor["p_value"] < 0.01
    assert ece > 4 * floor["p95"]
    assert fmt_ece_floor(floor).endswith("p < 0.001")  # no draw reached it: p < 1/1000, not p = 0


def test_matches_expected_calibration_error_of_simulated_outcomes():
    """The vectorised draws score what expected_calibration_error scores on outcomes drawn independently."""
    confidence, correct = _model(500, seed=3)
    _, floor = _floor(confidence, correct, n_draws=4000)
    rng = np.random.default_rng(99)
    direct = np.array([expected_calibration_error(confidence, rng.random(500) < confidence)[0] for _ in range(2000)])
    assert floor["mean"] == pytest.approx(direct.mean(), rel=0.03)
    assert floor["p95"] == pytest.approx(np.percentile(direct, 95), rel=0.06)


def test_by_hand_and_ties():
    # Ten images at confidence 0.5: hits ~ Binomial(10, 1/2), ECE = |hits - 5| / 10.
    # E|hits - 5| = 2 * (5*1 + 4*10 + 3*45 + 2*120 + 1*210) / 1024 = 1260/1024 -> mean 0.123;
    # P(ECE >= 0.2) = 1 - P(hits in 4..6) = 1 - 672/1024 = 0.344.
    floor = ece_if_calibrated([0.5] * 10, 0.2, n_draws=20_000)
    assert floor["mean"] == pytest.approx(1260 / 10240, abs=0.004)
    assert floor["p_value"] == pytest.approx(352 / 1024, abs=0.015)
    # Confidence 1 is always right: every draw scores exactly 0, which counts as reaching an observed 0.
    assert ece_if_calibrated([1.0] * 5, 0.0) == {"mean": 0.0, "p95": 0.0, "p_value": 1.0, "n_draws": 1000}
    assert ece_if_calibrated([1.0] * 5, 0.1)["p_value"] == 0.0
    assert ece_if_calibrated([], 0.0) is None and ece_if_calibrated([0.5], None) is None


def test_seeded_and_independent_of_the_chunk_size(monkeypatch):
    confidence, correct = _model(2000, seed=4)
    ece, floor = _floor(confidence, correct, seed=7)
    assert _floor(confidence, correct, seed=7)[1] == floor
    assert _floor(confidence, correct, seed=8)[1] != floor
    monkeypatch.setattr(metrics, "_DRAW_ELEMENTS", 3 * 2000 + 5)  # 3 draws at a time instead of all 1000
    assert ece_if_calibrated(confidence, ece, seed=7) == floor


def test_floor_shrinks_as_one_over_root_n():
    means = [_floor(*_model(n, seed=5), n_draws=300)[1]["mean"] for n in (1000, 4000, 16000)]
    for bigger, smaller in zip(means, means[1:]):
        assert bigger / smaller == pytest.approx(2.0, rel=0.2)


# --- where it is shown -------------------------------------------------------------------------------------

def _table(confidence: np.ndarray, correct: np.ndarray) -> pd.DataFrame:
    """A two-class predictions table with these top confidences; class 0 always predicted."""
    y_true = np.where(correct > 0, 0, 1)
    return pd.DataFrame({"path": [f"{i}.jpg" for i in range(len(y_true))], "y_true": y_true, "y_pred": 0,
                         "confidence": confidence, "prob_0": confidence, "prob_1": 1 - confidence,
                         "gender": "", "age": "", "error": ""})


def test_evaluation_and_console(capsys):
    confidence, correct = _model(800, seed=6, miscalibration=0.15)
    confidence = np.maximum(confidence, 0.5)  # the top class of two
    table = _table(confidence, correct)
    ev = evaluate_predictions(table, ["A", "B"], n_boot=20, seed=3)
    assert ev["ece_if_calibrated"] == ece_if_calibrated(confidence, ev["ece"], seed=3)
    json.dumps(ev, allow_nan=False)
    labels_only = evaluate_predictions(table.drop(columns=["prob_0", "prob_1"]), ["A", "B"], n_boot=20)
    assert labels_only["ece_if_calibrated"] is None

    ev["heads"] = {"gender": {**ev, "n_unlabelled": 0}}
    print_evaluation("model", ev, ["A", "B"])
    out = capsys.readouterr().out
    floor = ev["ece_if_calibrated"]
    line = (f"ECE {ev['ece']:.4f} (perfectly calibrated: {floor['mean']:.4f} expected, "
            f"95% <= {floor['p95']:.4f}; p < 0.001)")
    assert out.count(line) == 2  # race, and the gender head
    print_evaluation("model", labels_only, ["A", "B"])
    assert "ECE n/a" in (text := capsys.readouterr().out) and "perfectly calibrated" not in text
