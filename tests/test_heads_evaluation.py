"""Gender and age-group heads through evaluation, comparison, calibration and the model card, on a small
multi-task model trained on the synthetic patterns (conftest.multitask_checkpoint), and FairFace's release
format as a baseline."""
from __future__ import annotations

import json
import re

import numpy as np
import pandas as pd
import pytest
import torch
import torchvision
from torch.utils.data import DataLoader

from race_classifier.cli import main as cli_main
from race_classifier.data.dataset import FaceDataset, collate_skipping_failures
from race_classifier.data.manifest import read_manifest
from race_classifier.data.transforms import build_transform
from race_classifier.evaluation.calibration import softmax
from race_classifier.evaluation.compare import compare_predictions
from race_classifier.evaluation.runner import predict_logits
from race_classifier.heads import FAIRFACE_AGE_RANGES, AgeBins, Head, HeadLayout, class_map, head_targets
from race_classifier.labels import get_taxonomy
from race_classifier.models.checkpoint import load_checkpoint
from race_classifier.models.loaders import load_predictor
from race_classifier.post_training.calibrate import calibrate_head
from race_classifier.post_training.model_card import MODEL_CARD
from race_classifier.utils import atomic_torch_save

RACE4 = ["White", "Black", "Asian", "Indian"]  # the 4 patterns renamed, so FairFace's races map onto them


def _samples(manifest_dir):
    return read_manifest(manifest_dir / "val.txt", get_taxonomy(str(manifest_dir / "classes.txt")),
                         check_files=False, keep_unlabelled=True)


def _predict_all(predictor, samples) -> dict[str, np.ndarray]:
    """predict_heads over every sample, in order (all synthetic images are readable)."""
    dataset = FaceDataset(samples, build_transform(predictor.preprocessing, train=False),
                          draft_size=predictor.preprocessing.image_size)
    parts = []
    for batch in DataLoader(dataset, batch_size=16, collate_fn=collate_skipping_failures):
        parts.append(predictor.predict_heads(batch["images"]))
    return {name: np.concatenate([p[name] for p in parts]) for name in parts[0]}


def _correct_rate(column: pd.Series) -> float:
    labelled = column[column != ""]
    return float((labelled.astype(str) == "True").mean())


@pytest.fixture(scope="module")
def evaluated(multitask_checkpoint, multitask_manifests, tmp_path_factory):
    out = tmp_path_factory.mktemp("heads_eval")
    assert cli_main(["evaluate", "--model_path", str(multitask_checkpoint), "--val_txt",
                     str(multitask_manifests / "val.txt"), "--output_csv", str(out / "results.csv"),
                     "--output_html", str(out / "report.html"), "--workers", "0", "--n_boot", "100"]) == 0
    rows = pd.read_csv(out / "results.csv", keep_default_na=False)
    results = json.loads((out / "results.metrics.json").read_text())
    return rows, results["evaluation"], (out / "report.html").read_text()


@pytest.fixture(scope="module")
def fairface_file(tmp_path_factory):
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("fairface") / "res34_fair_align_multi_7.pt"
    torch.save(torchvision.models.resnet34(num_classes=18).state_dict(), path)
    return path


@pytest.fixture(scope="module")
def race4_model(multitask_checkpoint, multitask_manifests, tmp_path_factory):
    """The multi-task model with its 4 race classes renamed as race4's, and its validation manifest
    relabelled alike: the same model, in classes FairFace's 7 races map into."""
    out = tmp_path_factory.mktemp("race4")
    ckpt = load_checkpoint(multitask_checkpoint)
    ckpt["taxonomy"] = {"name": "race4", "classes": RACE4}
    ckpt["heads"]["heads"][0]["classes"] = RACE4
    atomic_torch_save(ckpt, out / "best.pt")
    rename = dict(zip(get_taxonomy(str(multitask_manifests / "classes.txt")).classes, RACE4))
    lines = []
    for line in (multitask_manifests / "val.txt").read_text().splitlines():
        fields = line.split("\t")
        fields[1] = rename.get(fields[1], fields[1])
        lines.append("\t".join(fields))
    (out / "val.txt").write_text("\n".join(lines) + "\n")
    return out


# --- mapping one model's heads into another's classes ------------------------------------------------------

