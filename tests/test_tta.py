"""Horizontal-flip test-time augmentation: one implementation (``Predictor.predict_proba``), used by
evaluate/compare, predict and the Python API, for checkpoints and ONNX exports alike."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from race_classifier import Classifier
from race_classifier.cli import main as cli_main
from race_classifier.data.dataset import preprocessed_batches
from race_classifier.data.manifest import read_manifest
from race_classifier.labels import get_taxonomy
from race_classifier.models.loaders import load_predictor


@pytest.fixture(scope="module")
def model(trained_checkpoints):
    return trained_checkpoints[1]


@pytest.fixture(scope="module")
def images(model, manifests):
    samples = read_manifest(manifests / "val.txt", get_taxonomy(str(manifests / "classes.txt")))
    batch, _ = next(preprocessed_batches(samples, load_predictor(model).preprocessing, batch_size=16))
    return batch


def _check_tta(predictor, images):
    plain = predictor.predict_proba(images)
    mirrored = predictor.predict_proba(torch.flip(images, dims=[3]))
    with_tta = predictor.predict_proba(images, tta=True)
    np.testing.assert_allclose(with_tta, (plain + mirrored) / 2, atol=1e-6)
    np.testing.assert_allclose(with_tta.sum(axis=1), 1.0, atol=1e-5)
    assert not np.allclose(with_tta, plain)  # the mirror is a different input to this (asymmetric) model
    predictor.set_tta(True)
    np.testing.assert_allclose(predictor.predict_proba(images), with_tta, atol=1e-6)
    assert "horizontal flip" in predictor.info["tta"]
    np.testing.assert_allclose(predictor.predict_proba(images, tta=False), plain, atol=1e-6)
    return with_tta


def test_tta_averages_calibrated_probabilities_of_image_and_mirror(model, images, manifests, tmp_path):
    checkpoint = load_predictor(model)
    assert checkpoint.temperature != 1.0 and not checkpoint.tta
    p_torch = _check_tta(checkpoint, images)
    onnx_path = tmp_path / "model.onnx"
    assert cli_main(["export", "--model_path", str(model), "--output", str(onnx_path),
                     "--val_txt", str(manifests / "val.txt")]) == 0
    p_onnx = _check_tta(load_predictor(onnx_path), images)
    assert np.abs(p_onnx - p_torch).max() <= 1e-4
    assert load_predictor(onnx_path, tta=True).tta


def test_evaluate_and_compare_record_tta(model, trained_checkpoints, manifests, tmp_path, capsys):
    common = ["--val_txt", str(manifests / "val.txt"), "--n_boot", "20", "--workers", "0"]
    plain, tta = tmp_path / "plain.csv", tmp_path / "tta.csv"
    assert cli_main(["evaluate", "--model_path", str(model), "--output_csv", str(plain), *common]) == 0
    assert cli_main(["compare", "--model_path", str(model), "--output_csv", str(tta), "--tta",
                     "--baseline_path", str(model), *common]) == 0
    a = json.loads(plain.with_suffix(".metrics.json").read_text())
    b = json.loads(tta.with_suffix(".metrics.json").read_text())
    assert a["tta"] is False and b["tta"] is True and "horizontal flip" in b["model"]["tta"]
    assert "calibration" in a["evaluation"] and "calibration" not in b["evaluation"]  # raw softmax unrecoverable
    assert b["comparison"]["baseline_info"].get("tta") is None  # --baseline_tta not given
    assert "flip TTA" in capsys.readouterr().out
    assert cli_main(["evaluate", "--model_path", str(model), "--output_csv", str(tta), "--baseline_tta",
                     *common]) == 2  # nothing to apply it to


def test_predict_and_api_tta(model, manifests, tmp_path):
    images = sorted((manifests.parent / "images").rglob("*.png"))[:6]
    plain = Classifier.load(model, detect=False).predict_batch(images)
    tta = Classifier.load(model, detect=False, tta=True).predict_batch(images)
    assert [f.confidence for p in plain for f in p.faces] != [f.confidence for p in tta for f in p.faces]
    out = tmp_path / "out.json"
    assert cli_main(["predict", *map(str, images), "--model", str(model), "--no-detect", "--tta",
                     "--output", str(out)]) == 0
    result = json.loads(out.read_text())
    assert result["tta"] is True
    got = [f["probabilities"] for img in result["images"] for f in img["faces"]]
    want = [f.probabilities for p in tta for f in p.faces]
    for g, w in zip(got, want, strict=True):
        assert g == pytest.approx(w, abs=1e-6)
