"""Knowledge distillation: the soft-labels file (teachers' mean probabilities per training image), the targets
it gives training, and a run that learns from it."""
from __future__ import annotations

import hashlib
import numpy as np
import pytest
import torch

from race_classifier.cli import main as cli_main
from race_classifier.data.manifest import Sample, read_manifest
from race_classifier.evaluation.runner import predict_samples
from race_classifier.labels import get_taxonomy
from race_classifier.models.checkpoint import load_checkpoint
from race_classifier.models.loaders import load_predictor
from race_classifier.training.distill import SoftLabelError, SoftLabels, TeacherTargets
from race_classifier.training.mixing import BatchMixer
from race_classifier.training.train import main as train_main

from conftest import train_args


def soft_labels_of(manifests, out, *teachers, extra=()):
    assert cli_main(["soft-labels", "--model_path", *map(str, teachers), "--train_txt", str(manifests / "train.txt"),
                     "--out", str(out), "--workers", "0", *extra]) == 0
    return SoftLabels.load(out)


def test_soft_labels_are_the_mean_of_the_teachers_calibrated_probabilities(manifests, trained_checkpoints, tmp_path,
                                                                           capsys):
    one, three = trained_checkpoints
    both = soft_labels_of(manifests, tmp_path / "both.npz", one, three)
    assert "teachers' top class matches the label for" in capsys.readouterr().out
    singles = [soft_labels_of(manifests, tmp_path / f"{p.parent.name}.npz", p).probs for p in (one, three)]
    np.testing.assert_allclose(both.probs, (singles[0] + singles[1]) / 2, atol=1e-6)
    assert both.paths == [line.split("\t")[0] for line in (manifests / "train.txt").read_text().splitlines()
                          if line and not line.startswith("#")]
    assert both.teachers == [str(one), str(three)] and both.classes == list(load_checkpoint(one)["taxonomy"]["classes"])
    np.testing.assert_allclose(both.probs.sum(axis=1), 1.0, atol=1e-5)
    # what the teacher says about each image is what evaluating it says (calibrated, same preprocessing)
    taxonomy = get_taxonomy(str(manifests / "classes.txt"))
    table = predict_samples(load_predictor(three), read_manifest(manifests / "train.txt", taxonomy), taxonomy,
                            workers=0)
    np.testing.assert_allclose(singles[1], table[[f"prob_{k}" for k in range(4)]].to_numpy(), atol=1e-6)

    flipped = soft_labels_of(manifests, tmp_path / "tta.npz", three, extra=["--tta"]).probs
    assert not np.allclose(flipped, singles[1], atol=1e-4)  # the mirror images were seen too


def test_an_unreadable_image_gets_no_soft_label_and_is_named(manifests, trained_checkpoints, tmp_path, caplog):
    lines = (manifests / "train.txt").read_text().splitlines()
    broken = tmp_path / "broken.jpg"
    broken.write_bytes(b"not a jpeg")
    (tmp_path / "train.txt").write_text("\n".join(lines + [f"{broken}\t{lines[-1].split(chr(9))[1]}"]) + "\n")
    soft = soft_labels_of(tmp_path, tmp_path / "soft.npz", trained_checkpoints[0])
    assert np.isnan(soft.probs[-1]).all() and not np.isnan(soft.probs[:-1]).any()
    assert f"train.txt:{len(lines) + 1}: {broken} unreadable" in caplog.text


def test_a_teacher_changed_since_its_soft_labels_were_written_is_named_when_training(
        manifests, trained_checkpoints, tmp_path, caplog, one_thread):
    teacher = tmp_path / "teacher" / "best.pt"
    teacher.parent.mkdir()
    teacher.write_bytes(trained_checkpoints[0].read_bytes())
    soft = soft_labels_of(manifests, tmp_path / "soft.npz", teacher)
    assert soft.teacher_sha256 == [hashlib.sha256(teacher.read_bytes()).hexdigest()]
    assert soft.changed_teachers() == []
    teacher.write_bytes(trained_checkpoints[1].read_bytes())  # retrained into the same directory
    assert SoftLabels.load(tmp_path / "soft.npz").changed_teachers() == [str(teacher)]
    assert train_main(train_args(manifests, tmp_path / "run", "--num_epochs", "1", "--soft_labels",
                                 str(tmp_path / "soft.npz"))) == 0
    assert f"teacher {teacher} has changed since these soft labels were written" in caplog.text


def sample(path, label, line=1):
    return Sample(str(path), label, line=line)


