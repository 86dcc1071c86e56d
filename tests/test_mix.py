"""``prepare mix``: a fake UTKFace folder, a folder tree and a FairFace-style CSV mapped into seed5 (UTKFace's
Others dropped); per-source sampling weights counted over epochs; per-source validation accuracy in the log."""
from __future__ import annotations

import csv
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from PIL import Image

from race_classifier.cli import main as cli_main
from race_classifier.data.manifest import read_manifest
from race_classifier.data.sampler import EpochSampler, class_balanced_weights, source_weighted
from race_classifier.data.transforms import Preprocessing, build_transform
from race_classifier.labels import get_taxonomy
from race_classifier.models.checkpoint import load_model
from race_classifier.training import config
from race_classifier.training.distributed import World
from race_classifier.training.run_data import RunSamples, build_loaders
from race_classifier.training.train import main as train_main

SEED5 = get_taxonomy("seed5")
UTK_RACES = ["White", "Black", "Asian", "Indian", "Others"]  # UTKFace's race codes 0..4
FAIRFACE_RACES = ["White", "Black", "Latino_Hispanic", "East Asian", "Southeast Asian", "Indian", "Middle Eastern"]
FAIRFACE_TO_SEED5 = {"East Asian": "Asian", "Southeast Asian": "Asian", "Middle Eastern": "White"}
TREE_TO_SEED5 = {"Caucasian": "White", "Afro-American": "Black", "Asian": "Asian", "Indian": "Indian",
                 "Latino Hispanic": "Latino_Hispanic"}


def image(path: Path, shade: int) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(shade)
    Image.fromarray((rng.integers(0, 60, (24, 24, 3)) + shade).astype(np.uint8)).save(path)


@pytest.fixture
def mix_config(tmp_path) -> Path:
    """UTKFace (50 files, 10 of them Others), a folder tree (5 classes x 4 identities x 2) and a FairFace CSV
    (42 rows, 7 races) with a given validation CSV (14 rows); weights 0.2 / 0.5 / 0.3."""
    expected = {}
    for i in range(50):
        race = i % 5
        path = tmp_path / "utk" / f"{20 + i}_{i % 2}_{race}_20170109{i:06d}.jpg.chip.jpg"
        image(path, 40 * race)
        expected[str(path)] = ("utkface", None if UTK_RACES[race] == "Others" else UTK_RACES[race])
    for folder, cls in TREE_TO_SEED5.items():
        for person in range(4):
            for k in range(2):
                path = tmp_path / "tree" / folder / f"p{person}" / f"{k}.png"
                image(path, 40 * SEED5.index(cls) + 5)
                expected[str(path)] = ("inhouse", cls)
    ff = tmp_path / "ff"
    for csv_name, count in (("fairface_label_train.csv", 42), ("fairface_label_val.csv", 14)):
        lines = ["file,age,gender,race,service_test"]
        for i in range(count):
            race = FAIRFACE_RACES[i % 7]
            rel = f"{csv_name[15:-4]}/{i}.jpg"
            image(ff / rel, 30 * (i % 7) + 3)
            lines.append(f"{rel},20-29,{'Male' if i % 2 else 'Female'},{race},TRUE")
            expected[str(ff / rel)] = ("fairface", FAIRFACE_TO_SEED5.get(race, race))
        (ff / csv_name).write_text("\n".join(lines) + "\n")
    cfg = tmp_path / "mix.yaml"
    cfg.write_text(yaml.safe_dump({"taxonomy": "seed5", "val_fraction": 0.25, "sources": [
        {"name": "utkface", "kind": "utkface", "path": "utk", "weight": 0.2},
        {"name": "inhouse", "kind": "folder", "path": "tree", "weight": 0.5},
        {"name": "fairface", "kind": "fairface", "path": "ff", "weight": 0.3}]}))
    (tmp_path / "expected.yaml").write_text(yaml.safe_dump(expected))
    return cfg


def test_mix_maps_every_source_into_seed5_and_drops_utkface_others(mix_config, tmp_path, capsys):
    out = tmp_path / "out"
    assert cli_main(["prepare", "mix", str(mix_config), "--out", str(out)]) == 0
    assert "Others 10" in capsys.readouterr().out
    expected = yaml.safe_load((tmp_path / "expected.yaml").read_text())
    train, val = read_manifest(out / "train.txt", SEED5), read_manifest(out / "val.txt", SEED5)
    for sample in train + val:
        source, cls = expected[sample.path]
        assert (sample.source, SEED5.classes[sample.label]) == (source, cls)
    listed = {s.path for s in train + val}
    kept = {p for p, (_, cls) in expected.items() if cls is not None}
    assert listed == kept  # everything but Others, nothing twice
    assert not {s.path for s in train} & {s.path for s in val}
    assert {s.source for s in val} == {"utkface", "inhouse", "fairface"}  # every source is validated
    assert {s.path for s in val if s.source == "fairface"} == {p for p in kept if "/ff/val/" in p}  # given set
    assert yaml.safe_load((out / "source_weights.yaml").read_text()) == {"utkface": 0.2, "inhouse": 0.5,
                                                                         "fairface": 0.3}


