"""Evaluation end to end: every model format the loader recognises, label-space mapping of predictions,
the evaluation command's CSV / JSON / HTML, and the comparison of two real models."""
from __future__ import annotations

import dataclasses
import json
import subprocess
import sys

import numpy as np
import pandas as pd
import pytest
import torch
import torchvision

from conftest import REPO
from race_classifier.data.manifest import read_manifest
from race_classifier.evaluation.runner import (map_probabilities, predict_samples, predictions_from_csv,
                                              predictions_table, write_predictions_csv)
from race_classifier.labels import get_mapping, get_taxonomy
from race_classifier.models.checkpoint import load_model
from race_classifier.models.loaders import ModelLoadError, load_predictor


@pytest.fixture(scope="module")
def val_samples(manifests):
    return read_manifest(manifests / "val.txt", get_taxonomy(str(manifests / "classes.txt")))


def test_map_probabilities_sums_merged_classes_and_renormalises_after_drops():
    ff7, seed5, race4 = get_taxonomy("fairface7"), get_taxonomy("seed5"), get_taxonomy("race4")
    # fairface7 order: White, Black, Latino_Hispanic, East Asian, Southeast Asian, Indian, Middle Eastern
    p = np.array([[0.1, 0.2, 0.1, 0.25, 0.15, 0.1, 0.1]])
    mapped = map_probabilities(p, get_mapping(ff7, seed5))[0]
    # seed5 order: Asian, Black, Indian, White, Latino_Hispanic
    assert mapped == pytest.approx([0.40, 0.2, 0.1, 0.2, 0.1])
    # race4 drops Latino_Hispanic (0.1): the remaining 0.9 is rescaled to 1.
    mapped4 = map_probabilities(p, get_mapping(ff7, race4))[0]  # White, Black, Asian, Indian
    assert mapped4 == pytest.approx(np.array([0.2, 0.2, 0.4, 0.1]) / 0.9)


def test_fairface_release_format_is_recognised(tmp_path, val_samples):
    """FairFace's released models: torchvision ResNet-34, fc with 18 outputs (7 race, 2 gender, 9 age)."""
    torch.manual_seed(0)
    model = torchvision.models.resnet34(num_classes=18)
    path = tmp_path / "res34_fair_align_multi_7.pt"
    torch.save(model.state_dict(), path)
    predictor = load_predictor(path)
    assert predictor.kind == "fairface" and predictor.taxonomy.name == "fairface7"
    assert predictor.preprocessing.image_size == 224
    x = torch.randn(2, 3, 224, 224)
    probs = predictor.predict_proba(x)
    with torch.no_grad():
        expected = torch.softmax(model.eval()(x)[:, :7], dim=1).numpy()
    assert probs.shape == (2, 7) and probs == pytest.approx(expected, abs=1e-5)
    # Saved from DataParallel (module. prefixes), it is the same model.
    torch.save({f"module.{k}": v for k, v in model.state_dict().items()}, tmp_path / "dp.pt")
    assert load_predictor(tmp_path / "dp.pt").predict_proba(x) == pytest.approx(expected, abs=1e-5)
    # Its 7 races map into seed5 by the training tables.
    table = predict_samples(predictor, val_samples[:4], get_taxonomy("seed5"), batch_size=2, workers=0)
    assert table[[f"prob_{k}" for k in range(5)]].sum(axis=1).to_numpy() == pytest.approx(np.ones(4))


def test_checkpoint_torchscript_and_onnx_give_the_same_probabilities(trained_checkpoints, tmp_path, val_samples, manifests):
    ckpt_path = trained_checkpoints[1]
    loaded = load_model(ckpt_path)
    size = loaded.preprocessing.image_size
    example = torch.randn(1, 3, size, size)
    scripted = tmp_path / "model.torchscript.pt"
    torch.jit.trace(loaded.model, example).save(str(scripted))
    onnx_path = tmp_path / "model.onnx"
    torch.onnx.export(loaded.model, (example,), str(onnx_path), input_names=["input"], output_names=["logits"],
                      dynamic_axes={"input": {0: "batch"}, "logits": {0: "batch"}}, dynamo=False)

    classes = str(manifests / "classes.txt")
    with pytest.raises(ModelLoadError, match="does not name its classes"):
        load_predictor(scripted)
    tax = get_taxonomy(classes)
    # The traced graphs carry no temperature: compare with the checkpoint's raw softmax.
    raw = dataclasses.replace(load_predictor(ckpt_path), calibration=None)
    reference = predict_samples(raw, val_samples, tax, batch_size=8, workers=0)
    for path in (scripted, onnx_path):
        other = predict_samples(load_predictor(path, labels=classes, image_size=size), val_samples, tax,
                                batch_size=8, workers=0)
        assert (other["y_pred"] == reference["y_pred"]).all()
        assert other["confidence"].to_numpy() == pytest.approx(reference["confidence"].to_numpy(), abs=1e-4)


def test_not_a_model_file_is_a_clear_error(tmp_path):
    junk = tmp_path / "notes.pt"
    junk.write_text("hello")
    with pytest.raises(ModelLoadError, match="notes.pt"):
        load_predictor(junk)
    with pytest.raises(ModelLoadError, match="not found"):
        load_predictor(tmp_path / "missing.pt")
    bad_onnx = tmp_path / "x.onnx"
    bad_onnx.write_bytes(b"\x00\x01garbage")
    with pytest.raises(ModelLoadError, match="ONNX"):
        load_predictor(bad_onnx, labels="seed5")


