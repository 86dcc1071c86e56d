"""Gender and age-group heads on every inference surface: the Classifier API, ``predict`` CSV/JSON and video
captions, the HTTP service and its page, and ONNX export (fp32 and int8). One tiny multi-task model is
trained on the synthetic patterns for the whole session (conftest's ``multitask_checkpoint``); a copy gets
per-head temperatures far from 1 so that calibration is visibly applied. Race-only models must give exactly
what they gave before heads existed.
"""
from __future__ import annotations

import csv
import io
import json
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from fastapi.testclient import TestClient
from PIL import Image

from race_classifier.cli import main as cli_main
from race_classifier.data.manifest import read_manifest
from race_classifier.export.exporter import export_checkpoint
from race_classifier.export.onnx import ExportError
from race_classifier.export.options import FP32_TOLERANCE
from race_classifier.models.onnx_metadata import write_metadata
from race_classifier.heads import HeadLayout
from race_classifier.inference.classifier import Classifier, FacePrediction
from race_classifier.inference.cli import csv_columns
from race_classifier.inference.video import caption
from race_classifier.labels import get_taxonomy
from race_classifier.models.checkpoint import save_checkpoint
from race_classifier.models.factory import create_model
from race_classifier.models.loaders import ModelLoadError, load_predictor
from race_classifier.serving.app import create_app
from race_classifier.serving.limits import Limits

from conftest import ARCH

TEMPERATURES = {"gender": 2.0, "age": 0.5}  # far from 1: a head scored without its own temperature shows


@pytest.fixture(scope="module")
def calibrated_multitask(multitask_checkpoint) -> Path:
    """conftest's race + gender + age model (trained once per session), with per-head temperatures set far
    from 1 (the race calibration and abstention threshold kept), beside its MODEL_CARD.md."""
    ckpt = torch.load(multitask_checkpoint, map_location="cpu", weights_only=True)
    calibration = ckpt.get("calibration") or {"temperature": 1.0}
    fitted = calibration.get("heads") or {}
    heads = {h: {**(fitted.get(h) or {}), "temperature": t} for h, t in TEMPERATURES.items()}
    ckpt["calibration"] = {**calibration, "heads": heads}
    out = multitask_checkpoint.parent / "calibrated.pt"
    torch.save(ckpt, out)
    return out


@pytest.fixture(scope="module")
def race_only_checkpoint(manifests, tmp_path_factory) -> Path:
    """An untrained race-only model: enough to check that its outputs keep their pre-heads shape."""
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("raceonly") / "model.pt"
    from race_classifier.data.transforms import Preprocessing
    save_checkpoint(path, model=create_model(ARCH, 4), arch=ARCH, taxonomy=get_taxonomy(str(manifests / "classes.txt")),
                    preprocessing=Preprocessing(image_size=32), train_args={}, epoch=0, metrics={}, history=[])
    return path


@pytest.fixture(scope="module")
def pattern_images(manifests) -> list[Path]:
    return sorted((manifests.parent / "images").rglob("*.png"))[:4]


@pytest.fixture(scope="module")
def onnx_model(calibrated_multitask, manifests, tmp_path_factory):
    """The multi-task model exported to fp32 ONNX, checked on the validation patterns, with its report."""
    out = tmp_path_factory.mktemp("mt-export") / "model.onnx"
    val = read_manifest(manifests / "val.txt", get_taxonomy(str(manifests / "classes.txt")))
    return out, export_checkpoint(calibrated_multitask, out, val_samples=val)


def crops_through_the_model(clf: Classifier, paths) -> dict[str, np.ndarray]:
    """``Predictor.predict_heads`` on the crops ``--no-detect`` classifies: each whole image, preprocessed."""
    batch = torch.stack([clf.transform(Image.open(p).convert("RGB")) for p in paths])
    return clf.predictor.predict_heads(batch)


def read_rows(path):
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


# --- Classifier API --------------------------------------------------------------------------------------

