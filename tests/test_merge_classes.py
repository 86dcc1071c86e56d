"""merge-classes: a model trained in finer classes answers in coarser ones everywhere (checkpoint, ONNX), with
exactly its calibrated probabilities summed, its own recalibration and model card; misuse is refused."""
from __future__ import annotations

import numpy as np
import pytest
import torch
import yaml

from race_classifier.cli import main as cli_main
from race_classifier.data.manifest import read_manifest
from race_classifier.evaluation.runner import map_probabilities, predict_logits
from race_classifier.labels import get_mapping, get_taxonomy, load_label_map
from race_classifier.models.checkpoint import load_checkpoint
from race_classifier.models.loaders import load_predictor
from race_classifier.training.train import main as train_main

from conftest import train_args

COARSE = "lines,spots"
MERGE = {"stripes": "lines", "checks": "lines", "rings": "spots", "dots": "spots"}


@pytest.fixture(scope="module")
def label_map(tmp_path_factory):
    path = tmp_path_factory.mktemp("map") / "merge.yaml"
    path.write_text(yaml.safe_dump(MERGE))
    return path


def merge(model, manifests, out, label_map, *extra) -> int:
    return cli_main(["merge-classes", "--model_path", str(model), "--taxonomy", COARSE, "--label_map", str(label_map),
                     "--val_txt", str(manifests / "val.txt"), "--out_dir", str(out), "--workers", "0", *extra])


def test_merged_model_answers_with_the_summed_calibrated_probabilities(trained_checkpoints, manifests, label_map,
                                                                      tmp_path, capsys):
    source = trained_checkpoints[1]
    out = tmp_path / "merged"
    assert merge(source, manifests, out, label_map) == 0
    assert "stripes + checks -> lines, rings + dots -> spots" in capsys.readouterr().out

    fine, merged = load_predictor(source), load_predictor(out / "best.pt")
    assert merged.taxonomy.classes == ("lines", "spots")
    assert "stripes + checks -> lines" in merged.info["merged_classes"]
    ckpt = load_checkpoint(out / "best.pt")
    assert ckpt["merged_classes"]["temperature"] == pytest.approx(fine.temperature)
    assert merged.temperature == pytest.approx(ckpt["calibration"]["temperature"]) and merged.abstention_threshold

    samples = read_manifest(manifests / "val.txt", fine.taxonomy)
    fine_logits, _ = predict_logits(fine, samples, workers=0)
    mapping = get_mapping(fine.taxonomy, get_taxonomy(COARSE), load_label_map(label_map))
    fine_probs = torch.softmax(torch.as_tensor(fine_logits) / fine.temperature, 1).numpy()
    summed = map_probabilities(fine_probs, mapping)
    merged_logits, _ = predict_logits(merged, samples, workers=0)
    # The merged model's logits are the log of the summed calibrated probabilities...
    np.testing.assert_allclose(torch.softmax(torch.as_tensor(merged_logits), 1).numpy(), summed, atol=1e-5)
    # ...and what it answers is those, after its own temperature.
    images = torch.stack([merged_image(merged, s.path) for s in samples[:8]])
    expected = torch.softmax(torch.log(torch.as_tensor(summed[:8])) / merged.temperature, 1).numpy()
    np.testing.assert_allclose(merged.predict_proba(images), expected, atol=1e-5)

    card = (out / "MODEL_CARD.md").read_text()
    assert f"the race probabilities of `{source}`" in card and "stripes + checks -> lines" in card
    assert "lines" in card and "Asian" not in card
    trained_at = load_checkpoint(source)["saved_at"]  # the network's training, not the merge, dates the card
    assert f"- Training date: {trained_at} (when training saved these weights); card written " in card

    # Its ONNX export answers in the merged classes too, as the checkpoint does (export verifies parity).
    onnx_path = tmp_path / "merged.onnx"
    assert cli_main(["export", "--model_path", str(out / "best.pt"), "--output", str(onnx_path),
                     "--val_txt", str(manifests / "val.txt"), "--source_taxonomy", str(manifests / "classes.txt")]) == 0
    exported = load_predictor(onnx_path)
    assert exported.taxonomy.classes == ("lines", "spots")
    assert "stripes + checks -> lines" in exported.info["source"]["merged_classes"]
    np.testing.assert_allclose(exported.predict_proba(images), merged.predict_proba(images), atol=1e-4)


