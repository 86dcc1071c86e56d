"""ensemble: several trained runs as one model file answering with exactly the mean of their calibrated
probabilities (checkpoint and ONNX), recalibrated, with a model card; the post-training changes work on it;
misuse is refused naming the file."""
from __future__ import annotations

import numpy as np
import pytest
import torch
import yaml

from race_classifier.cli import main as cli_main
from race_classifier.data.manifest import read_manifest
from race_classifier.evaluation.runner import predict_logits
from race_classifier.models.checkpoint import load_checkpoint
from race_classifier.models.loaders import load_predictor
from race_classifier.training.train import main as train_main

from conftest import train_args
from test_merge_classes import merged_image


def ensemble(models, manifests, out) -> int:
    return cli_main(["ensemble", "--model_path", *map(str, models), "--val_txt", str(manifests / "val.txt"),
                     "--out_dir", str(out), "--workers", "0"])


@pytest.fixture(scope="module")
def ensemble_of_two(trained_checkpoints, manifests, tmp_path_factory):
    out = tmp_path_factory.mktemp("ensemble")
    assert ensemble(trained_checkpoints, manifests, out) == 0
    return out / "best.pt"


def mean_member_probs(members, samples) -> np.ndarray:
    probs = []
    for path in members:
        member = load_predictor(path)
        logits, _ = predict_logits(member, samples, workers=0)
        probs.append(torch.softmax(torch.as_tensor(logits) / member.temperature, 1).numpy())
    assert not np.allclose(probs[0], probs[1], atol=1e-3)  # two different models, or the test proves nothing
    return np.mean(probs, axis=0)


def test_an_ensemble_answers_with_the_mean_of_its_members_calibrated_probabilities(
        ensemble_of_two, trained_checkpoints, manifests, tmp_path):
    model = load_predictor(ensemble_of_two)
    samples = read_manifest(manifests / "val.txt", model.taxonomy)
    mean = mean_member_probs(trained_checkpoints, samples)
    logits, _ = predict_logits(model, samples, workers=0)
    # Its logits are the log of the members' mean calibrated probabilities...
    np.testing.assert_allclose(torch.softmax(torch.as_tensor(logits), 1).numpy(), mean, atol=1e-5)
    # ...and what it answers is those after its own temperature, fitted on the validation manifest.
    ckpt = load_checkpoint(ensemble_of_two)
    assert model.temperature == pytest.approx(ckpt["calibration"]["temperature"]) and model.abstention_threshold
    images = torch.stack([merged_image(model, s.path) for s in samples[:8]])
    expected = torch.softmax(torch.log(torch.as_tensor(mean[:8])) / model.temperature, 1).numpy()
    np.testing.assert_allclose(model.predict_proba(images), expected, atol=1e-5)

    members = ckpt["ensemble"]["members"]
    assert [m["source"] for m in members] == [str(p) for p in trained_checkpoints]
    assert [m["temperature"] for m in members] == [pytest.approx(load_predictor(p).temperature)
                                                   for p in trained_checkpoints]
    assert "the mean calibrated probabilities of 2 models" in model.info["ensemble"]
    card = (ensemble_of_two.parent / "MODEL_CARD.md").read_text()
    assert "the model is an ensemble: it answers with the mean calibrated probabilities of 2 models" in card
    assert all(f"`{p}`" in card for p in trained_checkpoints)

    # Its ONNX export is the same model (export verifies parity with PyTorch before writing).
    onnx_path = tmp_path / "ensemble.onnx"
    assert cli_main(["export", "--model_path", str(ensemble_of_two), "--output", str(onnx_path)]) == 0
    exported = load_predictor(onnx_path)
    assert "2 models" in exported.info["source"]["ensemble"]
    np.testing.assert_allclose(exported.predict_proba(images), model.predict_proba(images), atol=1e-4)


def test_members_that_preprocess_differently_each_get_their_own_input(trained_checkpoints, manifests, tmp_path):
    """A member on another size, normalisation and box of the chip (as a 112 px MobileFaceNet on ArcFace's box
    beside a 160 px MobileNetV2): the ensemble takes the whole chip and makes each member's input in the
    network, so it answers with the mean of what each member answers on its own preprocessing (up to the
    8-bit rounding of Pillow's resize), and its ONNX export is the same model."""
    one, three = trained_checkpoints
    other = load_checkpoint(three)
    other["preprocessing"].update(image_size=24, mean=[0.5, 0.5, 0.5], std=[0.5, 0.5, 0.5])
    other["preprocessing"]["crop"].update(chip_box=[-3, -6, 35, 32], chip_size=32, template="arcface")
    boxed = tmp_path / "boxed.pt"
    torch.save(other, boxed)
    assert ensemble([one, boxed], manifests, tmp_path / "mixed") == 0
    mixed = tmp_path / "mixed" / "best.pt"
    ckpt = load_checkpoint(mixed)
    assert ckpt["preprocessing"]["image_size"] == 32 and ckpt["preprocessing"]["mean"] == [0.0, 0.0, 0.0]
    assert "chip_box" not in ckpt["preprocessing"]["crop"]
    assert [m["preprocessing"]["image_size"] for m in ckpt["ensemble"]["members"]] == [32, 24]

    model = load_predictor(mixed)
    samples = read_manifest(manifests / "val.txt", model.taxonomy)
    mean = mean_member_probs([one, boxed], samples)
    logits, _ = predict_logits(model, samples, workers=0)
    got = torch.softmax(torch.as_tensor(logits), 1).numpy()
    np.testing.assert_allclose(got, mean, atol=5e-3)
    assert (got.argmax(1) == mean.argmax(1)).mean() >= 0.95

    onnx_path = tmp_path / "mixed.onnx"  # export checks parity with PyTorch before writing
    assert cli_main(["export", "--model_path", str(mixed), "--output", str(onnx_path)]) == 0
    images = torch.stack([merged_image(model, s.path) for s in samples[:8]])
    np.testing.assert_allclose(load_predictor(onnx_path).predict_proba(images), model.predict_proba(images),
                               atol=1e-4)