def test_every_face_gets_every_head_calibrated_from_one_forward_pass(calibrated_multitask, pattern_images):
    clf = Classifier.load(calibrated_multitask, detect=False)
    predictor = clf.predictor
    assert predictor.heads.names == ("race", "gender", "age")
    calls = []
    run = predictor.run
    predictor.run = lambda images: calls.append(len(images)) or run(images)
    results = clf.predict_batch(pattern_images)
    assert calls == [len(pattern_images)]  # one model call for all heads of all four crops
    predictor.run = run

    expected = crops_through_the_model(clf, pattern_images)
    batch = torch.stack([clf.transform(Image.open(p).convert("RGB")) for p in pattern_images])
    logits = predictor.heads.split(predictor.all_logits(batch))
    for head, t in TEMPERATURES.items():  # each head divided by its own temperature
        np.testing.assert_allclose(expected[head], torch.softmax(logits[head] / t, dim=1).numpy(), atol=1e-6)
    for k, result in enumerate(results):
        face = result.faces[0]
        gender, age = expected["gender"][k], expected["age"][k]
        assert face.gender == ("Male", "Female")[int(gender.argmax())]
        assert face.gender_confidence == pytest.approx(gender.max(), abs=1e-6)
        assert list(face.gender_probabilities.values()) == pytest.approx(gender, abs=1e-6)
        assert face.age_group == predictor.heads.age_bins.names[int(age.argmax())]
        assert face.age_confidence == pytest.approx(age.max(), abs=1e-6)
        assert list(face.age_probabilities) == ["Child", "Teen", "Adult", "Senior"]
        assert list(face.probabilities.values()) == pytest.approx(expected["race"][k], abs=1e-6)
    assert clf.heads_description() == {"gender": {"classes": ["Male", "Female"]},
                                       "age": {"classes": ["Child", "Teen", "Adult", "Senior"],
                                               "groups": ["Child (0-12)", "Teen (13-19)", "Adult (20-59)",
                                                          "Senior (60+)"]}}


def test_only_race_abstains(calibrated_multitask, pattern_images):
    clf = Classifier.load(calibrated_multitask, detect=False, min_confidence=1.01)
    [result] = clf.predict_batch(pattern_images[:1])
    face = result.faces[0]
    assert face.label == "uncertain" and face.top_label != "uncertain"
    assert face.gender in ("Male", "Female") and face.age_group in ("Child", "Teen", "Adult", "Senior")


def test_tta_averages_every_head(calibrated_multitask, pattern_images):
    clf = Classifier.load(calibrated_multitask, detect=False, tta=True)
    batch = torch.stack([clf.transform(Image.open(p).convert("RGB")) for p in pattern_images])
    plain = clf.predictor.predict_heads(batch, tta=False)
    mirrored = clf.predictor.predict_heads(torch.flip(batch, dims=[3]), tta=False)
    results = clf.predict_batch(pattern_images)
    for k, result in enumerate(results):
        want = (plain["age"][k] + mirrored["age"][k]) / 2
        assert list(result.faces[0].age_probabilities.values()) == pytest.approx(want, abs=1e-6)


# --- predict: CSV, JSON, video ----------------------------------------------------------------------------

def test_predict_csv_and_json_carry_gender_and_age(calibrated_multitask, pattern_images, tmp_path):
    clf = Classifier.load(calibrated_multitask, detect=False)
    expected = crops_through_the_model(clf, pattern_images)
    out_csv, out_json = tmp_path / "faces.csv", tmp_path / "faces.json"
    for out in (out_csv, out_json):
        assert cli_main(["predict", *map(str, pattern_images), "--model", str(calibrated_multitask),
                         "--no-detect", "--output", str(out)]) == 0

    rows = read_rows(out_csv)
    race = list(clf.classes)
    assert list(rows[0]) == csv_columns(race) + [
        "gender", "gender_confidence", "prob_gender_Male", "prob_gender_Female",
        "age_group", "age_confidence", "prob_age_Child", "prob_age_Teen", "prob_age_Adult", "prob_age_Senior"]
    for k, row in enumerate(rows):
        gender = [float(row[f"prob_gender_{c}"]) for c in ("Male", "Female")]
        age = [float(row[f"prob_age_{c}"]) for c in ("Child", "Teen", "Adult", "Senior")]
        np.testing.assert_allclose(gender, expected["gender"][k], atol=1e-6)
        np.testing.assert_allclose(age, expected["age"][k], atol=1e-6)
        assert row["gender"] == ("Male", "Female")[int(np.argmax(gender))]
        assert float(row["gender_confidence"]) == pytest.approx(max(gender), abs=1e-6)
        assert row["age_group"] == ("Child", "Teen", "Adult", "Senior")[int(np.argmax(age))]
        assert float(row["age_confidence"]) == pytest.approx(max(age), abs=1e-6)
        np.testing.assert_allclose([float(row[f"prob_{c}"]) for c in race], expected["race"][k], atol=1e-6)

    doc = json.loads(out_json.read_text())
    assert doc["classes"] == race and doc["heads"] == clf.heads_description()
    for k, image in enumerate(doc["images"]):
        face = image["faces"][0]
        assert list(face["gender_probabilities"].values()) == pytest.approx(expected["gender"][k], abs=1e-6)
        assert list(face["age_probabilities"].values()) == pytest.approx(expected["age"][k], abs=1e-6)
        assert face["gender"] == rows[k]["gender"] and face["age_group"] == rows[k]["age_group"]