def test_class_map_sums_fairface_ranges_into_age_groups_and_matches_genders_by_name():
    fairface = HeadLayout((Head("race", ("A",)), Head("gender", ("Male", "Female")), Head("age", FAIRFACE_AGE_RANGES)))
    ours = HeadLayout.build(["A"], ("race", "gender", "age"), ("Female", "Male"), AgeBins.parse())
    age = class_map(fairface, ours, "age")
    # 0-2, 3-9 Child; 10-19 Teen (7 of its 10 years); 20-29 .. 50-59 Adult; 60-69, 70+ Senior
    assert age.argmax(1).tolist() == [0, 0, 1, 2, 2, 2, 2, 3, 3] and (age.sum(1) == 1).all()
    assert class_map(fairface, ours, "gender").tolist() == [[0, 1], [1, 0]]
    # 10-19 split 5/5 between two groups maps nowhere: its probability is dropped.
    halves = HeadLayout.build(["A"], ("race", "age"), age_bins=AgeBins.parse("Young:0,Old:15"))
    assert class_map(fairface, halves, "age")[2].sum() == 0
    other = HeadLayout.build(["A"], ("race", "gender"), ("Woman", "Man"))
    assert class_map(fairface, other, "gender") is None  # nothing in common: no comparison
    assert class_map(HeadLayout.race_only(["A"]), ours, "gender") is None


def test_compare_leaves_out_a_head_only_one_model_has():
    a = pd.DataFrame({"path": ["x", "y", "z"], "y_true": [0, 1, 1], "y_pred": [0, 1, 0],
                      "gender_y_true": [0, 1, -1], "gender_y_pred": [0, 0, 1], "gender_confidence": [0.9, 0.6, 0.7]})
    b = a[["path", "y_true", "y_pred"]]
    assert compare_predictions(a, b, ["p", "q"], n_boot=20, heads={"gender": ["Male", "Female"]})["heads"] == {}
    both = compare_predictions(a, a, ["p", "q"], n_boot=20, heads={"gender": ["Male", "Female"]})
    assert both["heads"]["gender"]["n_common"] == 2 and both["heads"]["gender"]["overall"][0]["diff"] == 0


# --- evaluate ---------------------------------------------------------------------------------------------

def test_csv_head_predictions_are_the_predictors_own(evaluated, multitask_checkpoint, multitask_manifests):
    rows, _, _ = evaluated
    samples = _samples(multitask_manifests)
    assert len(rows) == len(samples)  # images without a race label are listed too, for the other heads
    probs = _predict_all(load_predictor(multitask_checkpoint), samples)
    by_path = rows.set_index("path")
    for key, head, classes in (("gender", "gender", ["Male", "Female"]),
                               ("age_group", "age", ["Child", "Teen", "Adult", "Senior"])):
        csv_probs = by_path.loc[[s.path for s in samples], [f"prob_{key}_{c}" for c in classes]].to_numpy(float)
        np.testing.assert_allclose(csv_probs, probs[head], atol=1e-5)
        assert by_path.loc[[s.path for s in samples], f"pred_{key}"].tolist() == \
            [classes[i] for i in probs[head].argmax(1)]
    # Truth comes from the manifest through the model's own age groups: FairFace's 10-19 is Teen.
    assert set(rows.loc[rows["age"] == "10-19", "true_age_group"]) == {"Teen"}
    assert set(rows.loc[rows["age"] == "", "true_age_group"]) == {""}
    assert set(rows.loc[rows["gender"] == "", "correct_gender"]) == {""}


def test_report_figures_per_head_are_those_of_the_csv(evaluated):
    rows, ev, html = evaluated
    race_rows = rows[rows["true_label"] != ""]
    assert ev["n"] == len(race_rows) and ev["n_race_unlabelled"] == len(rows) - len(race_rows) > 0
    assert ev["accuracy"]["value"] == pytest.approx(_correct_rate(race_rows["correct"]))
    for head, key in (("gender", "gender"), ("age", "age_group")):
        hev = ev["heads"][head]
        labelled = rows[rows[f"true_{key}"] != ""]
        assert hev["n"] == len(labelled) and hev["n_unlabelled"] == len(rows) - len(labelled)
        assert hev["accuracy"]["value"] == pytest.approx(_correct_rate(rows[f"correct_{key}"]))
        for row in hev["per_class"]:
            of_class = labelled[labelled[f"true_{key}"] == row["class"]]
            assert row["support"] == len(of_class)
            if len(of_class):
                assert row["accuracy"]["value"] == pytest.approx(_correct_rate(of_class[f"correct_{key}"]))
                assert row["accuracy"]["ci_low"] <= row["accuracy"]["value"] <= row["accuracy"]["ci_high"]
        assert np.sum(hev["confusion_matrix"]) == len(labelled) and hev["ece"] is not None
        # Evaluated with its own temperature: the calibrated ECE, and the raw one beside it.
        assert hev["calibration"]["ece_after"] == hev["ece"]
        assert hev["ece_if_calibrated"]["mean"] > 0  # the head's own noise floor
        assert f'id="head-{head}"' in html
    assert html.count("if perfectly calibrated: ") == 3  # race, gender and age cards
    # Race accuracy per age group, in the groups' own order, recomputed from the CSV.
    groups = ev["subgroups"]["age_group"]
    assert [g["group"] for g in groups] == ["Child", "Teen", "Adult", "Senior"]
    for g in groups:
        assert g["accuracy"]["value"] == pytest.approx(
            _correct_rate(race_rows.loc[race_rows["true_age_group"] == g["group"], "correct"]))
    assert "Age group (the model&#39;s groups)" in html
    assert {g["group"] for g in ev["subgroups"]["gender"]} == {"Male", "Female"}