def test_recall_offsets_and_merged_classes_work_on_an_ensemble(ensemble_of_two, manifests, tmp_path):
    out = tmp_path / "recall"
    assert cli_main(["rebalance", "--model_path", str(ensemble_of_two), "--train_txt", str(manifests / "train.txt"),
                     "--val_txt", str(manifests / "val.txt"), "--balance", "recall", "--min_recall", "0.9",
                     "--out_dir", str(out), "--workers", "0"]) == 0
    offsets = np.array(load_checkpoint(out / "best.pt")["ensemble"]["offsets"])
    assert offsets.any()
    samples = read_manifest(manifests / "val.txt", load_predictor(ensemble_of_two).taxonomy)
    before, _ = predict_logits(load_predictor(ensemble_of_two), samples, workers=0)
    after, _ = predict_logits(load_predictor(out / "best.pt"), samples, workers=0)
    np.testing.assert_allclose(after, before + offsets, atol=1e-5)
    card = (out / "MODEL_CARD.md").read_text()
    assert card.index("the model is an ensemble") < card.index("were added to the averaged race logits")

    label_map = tmp_path / "merge.yaml"
    label_map.write_text(yaml.safe_dump({"stripes": "lines", "checks": "lines", "rings": "spots", "dots": "spots"}))
    merged = tmp_path / "merged"
    assert cli_main(["merge-classes", "--model_path", str(ensemble_of_two), "--taxonomy", "lines,spots",
                     "--label_map", str(label_map), "--val_txt", str(manifests / "val.txt"), "--out_dir", str(merged),
                     "--workers", "0"]) == 0
    coarse = load_predictor(merged / "best.pt")
    calibrated = torch.softmax(torch.as_tensor(before) / load_predictor(ensemble_of_two).temperature, 1).numpy()
    lines = calibrated[:, :2].sum(axis=1)  # stripes + checks, after the ensemble's own temperature
    merged_logits, _ = predict_logits(coarse, read_manifest(manifests / "val.txt", coarse.taxonomy,
                                                            _mapping(manifests, label_map)), workers=0)
    np.testing.assert_allclose(torch.softmax(torch.as_tensor(merged_logits), 1).numpy()[:, 0], lines, atol=1e-5)


def _mapping(manifests, label_map):
    from race_classifier.labels import get_mapping, get_taxonomy, load_label_map
    return get_mapping(get_taxonomy(str(manifests / "classes.txt")), get_taxonomy("lines,spots"),
                       load_label_map(label_map))


def test_misuse_is_refused_naming_the_file(ensemble_of_two, trained_checkpoints, multitask_checkpoint, manifests,
                                           tmp_path, caplog):
    one, three = trained_checkpoints
    assert ensemble([one], manifests, tmp_path / "single") == 2
    assert "at least two" in caplog.text

    other = load_checkpoint(three)
    other["preprocessing"]["crop"]["margin"] = 0.4  # faces cut from other chips: no one input serves both
    changed = tmp_path / "changed.pt"
    torch.save(other, changed)
    assert ensemble([one, changed], manifests, tmp_path / "a") == 2
    assert f"{one}, {changed}: these members cut their faces from different chips" in caplog.text
    assert not (tmp_path / "a").exists()

    assert ensemble([one, multitask_checkpoint], manifests, tmp_path / "b") == 2
    assert f"{multitask_checkpoint} has gender/age heads" in caplog.text
    assert ensemble([one, ensemble_of_two], manifests, tmp_path / "c") == 2
    assert f"{ensemble_of_two} is an ensemble already" in caplog.text
    assert ensemble([one, three], manifests, one.parent) == 2
    assert f"--out_dir {one.parent} is {one}'s own folder" in caplog.text

    assert cli_main(["rebalance", "--model_path", str(ensemble_of_two), "--train_txt", str(manifests / "train.txt"),
                     "--val_txt", str(manifests / "val.txt"), "--out_dir", str(tmp_path / "r"),
                     "--balance", "group"]) == 2
    assert "is an ensemble: refit the last layers of its members" in caplog.text
    assert train_main(train_args(manifests, tmp_path / "t", "--num_epochs", "1",
                                 "--initial_checkpoint", str(ensemble_of_two))) == 2
    assert "train from one of its members" in caplog.text