def test_race_only_outputs_are_as_before_heads(race_only_checkpoint, pattern_images, tmp_path):
    out_csv, out_json = tmp_path / "faces.csv", tmp_path / "faces.json"
    for out in (out_csv, out_json):
        assert cli_main(["predict", *map(str, pattern_images[:2]), "--model", str(race_only_checkpoint),
                         "--no-detect", "--output", str(out)]) == 0
    classes = Classifier.load(race_only_checkpoint).classes
    marks = [f"{n}_{a}" for n in ("left_eye", "right_eye", "nose", "mouth_left", "mouth_right") for a in "xy"]
    assert list(read_rows(out_csv)[0]) == ["image", "frame", "time_s", "face", "status", "error", "x1", "y1", "x2",
                                           "y2", *marks, "det_score", "label", "confidence", "top_label",
                                           *[f"prob_{c}" for c in classes]]
    doc = json.loads(out_json.read_text())
    assert set(doc) == {"model", "tta", "classes", "images"}
    assert set(doc["images"][0]["faces"][0]) == {"index", "box", "landmarks", "score", "label", "confidence",
                                                 "top_label", "probabilities"}


def test_video_captions_and_columns_name_every_head(calibrated_multitask, pattern_images, tmp_path):
    race_only = FacePrediction(0, (1, 2, 3, 4), None, 0.9, "uncertain", 0.41, "grid", {})
    assert caption(race_only) == "uncertain 0.41"
    face = FacePrediction(0, (1, 2, 3, 4), None, 0.9, "grid", 0.91, "grid", {}, gender="Female",
                          gender_confidence=0.875, age_group="Adult", age_confidence=0.5)
    assert caption(face) == "grid 0.91 | Female 0.88 | Adult 0.50"

    import cv2
    clip = tmp_path / "clip.avi"
    writer = cv2.VideoWriter(str(clip), cv2.VideoWriter_fourcc(*"MJPG"), 10.0, (160, 120))
    for p in pattern_images[:2]:
        writer.write(np.asarray(Image.open(p).convert("RGB").resize((160, 120)))[:, :, ::-1].copy())
    writer.release()
    out = tmp_path / "frames.csv"
    assert cli_main(["predict", "--video", str(clip), "--model", str(calibrated_multitask), "--output", str(out)]) == 0
    header = out.read_text().splitlines()[0].split(",")
    assert header[-10:] == ["gender", "gender_confidence", "prob_gender_Male", "prob_gender_Female", "age_group",
                            "age_confidence", "prob_age_Child", "prob_age_Teen", "prob_age_Adult", "prob_age_Senior"]


# --- HTTP service -----------------------------------------------------------------------------------------

def test_service_responses_and_model_description_have_the_heads(calibrated_multitask, race_only_checkpoint,
                                                               pattern_images):
    clf = Classifier.load(calibrated_multitask, detect=False)
    png = pattern_images[0].read_bytes()
    with TestClient(create_app(clf, Limits(workers=1))) as c:
        one = c.post("/v1/predict", files={"image": ("a.png", png, "image/png")}).json()
        batch = c.post("/v1/predict/batch", files=[("images", ("a.png", png, "image/png"))]).json()
        model = c.get("/v1/model").json()
    direct = clf.predict(Image.open(io.BytesIO(png))).faces[0]
    assert one["heads"] == batch["heads"] == clf.heads_description()
    for face in (one["faces"][0], batch["results"][0]["faces"][0]):
        assert (face["gender"], face["age_group"]) == (direct.gender, direct.age_group)
        assert face["gender_confidence"] == pytest.approx(direct.gender_confidence, abs=1e-6)
        assert face["age_probabilities"] == pytest.approx(direct.age_probabilities, abs=1e-6)
    assert model["heads"] == {"race": {"classes": one["classes"]}, **clf.heads_description()}
    assert model["calibration"]["heads"]["gender"]["temperature"] == TEMPERATURES["gender"]
    assert "gender (Male, Female)" in model["info"]["heads"]

    with TestClient(create_app(Classifier.load(race_only_checkpoint, detect=False), Limits(workers=1))) as c:
        plain = c.post("/v1/predict", files={"image": ("a.png", png, "image/png")}).json()
        assert c.get("/v1/model").json()["heads"] == {"race": {"classes": plain["classes"]}}
    assert "heads" not in plain and "gender" not in plain["faces"][0] and "age_group" not in plain["faces"][0]