def test_a_malformed_age_is_an_error_naming_the_file(multitask_checkpoint, multitask_manifests, tmp_path, caplog):
    lines = (multitask_manifests / "val.txt").read_text().splitlines()
    fields = lines[0].split("\t")
    lines[0] = "\t".join(fields[:3] + ["old-ish"])
    bad = tmp_path / "val.txt"
    bad.write_text("\n".join(lines) + "\n")
    assert cli_main(["evaluate", "--model_path", str(multitask_checkpoint), "--val_txt", str(bad),
                     "--output_csv", str(tmp_path / "r.csv"), "--workers", "0", "--n_boot", "10"]) == 2
    assert f"{bad}:1:" in caplog.text and "old-ish" in caplog.text


# --- compare ----------------------------------------------------------------------------------------------

def test_fairface_release_model_exposes_its_gender_and_age_heads(fairface_file):
    predictor = load_predictor(fairface_file)
    assert predictor.heads.names == ("race", "gender", "age")
    assert predictor.heads.get("gender").classes == ("Male", "Female")
    assert predictor.heads.get("age").classes == FAIRFACE_AGE_RANGES
    x = torch.randn(2, 3, 224, 224)
    model = torchvision.models.resnet34(num_classes=18)
    model.load_state_dict(torch.load(fairface_file, weights_only=True))
    with torch.no_grad():
        logits = model.eval()(x)
    probs = predictor.predict_heads(x)
    np.testing.assert_allclose(probs["race"], torch.softmax(logits[:, :7], 1).numpy(), atol=1e-5)
    np.testing.assert_allclose(probs["gender"], torch.softmax(logits[:, 7:9], 1).numpy(), atol=1e-5)
    np.testing.assert_allclose(probs["age"], torch.softmax(logits[:, 9:], 1).numpy(), atol=1e-5)


def test_compare_with_fairface_covers_gender_and_age(race4_model, fairface_file, tmp_path):
    out = tmp_path / "cmp"
    assert cli_main(["compare", "--val_txt", str(race4_model / "val.txt"), "--model_path", str(race4_model / "best.pt"),
                     "--baseline_path", str(fairface_file), "--output_csv", str(out / "a.csv"),
                     "--output_html", str(out / "cmp.html"), "--workers", "0", "--n_boot", "100"]) == 0
    comparison = json.loads((out / "a.metrics.json").read_text())["comparison"]
    assert set(comparison["heads"]) == {"gender", "age"}
    a = pd.read_csv(out / "a.csv", keep_default_na=False)
    b = pd.read_csv(out / "a.baseline.csv", keep_default_na=False)
    for head, key in (("gender", "gender"), ("age", "age_group")):
        cmp = comparison["heads"][head]
        labelled = a[f"true_{key}"] != ""
        assert cmp["n_common"] == labelled.sum()
        diff = _correct_rate(a[f"correct_{key}"]) - _correct_rate(b[f"correct_{key}"])
        assert cmp["overall"][0]["name"] == "accuracy" and cmp["overall"][0]["diff"] == pytest.approx(diff)
        assert 0 <= cmp["overall"][0]["p_mcnemar"] <= 1
        assert [r["name"] for r in cmp["per_class"]] == list(load_predictor(race4_model / "best.pt").heads.get(head).classes)
    # FairFace's 9 age ranges are summed into the evaluated model's 4 age groups.
    samples = read_manifest(race4_model / "val.txt", get_taxonomy("race4"), check_files=False, keep_unlabelled=True)
    ranges = _predict_all(load_predictor(fairface_file), samples)["age"]
    groups = np.stack([ranges[:, [0, 1]].sum(1), ranges[:, 2], ranges[:, 3:7].sum(1), ranges[:, 7:].sum(1)], 1)
    csv_groups = b.set_index("path").loc[[s.path for s in samples],
                                         [f"prob_age_group_{g}" for g in ("Child", "Teen", "Adult", "Senior")]]
    np.testing.assert_allclose(csv_groups.to_numpy(float), groups, atol=1e-5)
    html = (out / "cmp.html").read_text()
    assert html.count("Gender head") >= 2 and html.count("Age-group head") >= 2  # own section, and compared


