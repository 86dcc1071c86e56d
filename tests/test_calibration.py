"""Temperature scaling, the abstention threshold, the model card, and their path through checkpoints,
ONNX exports, ``evaluate --abstain`` and ``predict --abstain``."""
from __future__ import annotations

import csv
import json
import re
import shutil

import numpy as np
import pytest
import torch

from race_classifier import Classifier
from race_classifier.cli import main as cli_main
from race_classifier.data.dataset import preprocessed_batches
from race_classifier.data.manifest import read_manifest
from race_classifier.evaluation.calibration import (abstention_summary, choose_threshold, fit_temperature, nll,
                                                    softmax, uncalibrated)
from race_classifier.evaluation.metrics import expected_calibration_error
from race_classifier.labels import get_taxonomy
from race_classifier.models.checkpoint import load_checkpoint
from race_classifier.models.loaders import load_predictor
from race_classifier.post_training.model_card import CARD_SECTIONS, MODEL_CARD
from race_classifier.training.report import class_key
from race_classifier.utils import atomic_torch_save


def _overconfident(n=4000, k=5, true_t=3.0, seed=0):
    """Labels drawn from softmax(z); the model reports z * true_t: over-confident by a factor true_t."""
    rng = np.random.default_rng(seed)
    z = rng.normal(0, 2.0, size=(n, k))
    p = softmax(z)
    labels = np.array([rng.choice(k, p=row) for row in p])
    return z * true_t, labels


def test_fit_temperature_recovers_a_known_temperature_and_lowers_ece():
    logits, labels = _overconfident()
    t = fit_temperature(logits, labels)
    assert t == pytest.approx(3.0, rel=0.10)
    assert nll(logits, labels, t) < nll(logits, labels)
    correct = softmax(logits).argmax(1) == labels
    ece_before = expected_calibration_error(softmax(logits).max(1), correct)[0]
    ece_after = expected_calibration_error(softmax(logits, t).max(1), correct)[0]
    assert ece_after <= ece_before
    # Torch tensors work too, and no data means no change.
    assert fit_temperature(torch.as_tensor(logits), torch.as_tensor(labels)) == pytest.approx(t, rel=1e-6)
    assert fit_temperature(np.zeros((0, 3)), np.zeros(0)) == 1.0
    # softmax(T log p) undoes the temperature.
    np.testing.assert_allclose(uncalibrated(softmax(logits[:50], t), t), softmax(logits[:50]), atol=1e-9)


def test_temperature_on_a_search_bound_is_flagged_and_few_images_warned():
    from race_classifier.evaluation.calibration import MIN_CALIBRATION_IMAGES, TEMPERATURE_BOUNDS
    from race_classifier.post_training.calibrate import calibrate_head, calibrate_logits
    from race_classifier.post_training.model_card import calibration_warnings
    rng = np.random.default_rng(0)
    labels = np.arange(30) % 3
    # Always confidently wrong: the NLL falls all the way to uniform probabilities, T runs into 50.
    wrong = 5 * np.eye(3)[(labels + 1) % 3] + rng.normal(0, 0.1, (30, 3))
    # Always right by a wide margin: the NLL falls towards T -> 0, T runs into 0.02.
    right = 5 * np.eye(3)[labels] + rng.normal(0, 0.1, (30, 3))
    for logits, bound in ((wrong, TEMPERATURE_BOUNDS[1]), (right, TEMPERATURE_BOUNDS[0])):
        cal = {**calibrate_logits(logits, labels), "n": 30}
        assert cal["temperature"] == pytest.approx(bound, rel=1e-3) and cal["at_search_bound"] is True
        assert calibrate_head(logits, labels)["at_search_bound"] is True
        text = " ".join(calibration_warnings(cal))
        assert f"{cal['temperature']:.3f} sits on a bound of its search" in text and "unreliable" in text
        assert f"only 30 validation images (fewer than {MIN_CALIBRATION_IMAGES})" in text
    logits, labels = _overconfident()  # 4000 images, a temperature inside the range: nothing to warn about
    cal = {**calibrate_logits(logits, labels), "n": len(labels)}
    assert cal["at_search_bound"] is False and calibration_warnings(cal) == []
    heads = {"gender": {**calibrate_head(wrong, np.arange(30) % 3), "n": 30}}
    assert any(w.startswith("the gender head's temperature 50.000 sits on a bound")
               for w in calibration_warnings({**cal, "heads": heads}))