def test_predictions_csv_baseline_maps_labels_and_reports_uncovered_images(tmp_path, val_samples):
    seed5 = get_taxonomy("seed5")
    samples = [s.__class__(s.path, i % 5) for i, s in enumerate(val_samples[:5])]
    csv = tmp_path / "prod.csv"
    # fairface7 labels; the last image has no prediction.
    pd.DataFrame({"path": [s.path for s in samples[:4]],
                  "pred_label": ["East Asian", "Black", "Middle Eastern", "latino hispanic"]}).to_csv(csv, index=False)
    table = predictions_from_csv(csv, samples, seed5, labels=get_taxonomy("fairface7"))
    assert [seed5.classes[i] if i >= 0 else None for i in table["y_pred"]] == ["Asian", "Black", "White", "Latino_Hispanic", None]
    assert table["error"].iloc[4].startswith("no prediction")
    assert "prob_0" not in table  # labels only: no probabilities to calibrate


def test_a_baseline_answer_outside_the_evaluated_classes_is_no_answer_not_class_0(tmp_path, val_samples):
    """UTKFace's 'Others' scored in seed5 (which drops it): no seed5 answer, said so; never a silent 'Asian'."""
    seed5 = get_taxonomy("seed5")
    samples = [s.__class__(s.path, 0) for s in val_samples[:3]]  # all Asian
    csv = tmp_path / "prod.csv"
    pd.DataFrame({"path": [s.path for s in samples], "pred_label": ["Others", "Asian", "White"]}).to_csv(csv, index=False)
    table = predictions_from_csv(csv, samples, seed5, labels=get_taxonomy("utkface5"))
    assert table["error"].iloc[0] == "prod.csv:2: predicted 'Others', which seed5 does not have"
    assert table["y_pred"].tolist() == [-1, 0, 3]


def test_this_tools_own_csv_with_an_unreadable_image_is_a_valid_baseline(tmp_path, val_samples):
    seed5 = get_taxonomy("seed5")
    samples = [s.__class__(s.path, i) for i, s in enumerate(val_samples[:3])]
    probs = np.array([[0.6, 0.1, 0.1, 0.1, 0.1], [np.nan] * 5, [0.1, 0.1, 0.6, 0.1, 0.1]])
    table = predictions_table(samples, probs, {1: "file not found"}, 5)
    csv = tmp_path / "results.csv"
    write_predictions_csv(table, seed5.classes, csv)
    again = predictions_from_csv(csv, samples, seed5)
    assert again["y_pred"].tolist() == [0, -1, 2]
    assert again["error"].iloc[1] == "results.csv:3: file not found"
    np.testing.assert_allclose(again[[f"prob_{k}" for k in range(5)]].to_numpy()[[0, 2]], probs[[0, 2]], atol=1e-6)


def test_evaluation_and_comparison_commands(trained_checkpoints, manifests, tmp_path):
    images = manifests.parent / "images"
    corrupt = images / "rings" / "id000" / "corrupt.png"
    corrupt.write_bytes(b"not a png")
    try:
        out = tmp_path / "eval"
        cmd = [sys.executable, str(REPO / "evaluation.py"), "--root_dir", str(images),
               "--model_path", str(trained_checkpoints[1]), "--output_csv", str(out / "results.csv"),
               "--output_html", str(out / "report.html"), "--workers", "0", "--n_boot", "200"]
        done = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO)
        assert done.returncode == 0, done.stderr
        rows = pd.read_csv(out / "results.csv", keep_default_na=False)
        n_images = len(list(images.rglob("*.png")))
        assert len(rows) == n_images  # every image has a row, the unreadable one too
        bad = rows[rows["path"].str.endswith("corrupt.png")]
        assert len(bad) == 1 and bad["error"].iloc[0] and bad["predicted_label"].iloc[0] == ""
        good = rows[rows["error"] == ""]
        assert ((good["true_label"] == good["predicted_label"]) == good["correct"].astype(str).eq("True")).all()
        assert {"prob_stripes", "prob_checks", "prob_rings", "prob_dots", "confidence"} <= set(rows.columns)
        metrics = json.loads((out / "results.metrics.json").read_text())["evaluation"]
        assert metrics["n_errors"] == 1
        assert metrics["accuracy"]["value"] == pytest.approx(good["correct"].astype(str).eq("True").mean())
        html = (out / "report.html").read_text()
        for section in ("summary", "per-class", "confusion", "calibration", "subgroups", "mistakes", "counts", "model"):
            assert f'id="{section}"' in html
        assert f"images: {images}" in html  # where the figures come from
        assert "accuracy" in done.stdout and "[" in done.stdout  # CI printed

        cmp_out = tmp_path / "cmp"
        cmd = [sys.executable, "-m", "race_classifier.cli", "compare", "--root_dir", str(images),
               "--model_path", str(trained_checkpoints[1]), "--baseline_path", str(trained_checkpoints[0]),
               "--output_csv", str(cmp_out / "a.csv"), "--output_html", str(cmp_out / "cmp.html"),
               "--workers", "0", "--n_boot", "200"]
        done = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO)
        assert done.returncode == 0, done.stderr
        assert "McNemar" in done.stdout
        comparison = json.loads((cmp_out / "a.metrics.json").read_text())["comparison"]
        assert comparison["n_common"] == n_images - 1
        a = pd.read_csv(cmp_out / "a.csv", keep_default_na=False)
        b = pd.read_csv(cmp_out / "a.baseline.csv", keep_default_na=False)
        acc = [(t["error"] == "") & (t["true_label"] == t["predicted_label"]) for t in (a, b)]
        overall = comparison["overall"][0]
        assert overall["diff"] == pytest.approx((acc[0].sum() - acc[1].sum()) / comparison["n_common"])
        assert 'id="comparison"' in (cmp_out / "cmp.html").read_text()
    finally:
        corrupt.unlink()