def test_source_weights_set_each_sources_share_of_an_epochs_draws(mix_config, tmp_path):
    out = tmp_path / "out"
    assert cli_main(["prepare", "mix", str(mix_config), "--out", str(out)]) == 0
    args = config.parse_args(["--dataset", "mix", "--checkpoint_dir", str(tmp_path / "run"), "--train_txt",
                              str(out / "train.txt"), "--val_txt", str(out / "val.txt"), "--arch",
                              "mobilenetv3_small_050", "--image_size", "24", "--workers", "0",
                              "--balance", "sampler"])
    assert args.source_weights == str(out / "source_weights.yaml")  # found beside the manifest
    samples = RunSamples.read(args)  # the run's data alone: no model needed to check its draws
    sampler = build_loaders(args, World(), samples, Preprocessing(image_size=24), torch.device("cpu")).sampler
    sources = [s.source for s in samples.train]
    sizes = Counter(sources)
    draws, classes_in_inhouse = Counter(), Counter()
    for epoch in range(40):
        sampler.set_epoch(epoch)
        for i in sampler.order():
            draws[sources[i]] += 1
            if sources[i] == "inhouse":
                classes_in_inhouse[samples.train[i].label] += 1
    total = sum(draws.values())
    assert total == 40 * len(sources)
    for name, share in (("utkface", 0.2), ("inhouse", 0.5), ("fairface", 0.3)):
        assert abs(draws[name] / total - share) < 0.03, (name, draws, sizes)
    # unweighted draws would follow the sizes, far from the shares asked
    assert abs(sizes["inhouse"] / len(sources) - 0.5) > 0.15
    # --balance sampler within a source: its classes are drawn equally
    inhouse = sum(classes_in_inhouse.values())
    assert all(abs(n / inhouse - 0.2) < 0.04 for n in classes_in_inhouse.values())


def test_a_plain_prepare_over_a_mix_removes_its_source_weights(mix_config, tmp_path):
    """Re-preparing a folder where a mix was prepared: training must not read the mix's weights beside the new
    manifests (they have no source column, so it stopped with 'no sampling weight for source(s)')."""
    out = tmp_path / "out"
    assert cli_main(["prepare", "mix", str(mix_config), "--out", str(out)]) == 0
    assert (out / "source_weights.yaml").is_file()
    assert cli_main(["prepare", "folder", str(tmp_path / "tree"), "--out", str(out), "--val_fraction", "0.25"]) == 0
    assert not (out / "source_weights.yaml").exists()
    args = config.parse_args(["--dataset", "tree", "--checkpoint_dir", str(tmp_path / "run"), "--train_txt",
                              str(out / "train.txt"), "--val_txt", str(out / "val.txt"), "--arch",
                              "mobilenetv3_small_050", "--image_size", "24", "--workers", "0"])
    assert args.source_weights is None
    build_loaders(args, World(), RunSamples.read(args), Preprocessing(image_size=24), torch.device("cpu"))


def test_source_weighted_needs_every_source_and_honours_zero():
    weights = source_weighted(["a"] * 30 + ["b"] * 10, {"a": 0.0, "b": 1.0}, lambda idx: None)
    order = EpochSampler(40, weights=weights).order()
    assert min(order) >= 30  # a share of 0: never drawn
    with pytest.raises(ValueError, match="c"):
        source_weighted(["a", "c"], {"a": 1.0})
    balanced = source_weighted(["a"] * 4, {"a": 1.0}, lambda idx: class_balanced_weights([0, 0, 0, 1], 2))
    assert torch.allclose(balanced, torch.tensor([1 / 6, 1 / 6, 1 / 6, 1 / 2], dtype=torch.double))


def test_per_source_validation_accuracy_columns_equal_a_recount(mix_config, tmp_path, capsys):
    out = tmp_path / "out"
    assert cli_main(["prepare", "mix", str(mix_config), "--out", str(out)]) == 0
    run = tmp_path / "run"
    assert train_main(["--dataset", "mix", "--checkpoint_dir", str(run), "--train_txt", str(out / "train.txt"),
                       "--val_txt", str(out / "val.txt"), "--arch", "mobilenetv3_small_050", "--image_size", "24",
                       "--batch_size", "8", "--workers", "0", "--num_epochs", "1",
                       "--learning_rate", "0.01"]) == 0
    printed = capsys.readouterr().out
    assert "Source-wise accuracies:" in printed and " - val_utkface_accuracy: " in printed
    with open(run / "log.csv", newline="") as f:
        row = next(csv.DictReader(f))

    loaded = load_model(run / "best.pt")  # epoch 1's weights (temperature does not change the argmax)
    transform = build_transform(loaded.preprocessing, train=False)
    right, count = Counter(), Counter()
    with torch.no_grad():
        for sample in read_manifest(out / "val.txt", SEED5):
            logits = loaded.model(transform(Image.open(sample.path).convert("RGB")).unsqueeze(0))
            right[sample.source] += int(logits[0, :SEED5.num_classes].argmax()) == sample.label
            count[sample.source] += 1
    assert set(count) == {"utkface", "inhouse", "fairface"}
    for source in count:
        assert float(row[f"val_{source}_accuracy"]) == pytest.approx(right[source] / count[source], abs=1e-6)
    overall = sum(right.values()) / sum(count.values())
    assert float(row["val_accuracy"]) == pytest.approx(overall, abs=1e-6)