def test_threshold_answers_the_target_coverage():
    confidence = np.random.default_rng(1).uniform(0.2, 1.0, size=10_000)
    for coverage in (0.5, 0.9, 0.95, 1.0):
        threshold = choose_threshold(confidence, coverage)
        answered = (confidence >= threshold).mean()
        assert coverage <= answered <= coverage + 1e-3
        assert threshold == pytest.approx(np.quantile(confidence, 1 - coverage), abs=1e-3)
        # Never a face's own confidence: the same faces are answered from float32 probabilities.
        assert threshold not in set(confidence)
        assert (confidence.astype(np.float32) >= threshold).mean() == answered
    correct = confidence > 0.5  # accuracy grows with confidence: abstaining helps
    summary = abstention_summary(confidence, correct, choose_threshold(confidence, 0.8), 0.8)
    assert summary["accuracy_at_coverage"] > summary["accuracy_all"]
    with pytest.raises(ValueError):
        choose_threshold(confidence, 0.0)


# --- the end of a training run ----------------------------------------------------------------------

@pytest.fixture(scope="module")
def calibrated(trained_checkpoints):
    return trained_checkpoints[1]


@pytest.fixture(scope="module")
def val_samples(manifests):
    return read_manifest(manifests / "val.txt", get_taxonomy(str(manifests / "classes.txt")))


def test_training_writes_calibration_and_model_card(calibrated, manifests):
    ckpt = torch.load(calibrated, map_location="cpu", weights_only=True)  # still a safe, plain checkpoint
    cal = ckpt["calibration"]
    assert {"temperature", "ece_before", "ece_after", "nll_before", "nll_after", "fitted_on", "n"} <= set(cal)
    assert cal["temperature"] > 0 and cal["n"] == 24 and cal["fitted_on"] == str(manifests / "val.txt")
    assert cal["nll_after"] <= cal["nll_before"] + 1e-9
    assert cal["at_search_bound"] is False
    floor = cal["ece_if_calibrated"]  # the calibrated ECE's noise floor, on these 24 images
    assert set(floor) == {"mean", "p95", "p_value", "n_draws"} and 0 < floor["mean"] <= floor["p95"]
    ab = cal["abstention"]
    assert ab["target_coverage"] == 0.95 and ab["coverage"] >= 0.95
    assert "calibration" not in torch.load(calibrated.parent / "last.pt", weights_only=True)  # resume untouched

    card = (calibrated.parent / MODEL_CARD).read_text()
    headings = re.findall(r"^## (.+)$", card, re.M)
    assert headings == list(CARD_SECTIONS)
    for phrase in ("identifying people", "hiring", "policing", "credit", "ancestry", "self-identity",
                   "perceived labels as facts", str(manifests / "train.txt"), f"{cal['temperature']:.3f}",
                   f"it would show {floor['mean']:.4f} expected, 95% <= {floor['p95']:.4f}; p ",
                   # 24 validation images: the card says the calibration rests on too few
                   "**Unreliable calibration.**", "only 24 validation images (fewer than 200)",
                   # the accuracies' intervals are Wilson score intervals, the bootstrap for the rest
                   "Wilson score intervals for accuracies"):
        assert phrase in card, phrase
    # Per-class accuracies in the card are the checkpoint's own validation figures.
    for name in ckpt["taxonomy"]["classes"]:
        row = re.search(rf"^\| {name} \| (\d+) \| ([\d.]+)% \| \[", card, re.M)
        assert row, name
        assert float(row.group(2)) == pytest.approx(100 * ckpt["metrics"][class_key(name)], abs=0.006)


