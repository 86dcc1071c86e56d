"""Last-layer rebalancing: the refit is a real logistic regression folded into the model's last layer, the
weights balance what they say they balance, and the CLI writes a calibrated checkpoint with a card."""
from __future__ import annotations

from collections import defaultdict

import numpy as np
import pytest
import torch

from race_classifier.cli import main as cli_main
from race_classifier.data.manifest import read_manifest
from race_classifier.models.checkpoint import load_checkpoint, load_model
from race_classifier.training.rebalance import balance_weights, extract_features, fit_last_layer, last_linear


def test_folded_layer_reproduces_the_regression():
    from sklearn.linear_model import LogisticRegression
    from sklearn.preprocessing import StandardScaler
    rng = np.random.default_rng(0)
    x = rng.normal(size=(300, 6)) * [1, 5, 0.1, 2, 3, 1] + [0, 10, -3, 1, 0, 2]
    y = (x[:, 0] + 0.2 * x[:, 1] > 2).astype(int) + (x[:, 3] > 1)
    weight, bias = fit_last_layer(x, y, num_classes=4)  # class 3 never occurs
    scaler = StandardScaler().fit(x)
    reference = LogisticRegression(max_iter=2000).fit(scaler.transform(x), y)
    ours = x @ weight.T + bias
    np.testing.assert_array_equal(ours.argmax(1), reference.predict(scaler.transform(x)))
    np.testing.assert_allclose(ours[:, :3], reference.decision_function(scaler.transform(x)), atol=1e-6)
    assert (ours[:, 3] < -1000).all()


def test_balance_weights_equalise_classes_and_cells():
    labels = np.array([0] * 6 + [1] * 2 + [2] * 4)
    genders = ["Male"] * 5 + ["Female"] + ["Male", ""] + ["Female"] * 4
    assert balance_weights(labels, genders, "none", 3) is None
    per_class = defaultdict(float)
    for y, w in zip(labels, balance_weights(labels, genders, "sampler", 3)):
        per_class[y] += w
    assert np.allclose(list(per_class.values()), per_class[0])
    per_cell = defaultdict(float)
    w = balance_weights(labels, genders, "group", 3)
    for y, g, wi in zip(labels, genders, w):
        per_cell[(y, g)] += wi
    assert len(per_cell) == 5 and np.allclose(list(per_cell.values()), per_cell[(0, "Male")])
    assert w.mean() == pytest.approx(1.0)


def test_rebalance_cli_writes_a_calibrated_checkpoint(trained_checkpoints, manifests, tmp_path):
    source = trained_checkpoints[1]
    out = tmp_path / "group"
    assert cli_main(["rebalance", "--model_path", str(source), "--train_txt", str(manifests / "train.txt"),
                     "--val_txt", str(manifests / "val.txt"), "--balance", "group", "--out_dir", str(out),
                     "--workers", "0"]) == 0
    ckpt = load_checkpoint(out / "best.pt")
    assert "calibration" in ckpt and (out / "MODEL_CARD.md").is_file()
    assert ckpt["train_args"]["last_layer_rebalance"] == "group"
    old, new = load_model(source), load_model(out / "best.pt")
    name, linear = last_linear(new.model)
    # Only the last layer changed; the new model's logits are the refitted layer applied to the old features.
    changed = [k for k, v in new.model.state_dict().items() if not torch.equal(v, old.model.state_dict()[k])]
    assert changed and all(k.startswith(name + ".") for k in changed)
    samples = read_manifest(manifests / "val.txt", new.taxonomy)
    feats, ok = extract_features(old.model, samples, old.preprocessing, workers=0)
    assert ok.all()
    from race_classifier.evaluation.runner import predict_logits
    from race_classifier.models.loaders import load_predictor
    logits, _ = predict_logits(load_predictor(out / "best.pt"), samples, workers=0)
    expected = feats @ linear.weight.detach().numpy().T + linear.bias.detach().numpy()
    np.testing.assert_allclose(logits, expected, rtol=1e-4, atol=1e-4)
