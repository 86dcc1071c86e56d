"""--amp for inference (predict, evaluate, soft-labels): bf16 autocast of PyTorch models, close to fp32 and
recorded; refused where it cannot run; ONNX files run as exported."""
from __future__ import annotations

import logging

import numpy as np
import pytest

from race_classifier.cli import main as cli_main
from race_classifier.data.dataset import preprocessed_batches
from race_classifier.data.manifest import read_manifest
from race_classifier.labels import get_taxonomy
from race_classifier.models.loaders import ModelLoadError, load_predictor


@pytest.fixture(scope="module")
def images(trained_checkpoints, manifests):
    samples = read_manifest(manifests / "val.txt", get_taxonomy(str(manifests / "classes.txt")))
    batch, _ = next(preprocessed_batches(samples, load_predictor(trained_checkpoints[1]).preprocessing,
                                         batch_size=32))
    return batch


def test_bf16_autocast_is_close_to_fp32_and_recorded(trained_checkpoints, images):
    fp32, bf16 = load_predictor(trained_checkpoints[1]), load_predictor(trained_checkpoints[1], amp="bf16")
    p32, p16 = fp32.predict_proba(images), bf16.predict_proba(images)
    assert p16.dtype == p32.dtype and np.allclose(p16.sum(axis=1), 1, atol=1e-5)
    difference = np.abs(p32 - p16).max()
    assert 0 < difference < 0.1  # autocast ran (bf16 keeps 8 bits of mantissa), and stays close
    assert (p32.argmax(1) == p16.argmax(1)).mean() >= 0.9
    assert bf16.info["precision"] == "bf16 autocast" and "precision" not in fp32.info


def test_evaluate_with_amp_reports_it(trained_checkpoints, manifests, tmp_path):
    html = tmp_path / "report.html"
    assert cli_main(["evaluate", "--model_path", str(trained_checkpoints[1]), "--val_txt", str(manifests / "val.txt"),
                     "--output_csv", str(tmp_path / "p.csv"), "--output_html", str(html), "--n_boot", "20",
                     "--workers", "0", "--device", "cpu", "--amp", "bf16"]) == 0
    assert "bf16 autocast" in html.read_text()


def test_fp16_on_cpu_is_refused_and_onnx_runs_as_exported(trained_checkpoints, manifests, images, tmp_path, caplog):
    with pytest.raises(ModelLoadError, match="fp16 needs a CUDA device"):
        load_predictor(trained_checkpoints[1], amp="fp16")
    onnx_path = tmp_path / "model.onnx"
    assert cli_main(["export", "--model_path", str(trained_checkpoints[1]), "--output", str(onnx_path)]) == 0
    with caplog.at_level(logging.WARNING):
        onnx = load_predictor(onnx_path, amp="bf16")
    assert "applies to PyTorch models" in caplog.text and "precision" not in onnx.info
    np.testing.assert_allclose(onnx.predict_proba(images), load_predictor(onnx_path).predict_proba(images))