def test_calibrate_command_matches_training_on_an_old_checkpoint(calibrated, manifests, tmp_path, capsys):
    ckpt = load_checkpoint(calibrated)
    old = {k: v for k, v in ckpt.items() if k != "calibration"}
    atomic_torch_save(old, tmp_path / "best.pt")
    assert load_predictor(tmp_path / "best.pt").temperature == 1.0  # older files keep working
    assert cli_main(["calibrate", "--model_path", str(tmp_path / "best.pt"), "--val_txt",
                     str(manifests / "val.txt"), "--workers", "0", "--n_boot", "50"]) == 0
    redone = load_checkpoint(tmp_path / "best.pt")
    assert redone["calibration"]["temperature"] == pytest.approx(ckpt["calibration"]["temperature"], rel=1e-4)
    # The summary line puts the calibrated ECE beside what sampling noise alone would give.
    floor = re.search(r"ECE [\d.]+ -> ([\d.]+) \(perfectly calibrated: ([\d.]+) expected",
                      capsys.readouterr().out)
    assert floor and float(floor.group(1)) == pytest.approx(redone["calibration"]["ece_after"], abs=1e-4)
    assert float(floor.group(2)) == pytest.approx(redone["calibration"]["ece_if_calibrated"]["mean"], abs=1e-4)
    assert set(old) <= set(redone) and (tmp_path / MODEL_CARD).is_file()
    torch.testing.assert_close(redone["state_dict"], ckpt["state_dict"])


def test_calibrate_says_when_the_temperature_sits_on_its_search_bound(calibrated, manifests, tmp_path, capsys,
                                                                      caplog):
    """Every validation label moved to the next class: the model is confidently wrong on all of them, the fit
    runs into T = 50 (uniform probabilities). Stored with a flag, and said on the console, in the log and in the
    model card; and so is the small validation set."""
    classes = get_taxonomy(str(manifests / "classes.txt")).classes
    lines = []
    for line in (manifests / "val.txt").read_text().splitlines():
        fields = line.split("\t")
        if line and not line.startswith("#"):
            fields[1] = classes[(classes.index(fields[1]) + 1) % len(classes)]
        lines.append("\t".join(fields))
    val = tmp_path / "val.txt"
    val.write_text("\n".join(lines) + "\n")
    model = tmp_path / "best.pt"
    atomic_torch_save(load_checkpoint(calibrated), model)
    assert cli_main(["calibrate", "--model_path", str(model), "--val_txt", str(val), "--workers", "0",
                     "--n_boot", "50"]) == 0
    cal = load_checkpoint(model)["calibration"]
    assert cal["temperature"] == pytest.approx(50.0, rel=1e-3) and cal["at_search_bound"] is True
    out = capsys.readouterr().out
    assert "Warning: the temperature 50.000 sits on a bound of its search [0.02, 50]" in out
    assert "Warning: the temperature was fitted on only 24 validation images (fewer than 200)" in out
    assert "sits on a bound of its search" in caplog.text and "fewer than 200" in caplog.text
    card = (tmp_path / MODEL_CARD).read_text()
    assert "**Unreliable calibration.**" in card
    assert "The temperature 50.000 sits on a bound of its search [0.02, 50]: the fit found no minimum, so it is " \
           "unreliable" in card


def test_calibrate_names_an_unreadable_validation_image_and_fits_on_the_rest(calibrated, manifests, tmp_path,
                                                                             caplog):
    bad = tmp_path / "broken.jpg"
    bad.write_bytes(b"not an image")
    val = tmp_path / "val.txt"
    lines = (manifests / "val.txt").read_text().splitlines()
    label = next(l for l in lines if l and not l.startswith("#")).split("\t")[1]
    val.write_text("\n".join(lines) + f"\n{bad}\t{label}\t\t\n")
    model = tmp_path / "best.pt"
    atomic_torch_save(load_checkpoint(calibrated), model)
    assert cli_main(["calibrate", "--model_path", str(model), "--val_txt", str(val), "--workers", "0",
                     "--n_boot", "50"]) == 0
    assert "skipped 1 unreadable validation image(s)" in caplog.text and str(bad) in caplog.text
    assert load_checkpoint(model)["calibration"]["n"] == len(read_manifest(manifests / "val.txt",
                                                                           load_predictor(model).taxonomy))


def test_predict_proba_divides_logits_by_the_temperature(calibrated, val_samples):
    predictor = load_predictor(calibrated)
    t = load_checkpoint(calibrated)["calibration"]["temperature"]
    assert predictor.temperature == t and predictor.info["calibration"]["temperature"] == t
    images, _ = next(preprocessed_batches(val_samples, predictor.preprocessing, batch_size=16))
    expected = torch.softmax(predictor.logits(images) / t, dim=1).numpy()
    np.testing.assert_allclose(predictor.predict_proba(images), expected, atol=1e-6)


