"""Gender and age-group heads: age binning rules, gender classes, the multi-head loss (a sample trains only
the heads it is labelled for), and a multi-task training run end to end."""
from __future__ import annotations

import csv
import re

import pytest
import torch

from race_classifier.data.synthetic import PATTERNS
from race_classifier.heads import AgeBins, HeadError, HeadLayout, gender_classes
from race_classifier.models.checkpoint import load_model
from race_classifier.training.engine import MultiHeadLoss
from race_classifier.training.train import main as train_main

from conftest import train_args, with_gender_and_age

BINS = AgeBins.parse()


@pytest.mark.parametrize("age, group", [
    ("0-2", "Child"), ("3-9", "Child"), ("10-19", "Teen"), ("20-29", "Adult"), ("50-59", "Adult"),
    ("60-69", "Senior"), ("more than 70", "Senior"), ("70+", "Senior"),
    ("12", "Child"), ("13", "Teen"), ("19", "Teen"), ("20", "Adult"), ("59", "Adult"), ("60", "Senior"),
    ("101", "Senior"), ("Teen", "Teen"), ("", None), ("unknown", None), ("?", None),
])
def test_age_groups_from_ages_and_fairface_ranges(age, group):
    index = BINS.index(age)
    assert (None if index is None else BINS.names[index]) == group


def test_age_range_rules_ties_and_open_ranges():
    bins = AgeBins.parse("Young:0,Old:5")
    assert bins.index("0-9") is None  # 5 years each side: a tie stays unlabelled
    assert bins.names[bins.index("2-8")] == "Old"  # 4 years Old vs 3 Young
    assert AgeBins.parse().index("50+") is None  # open range reaching past Senior's edge: ambiguous
    assert BINS.describe() == ["Child (0-12)", "Teen (13-19)", "Adult (20-59)", "Senior (60+)"]
    with pytest.raises(HeadError, match="not a number"):
        BINS.index("old-ish")
    with pytest.raises(HeadError, match="ends before"):
        BINS.index("19-10")
    for bad in ("Child:3,Adult:20", "A:0,B:10,C:5", "Child0,Adult:20", "A:0,A:5"):
        with pytest.raises(HeadError):
            AgeBins.parse(bad)


def test_gender_classes_come_from_the_data():
    assert gender_classes(["female", "M", "", "Male", "unknown"]) == ("Male", "Female")
    assert gender_classes(["Female", "Non-binary", "Male"]) == ("Male", "Female", "Non-binary")
    with pytest.raises(HeadError, match="at least two gender classes"):
        HeadLayout.build(["A", "B"], ("race", "gender"), gender_classes(["", ""]))
    with pytest.raises(HeadError, match="race head cannot be turned off"):
        HeadLayout.build(["A", "B"], ("gender",), ("Male", "Female"))


def test_layout_round_trip_and_targets():
    layout = HeadLayout.build(["A", "B", "C"], ("race", "gender", "age"), ("Male", "Female"), BINS)
    assert layout.num_outputs == 3 + 2 + 4 and layout.names == ("race", "gender", "age")
    assert HeadLayout.from_dict(layout.to_dict(), ["A", "B", "C"]) == layout
    assert HeadLayout.from_dict(None, ["A", "B"]) == HeadLayout.race_only(["A", "B"])
    assert layout.targets(2, "female", "10-19") == [2, 1, 1]
    assert layout.targets(-1, "", "") == [-1, -1, -1]
    parts = layout.split(torch.arange(9.0).reshape(1, 9))
    assert parts["gender"].tolist() == [[3.0, 4.0]] and parts["age"].shape == (1, 4)


def test_a_sample_trains_only_the_heads_it_is_labelled_for():
    layout = HeadLayout.build(["A", "B", "C"], ("race", "gender", "age"), ("Male", "Female"), BINS)
    loss_fn = MultiHeadLoss(list(layout.slices().values()))
    logits = torch.randn(3, layout.num_outputs, requires_grad=True)
    targets = torch.tensor([[0, 1, -1], [-1, 0, 2], [-1, -1, -1]])
    loss_fn(logits, targets).backward()
    grad = layout.split(logits.grad)
    assert grad["race"][1:].abs().sum() == 0 and grad["race"][0].abs().sum() > 0
    assert grad["gender"][2].abs().sum() == 0 and grad["gender"][:2].abs().sum() > 0
    assert grad["age"][[0, 2]].abs().sum() == 0 and grad["age"][1].abs().sum() > 0
    assert torch.isfinite(MultiHeadLoss(list(layout.slices().values()))(logits, torch.full((3, 3), -1)))