def test_page_shows_gender_and_age(calibrated_multitask, pattern_images, tmp_path):
    from test_serving import CHROMEDRIVER, CHROMIUM, require_browser
    require_browser()
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    from race_classifier.serving.cli import serve_in_thread
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for flag in ("--headless", "--no-sandbox", "--disable-gpu", "--no-first-run", "--disable-dev-shm-usage",
                 f"--user-data-dir={tmp_path / 'profile'}"):
        options.add_argument(flag)
    app = create_app(Classifier.load(calibrated_multitask, detect=False), Limits(workers=1))
    browser = webdriver.Chrome(service=Service(CHROMEDRIVER), options=options)
    try:
        with serve_in_thread(app) as url:
            browser.get(url + "/")
            WebDriverWait(browser, 30).until(lambda d: d.find_element(By.ID, "heads").is_displayed())
            heads_line = browser.find_element(By.ID, "heads").text
            browser.find_element(By.ID, "file").send_keys(str(pattern_images[0]))
            WebDriverWait(browser, 60).until(lambda d: d.execute_script("return document.body.dataset.state") == "done")
            sections = {e.get_attribute("data-head"): e.text
                        for e in browser.find_elements(By.CSS_SELECTOR, ".face h4")}
            bars = browser.find_elements(By.CSS_SELECTOR, "#faces .face .bar")
    finally:
        browser.quit()
    assert "gender (Male, Female)" in heads_line and "Adult (20-59)" in heads_line
    assert set(sections) == {"gender", "age"}
    assert sections["gender"].startswith("Gender: ") and sections["age"].startswith("Age group: ")
    assert len(bars) == 4 + 2 + 4  # race classes, genders, age groups


# --- ONNX export ------------------------------------------------------------------------------------------

def test_onnx_export_has_one_output_per_head_and_self_describing_metadata(onnx_model, calibrated_multitask):
    path, report = onnx_model
    torch_model = load_predictor(calibrated_multitask)
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    assert [(o.name, o.shape[1]) for o in session.get_outputs()] == [("race_logits", 4), ("gender_logits", 2),
                                                                     ("age_logits", 4)]
    props = {p.key: p.value for p in onnx.load(str(path)).metadata_props}
    assert json.loads(props["race_classifier.heads"]) == torch_model.heads.to_dict()
    assert json.loads(props["race_classifier.outputs"]) == {"race": "race_logits", "gender": "gender_logits",
                                                            "age": "age_logits"}
    stored = json.loads(props["race_classifier.calibration"])["heads"]
    assert {h: stored[h]["temperature"] for h in TEMPERATURES} == TEMPERATURES

    reloaded = load_predictor(path)  # the .onnx alone: no flags, no checkpoint
    assert reloaded.heads == torch_model.heads and reloaded.heads.age_bins == torch_model.heads.age_bins
    assert {h: reloaded.head_temperature(h) for h in TEMPERATURES} == TEMPERATURES
    assert "age (Child (0-12)" in reloaded.info["heads"]
    assert set(report.fp32_heads) == {"gender", "age"}
    assert all(a.max_abs_diff <= FP32_TOLERANCE for a in [report.fp32, *report.fp32_heads.values()])


def test_onnx_matches_pytorch_per_head_on_the_pattern_images(onnx_model, calibrated_multitask, pattern_images):
    torch_clf = Classifier.load(calibrated_multitask, detect=False)
    onnx_clf = Classifier.load(onnx_model[0], detect=False)
    for n in (1, len(pattern_images)):  # the dynamic batch axis
        want, got = (crops_through_the_model(c, pattern_images[:n]) for c in (torch_clf, onnx_clf))
        assert set(got) == {"race", "gender", "age"}
        for head in want:
            assert np.abs(got[head] - want[head]).max() <= FP32_TOLERANCE, head
    a, b = (c.predict_batch(pattern_images) for c in (torch_clf, onnx_clf))

    def labels(results):
        return [(r.faces[0].gender, r.faces[0].age_group) for r in results]
    assert labels(a) == labels(b)