def test_onnx_export_carries_the_temperature(calibrated, manifests, val_samples, tmp_path):
    out = tmp_path / "model.onnx"
    assert cli_main(["export", "--model_path", str(calibrated), "--output", str(out),
                     "--val_txt", str(manifests / "val.txt")]) == 0
    onnx_model, torch_model = load_predictor(out), load_predictor(calibrated)
    assert onnx_model.calibration == load_checkpoint(calibrated)["calibration"]
    assert onnx_model.abstention_threshold == torch_model.abstention_threshold
    for images, _ in preprocessed_batches(val_samples, torch_model.preprocessing, batch_size=16):
        p_onnx, p_torch = onnx_model.predict_proba(images), torch_model.predict_proba(images)
        assert np.abs(p_onnx - p_torch).max() <= 1e-4
        np.testing.assert_allclose(p_onnx, torch.softmax(onnx_model.logits(images) / onnx_model.temperature,
                                                         dim=1).numpy(), atol=1e-6)


def test_evaluate_abstain_reports_coverage_and_selective_accuracy(calibrated, manifests, tmp_path, capsys):
    out = tmp_path / "eval.csv"
    assert cli_main(["evaluate", "--model_path", str(calibrated), "--val_txt", str(manifests / "val.txt"),
                     "--output_csv", str(out), "--output_html", str(tmp_path / "r.html"), "--abstain",
                     "--n_boot", "50", "--workers", "0"]) == 0
    text = capsys.readouterr().out
    assert "uncalibrated ->" in text and "accuracy on answered" in text and "(perfectly calibrated: " in text
    results = json.loads(out.with_suffix(".metrics.json").read_text())
    ev, cal = results["evaluation"], load_checkpoint(calibrated)["calibration"]
    assert results["model"]["calibration"]["temperature"] == cal["temperature"]
    # Evaluated on the set it was fitted on: the training-time figures come back.
    assert ev["ece"] == pytest.approx(cal["ece_after"], abs=1e-4)
    # Same confidences and seed as at calibration: the same noise floor (up to the CSV's rounding).
    assert ev["ece_if_calibrated"]["mean"] == pytest.approx(cal["ece_if_calibrated"]["mean"], abs=0.01)
    assert ev["calibration"]["ece_before"] == pytest.approx(cal["ece_before"], abs=1e-4)
    assert ev["abstention"]["coverage"] == pytest.approx(cal["abstention"]["coverage"])
    assert ev["abstention"]["selective_accuracy"]["value"] == pytest.approx(cal["abstention"]["accuracy_at_coverage"])
    html = (tmp_path / "r.html").read_text()
    assert "Accuracy on answered images" in html and "calibration.temperature" in html
    assert "if perfectly calibrated: " in html


def test_predict_abstain_labels_low_confidence_faces_uncertain(calibrated, manifests, tmp_path):
    images = sorted((manifests.parent / "images").rglob("*.png"))[:12]
    confidences = sorted(f.confidence for p in Classifier.load(calibrated, detect=False).predict_batch(images)
                         for f in p.faces)
    ckpt = load_checkpoint(calibrated)
    threshold = (confidences[5] + confidences[6]) / 2  # half the images below it
    ckpt["calibration"]["abstention"]["threshold"] = threshold
    model = tmp_path / "best.pt"
    atomic_torch_save(ckpt, model)
    out = tmp_path / "out.csv"
    assert cli_main(["predict", *map(str, images), "--model", str(model), "--no-detect", "--abstain",
                     "--output", str(out)]) == 0
    with open(out, newline="") as f:
        rows = list(csv.DictReader(f))
    assert sum(r["label"] == "uncertain" for r in rows) == 6
    for r in rows:
        assert (r["label"] == "uncertain") == (float(r["confidence"]) < threshold)
        assert r["top_label"] != "uncertain"
    # An explicit --min-confidence wins over the stored threshold.
    assert cli_main(["predict", *map(str, images), "--model", str(model), "--no-detect", "--abstain",
                     "--min-confidence", "0", "--output", str(out)]) == 0
    with open(out, newline="") as f:
        assert all(r["label"] != "uncertain" for r in csv.DictReader(f))
    # A model without a threshold cannot abstain.
    shutil.copy(calibrated.parent / "last.pt", tmp_path / "last.pt")
    with pytest.raises(ValueError, match="abstention threshold"):
        Classifier.load(tmp_path / "last.pt", abstain=True)
