"""bench/accuracy.py end to end on the synthetic set with a tiny model: every variant trained, evaluated
(with and without TTA) and written to the JSON table; finished runs reused; missing manifests explained."""
from __future__ import annotations

import json

import pytest
import yaml

from conftest import ARCH, REPO, load_script


@pytest.fixture(scope="module")
def bench():
    return load_script(REPO / "bench" / "accuracy.py", "bench_accuracy")


def _recipe(tmp_path, manifests, **overrides):
    cfg = {"dataset": "smoke", "train_txt": str(manifests / "train.txt"), "val_txt": str(manifests / "val.txt"),
           "arch": ARCH, "image_size": 32, "batch_size": 8, "num_epochs": 1, "learning_rate": 0.003,
           "workers": 0, **overrides}
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def test_bench_trains_every_variant_and_writes_the_table(bench, manifests, tmp_path, capsys):
    recipe, out = _recipe(tmp_path, manifests), tmp_path / "bench.json"
    argv = ["--config", str(recipe), "--out_dir", str(tmp_path / "runs"), "--n_boot", "20"]
    assert bench.main([*argv, "--variants", "none,sampler,group", "--tta", "--json", str(out)]) == 0
    result = json.loads(out.read_text())
    assert [(r["variant"], r["tta"]) for r in result["rows"]] == [
        (v, t) for v in ("none", "sampler", "group") for t in (False, True)]
    for row in result["rows"]:
        assert set(bench.COLUMNS) <= set(row)
        assert 0 <= row["accuracy"]["value"] <= 1 and row["accuracy"]["ci_low"] <= row["accuracy"]["ci_high"]
        assert row["worst_class"]["accuracy"] <= row["balanced_accuracy"]["value"] + 1e-9
        assert (row["ece_before"] is None) == row["tta"] and row["ece_after"] is not None
        assert 0 < row["ece_after_if_calibrated"]["mean"] <= row["ece_after_if_calibrated"]["p95"]
    assert set(result["variants"]) == {"none", "sampler", "group"}
    text = capsys.readouterr().out
    assert "accuracy [95% CI]" in text and "worst race × gender" in text
    assert "cal. ECE if perfectly calibrated" in text and " expected, 95% <= " in text
    # A finished run is reused, not retrained.
    assert bench.main([*argv, "--variants", "sampler"]) == 0
    assert "reusing the finished run" in capsys.readouterr().out


def test_bench_without_manifests_prints_the_prepare_command(bench, manifests, tmp_path, capsys):
    recipe = _recipe(tmp_path, manifests, train_txt=str(tmp_path / "runs/fairface_x/train.txt"), taxonomy="seed5")
    assert bench.main(["--config", str(recipe)]) == 2
    err = capsys.readouterr().err
    assert "race-classifier prepare fairface ../shared/data/fairface --out" in err and "--taxonomy seed5" in err


def test_bench_compares_given_models_with_heads_refits_and_another_taxonomy(bench, manifests, tmp_path, capsys):
    """Race-only next to multi-task (with its head accuracies), last-layer refits beside each, and a
    re-ordered taxonomy that must score exactly the same."""
    from race_classifier.training.train import main as train_main
    from conftest import train_args, with_gender_and_age
    data = tmp_path / "mt"
    data.mkdir()
    for name in ("train.txt", "val.txt"):
        with_gender_and_age(manifests / name, data / name)
    (data / "classes.txt").write_text((manifests / "classes.txt").read_text())
    race_only, multitask = tmp_path / "race", tmp_path / "multi"
    assert train_main(train_args(data, race_only, "--num_epochs", "1")) == 0
    assert train_main(train_args(data, multitask, "--num_epochs", "1", "--heads", "race,gender,age")) == 0
    recipe = _recipe(tmp_path, data, taxonomy=str(data / "classes.txt"))
    out = tmp_path / "bench.json"
    argv = ["--config", str(recipe), "--n_boot", "20", "--model_path", f"race_only={race_only / 'best.pt'}",
            "--model_path", f"multitask={multitask / 'best.pt'}"]
    assert bench.main([*argv, "--last_layer", "none,group,recall", "--json", str(out)]) == 0
    result = json.loads(out.read_text())
    rows = {r["variant"]: r for r in result["rows"]}
    assert list(rows) == ["race_only", "race_only+last-layer none", "race_only+last-layer group",
                          "race_only+last-layer recall", "multitask", "multitask+last-layer none",
                          "multitask+last-layer group", "multitask+last-layer recall"]
    # Recall offsets never lower the worst class (they stop at the target or keep the best worst class seen),
    # and their out-of-sample estimate is reported.
    for model in ("race_only", "multitask"):
        recall_row = rows[f"{model}+last-layer recall"]
        assert recall_row["worst_class"]["accuracy"] >= rows[model]["worst_class"]["accuracy"]
        assert 0 <= result["variants"][f"{model}+last-layer recall"]["recall_offsets_cross_fit"]["accuracy"] <= 1
    assert "heads" not in rows["race_only"]
    assert set(rows["multitask"]["heads"]) == {"gender", "age"}
    assert all(0 <= v <= 1 for v in rows["multitask"]["heads"].values())
    assert (multitask / "last_layer_group" / "MODEL_CARD.md").is_file()
    printed = capsys.readouterr().out
    assert "gender acc." in printed and "race_only+last-layer recall: offsets fitted on the validation set; on faces" in printed
    # Scoring in the same classes listed in another order changes nothing.
    reordered = ",".join(reversed((data / "classes.txt").read_text().split()))
    out2 = tmp_path / "bench2.json"
    assert bench.main([*argv[:4], "--eval_taxonomy", reordered, "--json", str(out2)]) == 0
    again = json.loads(out2.read_text())["rows"][0]
    assert again["accuracy"]["value"] == rows["race_only"]["accuracy"]["value"]


def test_bench_linear_probe_and_averaged_rows(bench, manifests, tmp_path):
    """The linear probe refits a race layer on the recipe's pretrained weights as they are: pretrained from a
    trained model, it is that model's unweighted last-layer refit. A model averaged with itself scores as alone."""
    import torch

    from race_classifier.models.checkpoint import load_checkpoint
    from race_classifier.training.train import main as train_main
    from conftest import train_args
    trained = tmp_path / "trained"
    assert train_main(train_args(manifests, trained, "--num_epochs", "1")) == 0
    best = trained / "best.pt"
    recipe = _recipe(tmp_path, manifests, pretrained=str(best))
    out = tmp_path / "bench.json"
    assert bench.main(["--config", str(recipe), "--n_boot", "20", "--model_path", f"model={best}", "--linear_probe",
                       "--last_layer", "none", "--ensemble_with", str(best), "--json", str(out)]) == 0
    rows = {r["variant"]: r for r in json.loads(out.read_text())["rows"]}
    probe, alone = rows["model: linear probe of the pretrained backbone"], rows["model"]
    assert probe["accuracy"]["value"] == rows["model+last-layer none"]["accuracy"]["value"]
    start = load_checkpoint(trained / "linear_probe" / "pretrained.pt")
    assert start["epoch"] == 0 and "calibration" not in start
    own = load_checkpoint(best)["state_dict"]
    backbone = [k for k in own if not k.startswith(("head", "classifier", "fc"))]
    assert backbone and all(torch.equal(start["state_dict"][k], own[k]) for k in backbone)
    averaged = rows[f"model + {trained.name} (mean)"]
    assert averaged["accuracy"]["value"] == alone["accuracy"]["value"] and averaged["ece_before"] is None