def test_int8_export_keeps_the_heads(calibrated_multitask, manifests, pattern_images, tmp_path, capsys):
    out = tmp_path / "model.int8.onnx"
    assert cli_main(["export", "--model_path", str(calibrated_multitask), "--output", str(out), "--quantize", "int8",
                     "--calib_txt", str(manifests / "train.txt"), "--calib_images", "16",
                     "--val_txt", str(manifests / "val.txt"), "--max_accuracy_drop", "100",
                     "--report_json", str(tmp_path / "report.json")]) == 0
    report = json.loads((tmp_path / "report.json").read_text())
    assert set(report["int8_heads"]) == {"gender", "age"} and set(report["fp32_heads"]) == {"gender", "age"}
    printed = capsys.readouterr().out
    for head in ("gender", "age"):
        assert f"  {head} head: fp32 vs PyTorch max |probability difference| " in printed
    session = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"])
    assert [o.name for o in session.get_outputs()] == ["race_logits", "gender_logits", "age_logits"]
    predictor = load_predictor(out)
    assert predictor.info["quantization"]["mode"] == "static"
    assert predictor.heads == load_predictor(calibrated_multitask).heads
    assert predictor.head_temperature("age") == TEMPERATURES["age"]
    probs = crops_through_the_model(Classifier.load(out, detect=False), pattern_images)
    assert {h: p.shape for h, p in probs.items()} == {"race": (4, 4), "gender": (4, 2), "age": (4, 4)}


def test_export_refuses_a_graph_whose_gender_head_drifts(calibrated_multitask, tmp_path, monkeypatch):
    real_run = ort.InferenceSession.run

    def drifting_run(self, output_names, feed, *args, **kwargs):  # race right, gender computed differently
        outputs = real_run(self, output_names, feed, *args, **kwargs)
        if output_names and "gender_logits" in output_names:
            outputs[output_names.index("gender_logits")][:, 0] += 0.5
        return outputs

    monkeypatch.setattr(ort.InferenceSession, "run", drifting_run)
    with pytest.raises(ExportError, match="probabilities of the gender head differ from PyTorch's"):
        export_checkpoint(calibrated_multitask, tmp_path / "model.onnx")
    assert not (tmp_path / "model.onnx").exists()


def test_race_only_export_is_as_before_heads(race_only_checkpoint, tmp_path):
    out = tmp_path / "model.onnx"
    export_checkpoint(race_only_checkpoint, out)
    props = {p.key for p in onnx.load(str(out)).metadata_props}
    assert "race_classifier.heads" not in props and "race_classifier.outputs" not in props
    session = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"])
    assert [o.name for o in session.get_outputs()] == ["logits"]
    predictor = load_predictor(out)
    assert predictor.heads == HeadLayout.race_only(predictor.taxonomy.classes) and "heads" not in predictor.info


def test_bad_head_metadata_is_refused_naming_the_file(onnx_model, tmp_path):
    path, _ = onnx_model
    props = {p.key.removeprefix("race_classifier."): p.value for p in onnx.load(str(path)).metadata_props
             if p.key.startswith("race_classifier.")}
    cases = {
        "missing_output.onnx": ({"outputs": json.dumps({"race": "race_logits", "gender": "sex_logits",
                                                        "age": "age_logits"})}, "on output 'sex_logits'"),
        "wrong_width.onnx": ({"outputs": json.dumps({"race": "race_logits", "gender": "age_logits",
                                                     "age": "gender_logits"})}, r"not \(N, 2\)"),
        "no_outputs.onnx": ({"outputs": "null"}, "does not name one graph output for each head"),
        "other_race.onnx": ({"heads": json.dumps({"heads": [{"name": "race", "classes": ["x", "y"]}]})},
                            "malformed race_classifier.heads"),
        "bad_temperature.onnx": ({"calibration": json.dumps({"temperature": 1.0,
                                                             "heads": {"age": {"temperature": -1}}})},
                                 "malformed race_classifier.calibration"),
    }
    for name, (change, message) in cases.items():
        bad = tmp_path / name
        bad.write_bytes(path.read_bytes())
        write_metadata(bad, {**props, **change})
        with pytest.raises(ModelLoadError, match=message) as e:
            load_predictor(bad)
        assert name in str(e.value)