def test_teacher_targets_blend_the_teachers_with_the_smoothed_label(tmp_path, monkeypatch):
    soft = SoftLabels(["b.jpg", "a.jpg", "gone.jpg"],
                      np.array([[0.7, 0.2, 0.1], [0.1, 0.1, 0.8], [np.nan] * 3], np.float32), ["x", "y", "z"], ["t.pt"])
    soft.save(tmp_path / "s.npz")
    soft = SoftLabels.load(tmp_path / "s.npz")
    samples = [sample(tmp_path / ".." / tmp_path.name / "a.jpg", 0), sample("b.jpg", 1), sample("gone.jpg", 2)]
    (tmp_path / "a.jpg").touch()
    monkeypatch.chdir(tmp_path)  # relative paths in the file and the manifest meet as absolute paths
    targets = TeacherTargets(soft, samples, ["x", "y", "z"], 0.75, 0.3, "s.npz")
    got = targets(torch.tensor([0, 1, 2]), torch.tensor([0, 1, 2]))
    smooth = torch.full((3, 3), 0.1) + 0.7 * torch.eye(3)  # label smoothing 0.3 over 3 classes
    expected = torch.stack([0.75 * torch.tensor([0.1, 0.1, 0.8]) + 0.25 * smooth[0],
                            0.75 * torch.tensor([0.7, 0.2, 0.1]) + 0.25 * smooth[1],
                            smooth[2]])  # no teacher for an unreadable image: the label alone
    torch.testing.assert_close(got, expected)
    torch.testing.assert_close(got.sum(1), torch.ones(3))

    with pytest.raises(SoftLabelError, match=r"no soft labels for 1 of the 2 training images \(line 7: c.jpg\)"):
        TeacherTargets(soft, [sample("a.jpg", 0), sample("c.jpg", 0, line=7)], ["x", "y", "z"], 0.5, 0, "s.npz")
    with pytest.raises(SoftLabelError, match=r"holds probabilities over \['x', 'y', 'z'\]; this run trains"):
        TeacherTargets(soft, samples, ["x", "y"], 0.5, 0, "s.npz")


def test_a_file_that_is_not_soft_labels_is_refused_by_name(tmp_path):
    np.savez(tmp_path / "other.npz", probs=np.ones((2, 2)))
    with pytest.raises(SoftLabelError, match="other.npz: not a soft-label file"):
        SoftLabels.load(tmp_path / "other.npz")
    SoftLabels(["a", "b"], np.array([[0.5, 0.9], [1.0, 0.0]]), ["x", "y"], ["t"]).save(tmp_path / "bad.npz")
    with pytest.raises(SoftLabelError, match="bad.npz: probs must be one probability row per path"):
        SoftLabels.load(tmp_path / "bad.npz")
    with pytest.raises(SoftLabelError, match="not found"):
        SoftLabels.load(tmp_path / "missing.npz")


def test_mixing_mixes_teacher_targets_by_the_same_weight_as_the_images():
    images, labels = torch.rand(4, 3, 8, 8), torch.tensor([0, 1, 2, 3])
    teacher = torch.softmax(torch.randn(4, 4, generator=torch.Generator().manual_seed(0)), 1)
    mixer = BatchMixer(0.4, 0.0, 1.0, 4, 0.0, seed=0)
    mixed, soft = mixer(images.clone(), labels, teacher, epoch=0, batch=1)
    _, from_labels = mixer(images.clone(), labels, epoch=0, batch=1)
    lam = float(from_labels[0, 0])
    torch.testing.assert_close(mixed, lam * images + (1 - lam) * images.flip(0))
    torch.testing.assert_close(soft, lam * teacher + (1 - lam) * teacher.flip(0))


def test_training_on_soft_labels_that_are_the_labels_is_training_on_the_labels(manifests, tmp_path, caplog,
                                                                               one_thread):
    """A teacher that gives each training image its own label, at --distill_weight 1 and no label smoothing:
    the run is the plain run, weight for weight (so each image gets its own soft label, not another's)."""
    taxonomy = get_taxonomy(str(manifests / "classes.txt"))
    train = read_manifest(manifests / "train.txt", taxonomy)
    labels = np.eye(4, dtype=np.float32)[[s.label for s in train]]
    SoftLabels([s.path for s in train], labels, list(taxonomy.classes), ["own-labels"]).save(tmp_path / "s.npz")
    shifted = np.roll(labels, 1, axis=1)  # the next class: another run
    SoftLabels([s.path for s in train], shifted, list(taxonomy.classes), ["next"]).save(tmp_path / "next.npz")
    common = ("--num_epochs", "1", "--label_smoothing", "0", "--learning_rate", "0.003")
    runs = {name: tmp_path / name for name in ("plain", "distilled", "shifted")}
    assert train_main(train_args(manifests, runs["plain"], *common)) == 0
    assert train_main(train_args(manifests, runs["distilled"], *common, "--soft_labels", str(tmp_path / "s.npz"),
                                 "--distill_weight", "1")) == 0
    assert train_main(train_args(manifests, runs["shifted"], *common, "--soft_labels", str(tmp_path / "next.npz"),
                                 "--distill_weight", "1")) == 0
    weights = {name: load_checkpoint(run / "last.pt")["state_dict"] for name, run in runs.items()}
    for key, value in weights["plain"].items():
        torch.testing.assert_close(weights["distilled"][key], value, atol=1e-5, rtol=1e-4)
    assert any(not torch.allclose(weights["shifted"][k], v, atol=1e-3) for k, v in weights["plain"].items()
               if v.is_floating_point())
    card = (runs["distilled"] / "MODEL_CARD.md").read_text()
    assert ("Distilled: the race head was trained towards 1.0 x the mean calibrated probabilities of the teacher "
            f"model(s) own-labels (soft labels `{tmp_path / 's.npz'}`) + 0 x the labels") in card

    # A resume must use the same file; other heads are refused.
    for other in (["--soft_labels", str(tmp_path / "next.npz")], []):
        caplog.clear()
        assert train_main(train_args(manifests, runs["distilled"], "--num_epochs", "2", "--resume", *other)) == 2
        assert "resume it with the same" in caplog.text


def test_soft_labels_are_refused_with_other_heads(multitask_manifests, tmp_path, caplog):
    assert train_main(train_args(multitask_manifests, tmp_path / "heads", "--num_epochs", "1", "--heads",
                                 "race,gender", "--soft_labels", str(tmp_path / "any.npz"))) == 2
    assert "--soft_labels distil race labels only" in caplog.text