def test_multitask_training_run(manifests, tmp_path, capsys):
    data = tmp_path / "mt"
    data.mkdir()
    with_gender_and_age(manifests / "train.txt", data / "train.txt", drop_race_every=6)
    with_gender_and_age(manifests / "val.txt", data / "val.txt")
    (data / "classes.txt").write_text((manifests / "classes.txt").read_text())
    run = tmp_path / "run"
    assert train_main(train_args(data, run, "--num_epochs", "2", "--heads", "race,gender,age")) == 0
    out = capsys.readouterr().out

    # The brief's race lines are unchanged; each other head follows with its own block.
    assert len(re.findall(r"^Epoch \d/2 \| Train Loss: .* \| Val Loss: \d+\.\d{4}, Val Accuracy: \d+\.\d\d%$",
                          out, re.M)) == 2
    assert len(re.findall(r"^Gender: Train Accuracy: \d+\.\d\d% \| Val Accuracy: \d+\.\d\d%$", out, re.M)) == 2
    assert len(re.findall(r"^Age group: Train Accuracy: \d+\.\d\d% \| Val Accuracy: \d+\.\d\d%$", out, re.M)) == 2
    for name in ("Male", "Female", "Child", "Teen", "Adult", "Senior"):
        assert len(re.findall(rf"^ - {name}_accuracy: (\d+\.\d\d%|n/a)", out, re.M)) == 2
    with open(run / "log.csv") as f:
        rows = list(csv.DictReader(f))
    assert {"train_gender_accuracy", "val_gender_accuracy", "val_age_balanced_accuracy",
            "val_gender_Female_accuracy", "val_age_Teen_accuracy"} <= set(rows[0])
    assert f"Gender: Train Accuracy: {100 * float(rows[-1]['train_gender_accuracy']):.2f}% | " \
           f"Val Accuracy: {100 * float(rows[-1]['val_gender_accuracy']):.2f}%" in out
    # No validation sample is 'Senior'-free... every class got a figure or n/a; Adult (20-29) is present.
    assert rows[-1]["val_age_Adult_accuracy"] != ""

    loaded = load_model(run / "best.pt")
    assert loaded.heads.names == ("race", "gender", "age")
    assert loaded.heads.get("gender").classes == ("Male", "Female")
    assert loaded.heads.age_bins == BINS
    assert loaded.model(torch.zeros(2, 3, 32, 32)).shape == (2, len(PATTERNS) + 2 + 4)


def test_heads_without_validation_labels_leave_val_loss_defined(manifests, tmp_path, capsys):
    """A validation manifest with no gender or age column: --best_metric val_loss still keeps a best.pt."""
    data = tmp_path / "mt"
    data.mkdir()
    with_gender_and_age(manifests / "train.txt", data / "train.txt")
    (data / "val.txt").write_text((manifests / "val.txt").read_text())  # race labels only
    (data / "classes.txt").write_text((manifests / "classes.txt").read_text())
    run = tmp_path / "run"
    assert train_main(train_args(data, run, "--num_epochs", "2", "--heads", "race,gender,age",
                                 "--best_metric", "val_loss", "--patience", "1")) == 0
    out = capsys.readouterr().out
    assert len(re.findall(r"Val Loss: \d+\.\d{4}", out)) == 2 and "nan" not in out.lower()
    assert (run / "best.pt").is_file() and "Best epoch" in out


def test_multitask_resume_refuses_other_heads(manifests, tmp_path):
    data = tmp_path / "mt"
    data.mkdir()
    for name in ("train.txt", "val.txt"):
        with_gender_and_age(manifests / name, data / name)
    (data / "classes.txt").write_text((manifests / "classes.txt").read_text())
    run = tmp_path / "run"
    assert train_main(train_args(data, run, "--num_epochs", "1", "--heads", "race,gender")) == 0
    assert train_main(train_args(data, run, "--num_epochs", "2", "--heads", "race,gender,age", "--resume")) == 2


def test_nan_and_impossible_ages_are_unknown_labels():
    # "nan" is how pandas and str(float('nan')) write a missing value: unknown, never a Senior or a gender class
    for missing in ("nan", "NaN"):
        assert BINS.index(missing) is None
        assert gender_classes(["Male", "Female", missing]) == ("Male", "Female")
    for impossible in ("-1", "-3", "inf", "-inf"):  # unknown, as evaluation.metrics.age_group reads them
        assert BINS.index(impossible) is None
