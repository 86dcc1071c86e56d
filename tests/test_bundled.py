"""The trained models that ship with the package (race_classifier/bundled): their files, their names wherever a
model is taken, the demo's group photo, and a regression guard on their accuracy.

Everything here runs from the repository alone: the bundled files and the demo sample (hold-out FairFace
images, demo/fairface_sample) are in it.
"""
from __future__ import annotations

import csv
import os
import subprocess
import sys
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from race_classifier.cli import main as cli_main
from race_classifier.data.manifest import Sample
from race_classifier.data.sources import read_fairface_csv
from race_classifier.evaluation.runner import predict_logits
from race_classifier.inference.classifier import Classifier
from race_classifier.labels import get_mapping, get_taxonomy
from race_classifier.models.bundled import BUNDLED_DIR, MANIFEST, UnknownModelError, manifest, model_file
from race_classifier.models.checkpoint import CheckpointError, load_checkpoint
from race_classifier.models.factory import create_model
from race_classifier.models.loaders import load_predictor
from race_classifier.training.config import parse_args
from race_classifier.utils import file_sha256

REPO = Path(__file__).resolve().parents[1]
GROUP_PHOTO = REPO / "demo" / "group_photo.jpg"
SAMPLE_CSV = REPO / "demo" / "fairface_sample" / "labels.csv"
BUDGET_BYTES = 30 * 2**20
MAX_DROP = 0.02  # the regression guard: at most 2 points below the accuracy recorded at build time


def test_bundled_files_match_their_recorded_sha256_and_nothing_is_unrecorded():
    files = manifest()["files"]
    assert {"seed5.onnx", "fairface7.onnx", "fairface7.pt", "seed5.pt", "fairface7.onnx.data", "NOTICE",
            "seed5.MODEL_CARD.md", "fairface7.MODEL_CARD.md", "retinaface_mnet025.onnx"} <= set(files)
    for name, entry in files.items():
        assert file_sha256(BUNDLED_DIR / name) == entry["sha256"], name
    present = {p.name for p in BUNDLED_DIR.iterdir() if p.is_file() and p.name != MANIFEST}
    assert present == set(files)
    assert sum(e["bytes"] for e in files.values()) <= BUDGET_BYTES


def test_the_network_is_stored_once_per_format():
    """seed5.pt names fairface7.pt's weights instead of holding a copy; both ONNX files read one data file."""
    raw = torch.load(BUNDLED_DIR / "seed5.pt", weights_only=True)
    assert "state_dict" not in raw and raw["weights_from"] == "fairface7.pt"
    shared = load_checkpoint(BUNDLED_DIR / "seed5.pt")["state_dict"]
    own = load_checkpoint(BUNDLED_DIR / "fairface7.pt")["state_dict"]
    assert shared.keys() == own.keys() and all(torch.equal(shared[k], own[k]) for k in own)
    for name in ("seed5.onnx", "fairface7.onnx"):
        assert (BUNDLED_DIR / name).stat().st_size < 200_000  # the graph and metadata, not the weights


@pytest.mark.parametrize("name", ["seed5", "fairface7"])
def test_each_bundled_model_loads_by_name_with_its_classes_calibration_and_threshold(name):
    onnx, checkpoint = load_predictor(model_file(name)), load_predictor(model_file(name, checkpoint=True))
    assert (onnx.kind, checkpoint.kind) == ("onnx", "checkpoint")
    for predictor in (onnx, checkpoint):
        assert predictor.taxonomy.classes == get_taxonomy(name).classes
        assert predictor.temperature != 1.0 and predictor.abstention_threshold is not None
    assert onnx.preprocessing == checkpoint.preprocessing and onnx.preprocessing.crop["aligned"]
    assert onnx.calibration["temperature"] == checkpoint.calibration["temperature"]


def test_with_no_model_given_the_classifier_is_the_bundled_seed5_model():
    assert Classifier.load(detect=False).classes == get_taxonomy("seed5").classes
    assert load_predictor("fairface7").taxonomy.classes == get_taxonomy("fairface7").classes


def test_a_file_path_wins_over_a_bundled_name(tmp_path, monkeypatch, trained_checkpoints):
    monkeypatch.chdir(tmp_path)
    Path("seed5").write_bytes(Path(trained_checkpoints[0]).read_bytes())
    assert model_file("seed5") == Path("seed5")
    assert load_predictor("seed5").taxonomy.classes != get_taxonomy("seed5").classes  # the synthetic model


def test_an_unknown_name_that_is_no_file_is_an_error_listing_the_bundled_names(caplog):
    with pytest.raises(UnknownModelError, match="seed5, fairface7"):
        model_file("seed6")
    assert cli_main(["predict", str(GROUP_PHOTO), "--model_path", "seed6"]) == 2
    assert "seed6" in caplog.text and "seed5, fairface7" in caplog.text