def merged_image(predictor, path):
    from PIL import Image

    from race_classifier.data.transforms import build_transform
    return build_transform(predictor.preprocessing, False)(Image.open(path).convert("RGB"))


def test_other_heads_pass_through_unchanged(multitask_checkpoint, multitask_manifests, label_map, tmp_path):
    out = tmp_path / "merged"
    assert merge(multitask_checkpoint, multitask_manifests, out, label_map) == 0
    fine, merged = load_predictor(multitask_checkpoint), load_predictor(out / "best.pt")
    assert merged.heads.names == ("race", "gender", "age") and merged.heads.get("race").classes == ("lines", "spots")
    samples = read_manifest(multitask_manifests / "val.txt", fine.taxonomy, keep_unlabelled=True)[:16]
    images = torch.stack([merged_image(merged, s.path) for s in samples])
    np.testing.assert_allclose(merged.all_logits(images)[:, 2:], fine.all_logits(images)[:, 4:], atol=1e-6)


def test_misuse_is_refused_with_a_clear_error(trained_checkpoints, manifests, label_map, tmp_path, caplog):
    source = trained_checkpoints[1]
    unreached = tmp_path / "unreached.yaml"
    unreached.write_text(yaml.safe_dump({k: "lines" for k in MERGE}))
    assert merge(source, manifests, tmp_path / "a", unreached) == 2
    assert "spots of custom would never be predicted" in caplog.text and not (tmp_path / "a" / "best.pt").exists()

    assert merge(source, manifests, source.parent, label_map) == 2
    assert "its model card would be overwritten" in caplog.text

    out = tmp_path / "merged"
    assert merge(source, manifests, out, label_map) == 0
    assert merge(out / "best.pt", manifests, tmp_path / "twice", label_map) == 2
    assert "already answers in merged classes" in caplog.text
    assert cli_main(["rebalance", "--model_path", str(out / "best.pt"), "--train_txt", str(manifests / "train.txt"),
                     "--val_txt", str(manifests / "val.txt"), "--out_dir", str(tmp_path / "r"),
                     "--source_taxonomy", str(manifests / "classes.txt"), "--balance", "group"]) == 2
    assert "refit the last layer of the model it was made from" in caplog.text
    assert train_main(train_args(manifests, tmp_path / "t", "--num_epochs", "1", "--taxonomy", COARSE,
                                 "--source_taxonomy", str(manifests / "classes.txt"), "--label_map", str(label_map),
                                 "--initial_checkpoint", str(out / "best.pt"))) == 2
    assert "train from the model it was made from" in caplog.text


def test_recall_offsets_on_a_merged_model_go_on_its_merged_logits(trained_checkpoints, manifests, label_map,
                                                                   tmp_path):
    merged = tmp_path / "merged"
    assert merge(trained_checkpoints[1], manifests, merged, label_map) == 0
    out = tmp_path / "recall"
    assert cli_main(["rebalance", "--model_path", str(merged / "best.pt"), "--train_txt", str(manifests / "train.txt"),
                     "--val_txt", str(manifests / "val.txt"), "--source_taxonomy", str(manifests / "classes.txt"),
                     "--balance", "recall", "--min_recall", "0.6", "--out_dir", str(out), "--workers", "0"]) == 0
    offsets = np.array(load_checkpoint(out / "best.pt")["merged_classes"]["offsets"])
    assert offsets.any()
    coarse = get_taxonomy(COARSE)
    samples = read_manifest(manifests / "val.txt", coarse, get_mapping(get_taxonomy(str(manifests / "classes.txt")),
                                                                       coarse, load_label_map(label_map)))
    before, _ = predict_logits(load_predictor(merged / "best.pt"), samples, workers=0)
    after, _ = predict_logits(load_predictor(out / "best.pt"), samples, workers=0)
    np.testing.assert_allclose(after, before + offsets, atol=1e-5)
    card = (out / "MODEL_CARD.md").read_text()
    assert card.index("answers in classes merged") < card.index("were added to the merged race logits")