# --- calibration and the model card -----------------------------------------------------------------------

def test_training_fits_a_temperature_per_head(multitask_checkpoint, multitask_manifests):
    cal = load_checkpoint(multitask_checkpoint)["calibration"]
    samples = _samples(multitask_manifests)
    predictor = load_predictor(multitask_checkpoint)
    targets = head_targets(predictor.heads, samples)
    logits, _ = predict_logits(predictor, samples, workers=0, all_heads=True)
    parts = predictor.heads.split(logits)
    assert cal["n"] == (targets[:, 0] >= 0).sum()  # race: race-labelled images only
    assert set(cal["heads"]) == {"gender", "age"}
    for i, head in enumerate(("gender", "age"), 1):
        c = cal["heads"][head]
        rows = targets[:, i] >= 0
        assert c["n"] == rows.sum() and "abstention" not in c
        assert c["temperature"] == pytest.approx(calibrate_head(parts[head][rows], targets[rows, i])["temperature"],
                                                 rel=1e-4)
        assert c["nll_after"] <= c["nll_before"] + 1e-9
        assert predictor.head_temperature(head) == c["temperature"]
        np.testing.assert_allclose(_predict_all(predictor, samples)[head], softmax(parts[head], c["temperature"]),
                                   atol=1e-5)


def test_model_card_reports_each_head(multitask_checkpoint):
    ckpt = load_checkpoint(multitask_checkpoint)
    card = (multitask_checkpoint.parent / MODEL_CARD).read_text()
    floor = ckpt["calibration"]["heads"]["gender"]["ece_if_calibrated"]
    for phrase in ("### Gender head", "### Age group head", "### Race accuracy per gender",
                   "| ECE after if perfectly calibrated |", f"| {floor['mean']:.4f} expected, 95% <= ",
                   "### Race accuracy per age group (the model's groups)", "Non-binary", "apparent age",
                   "10-12-year-olds are counted as Teen", "Child (0-12), Teen (13-19)",
                   (f"| Gender | {ckpt['calibration']['heads']['gender']['n']} | "
                    f"{ckpt['calibration']['heads']['gender']['temperature']:.3f} |")):
        assert phrase in card, phrase
    gender = card[card.index("### Gender head"):card.index("### Age group head")]
    accuracy = re.search(r"^\| Accuracy \| ([\d.]+)% \| \[", gender, re.M)
    assert float(accuracy.group(1)) == pytest.approx(100 * ckpt["metrics"]["val_gender_accuracy"], abs=0.006)
    for name in ("Male", "Female"):
        row = re.search(rf"^\| {name} \| \d+ \| ([\d.]+)% \| \[", gender, re.M)
        assert float(row.group(1)) == pytest.approx(100 * ckpt["metrics"][f"val_gender_{name}_accuracy"], abs=0.006)


def test_calibrate_command_refits_head_temperatures(multitask_checkpoint, multitask_manifests, tmp_path):
    ckpt = load_checkpoint(multitask_checkpoint)
    atomic_torch_save({k: v for k, v in ckpt.items() if k != "calibration"}, tmp_path / "best.pt")
    assert load_predictor(tmp_path / "best.pt").head_temperature("gender") == 1.0
    # The manifest has images without a race label: kept, they calibrate the other heads.
    assert cli_main(["calibrate", "--model_path", str(tmp_path / "best.pt"), "--val_txt",
                     str(multitask_manifests / "val.txt"), "--workers", "0", "--n_boot", "50"]) == 0
    redone = load_checkpoint(tmp_path / "best.pt")["calibration"]
    for head in ("gender", "age"):
        assert redone["heads"][head]["temperature"] == pytest.approx(
            ckpt["calibration"]["heads"][head]["temperature"], rel=1e-4)
    assert "### Gender head" in (tmp_path / MODEL_CARD).read_text()