def test_weights_from_may_only_name_a_file_beside_the_checkpoint(tmp_path):
    raw = torch.load(BUNDLED_DIR / "seed5.pt", weights_only=True)
    for bad in ("../fairface7.pt", str(BUNDLED_DIR / "fairface7.pt"), "missing.pt"):
        torch.save({**raw, "weights_from": bad}, tmp_path / "seed5.pt")
        with pytest.raises(CheckpointError):
            load_checkpoint(tmp_path / "seed5.pt")


def sample(taxonomy: str) -> list[Sample]:
    records, _ = read_fairface_csv(SAMPLE_CSV)
    mapping = get_mapping(get_taxonomy("fairface7"), get_taxonomy(taxonomy))
    return [Sample(r.path, mapping.map_label(r.label), r.gender, r.age) for r in records]


@pytest.mark.parametrize("name", ["seed5", "fairface7"])
@pytest.mark.parametrize("form", ["onnx", "checkpoint"])
def test_bundled_accuracy_on_the_hold_out_sample_stays_where_it_was_built(name, form):
    """A changed preprocessing, crop or loader that silently degrades the shipped models fails here."""
    recorded = manifest()["models"][name]["sample"][form]
    samples = sample(name)
    logits, errors = predict_logits(load_predictor(model_file(name, checkpoint=form == "checkpoint")), samples,
                                    workers=0)
    assert not errors and len(samples) == recorded["n"]
    accuracy = float((logits.argmax(axis=1) == np.array([s.label for s in samples])).mean())
    assert accuracy >= recorded["accuracy"] - MAX_DROP, (accuracy, recorded)


def test_every_face_of_the_group_photo_gets_a_box_and_a_label():
    result = Classifier.load().predict(GROUP_PHOTO)
    assert len(result.faces) == manifest()["demo"]["group_photo"]["faces"]
    assert all(face.box is not None and face.label in get_taxonomy("seed5").classes for face in result.faces)


def test_predict_writes_the_csv_and_an_annotated_copy_of_the_photo(tmp_path):
    out, annotated = tmp_path / "faces.csv", tmp_path / "annotated.jpg"
    assert cli_main(["predict", str(GROUP_PHOTO), "--output", str(out), "--annotate", str(annotated)]) == 0
    with open(out, newline="") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == manifest()["demo"]["group_photo"]["faces"]
    assert all(r["label"] in get_taxonomy("seed5").classes for r in rows)
    drawn, original = Image.open(annotated), Image.open(GROUP_PHOTO)
    assert drawn.size == original.size
    assert np.abs(np.asarray(drawn, dtype=int) - np.asarray(original, dtype=int)).max() > 100  # boxes drawn


def test_fine_tuning_takes_the_bundled_checkpoint_by_name(tmp_path):
    args = parse_args(["--dataset", "d", "--train_txt", str(tmp_path / "t.txt"), "--val_txt", str(tmp_path / "v.txt"),
                       "--pretrained", "fairface7"])
    assert Path(args.pretrained) == BUNDLED_DIR / "fairface7.pt"
    model = create_model("torchvision:mobilenet_v2", 7, args.pretrained)
    own = load_checkpoint(BUNDLED_DIR / "fairface7.pt")["state_dict"]
    assert torch.equal(model.state_dict()["classifier.1.weight"], own["classifier.1.weight"])  # classifier too


def test_a_built_wheel_carries_the_models_and_the_face_detector(tmp_path):
    """pip install of the wheel (not editable) into a fresh folder: predict finds the group photo's faces."""
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "-q", "-w", str(tmp_path / "wheel"),
                    str(REPO)], check=True)
    wheel = next((tmp_path / "wheel").glob("race_classifier-*.whl"))
    names = zipfile.ZipFile(wheel).namelist()
    assert all(f"race_classifier/bundled/{f}" in names for f in manifest()["files"])
    subprocess.run([sys.executable, "-m", "pip", "install", "--no-deps", "-q", "--target", str(tmp_path / "site"),
                    str(wheel)], check=True)
    env = {**os.environ, "PYTHONPATH": str(tmp_path / "site")}
    code = ("import race_classifier, sys; from race_classifier.cli import main; "
            f"assert race_classifier.__file__.startswith({str(tmp_path / 'site')!r}), race_classifier.__file__; "
            f"sys.exit(main(['predict', {str(GROUP_PHOTO)!r}, '--output', 'faces.csv']))")
    subprocess.run([sys.executable, "-c", code], check=True, cwd=tmp_path, env=env)
    with open(tmp_path / "faces.csv", newline="") as f:
        assert len(list(csv.DictReader(f))) == manifest()["demo"]["group_photo"]["faces"]


def test_commands_that_rewrite_a_model_leave_the_installed_files_alone(caplog):
    """calibrate rewrites its model in place: a bundled model needs --out_dir for the recalibrated copy."""
    before = file_sha256(BUNDLED_DIR / "seed5.pt")
    assert cli_main(["calibrate", "--model_path", "seed5", "--val_txt", "missing.txt"]) == 2
    assert "--out_dir" in caplog.text and file_sha256(BUNDLED_DIR / "seed5.pt") == before
