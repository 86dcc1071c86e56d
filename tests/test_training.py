"""End-to-end training on the synthetic pattern dataset: console format, CSV log, checkpoints, bad images,
configs, and resuming a run killed with SIGKILL."""
from __future__ import annotations

import csv
import re
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

from race_classifier.data.synthetic import PATTERNS
from race_classifier.models.checkpoint import load_model
from race_classifier.training.train import main as train_main

from conftest import ARCH, REPO, train_args


def read_log(path: Path) -> list[dict]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def test_epoch_lines_csv_and_checkpoints(manifests, tmp_path, capsys):
    run = tmp_path / "run"
    assert train_main(train_args(manifests, run, "--num_epochs", "2")) == 0
    out = capsys.readouterr().out

    epoch_line = re.compile(r"^Epoch (\d)/2 \| Train Loss: \d+\.\d{4}, Train Accuracy: \d+\.\d\d% \| "
                            r"Val Loss: \d+\.\d{4}, Val Accuracy: \d+\.\d\d%$", re.M)
    assert [m.group(1) for m in epoch_line.finditer(out)] == ["1", "2"]
    assert out.count("Class-wise accuracies:") == 2
    for name in PATTERNS:
        assert len(re.findall(rf"^ - {name}_accuracy: \d+\.\d\d%$", out, re.M)) == 2

    with open(run / "log.csv") as f:
        assert f.read().count("epoch,train_loss") == 1  # header once
    rows = read_log(run / "log.csv")
    assert [r["epoch"] for r in rows] == ["1", "2"]
    assert {f"{c}_accuracy" for c in PATTERNS} | {"lr", "epoch_time_s", "val_accuracy"} <= set(rows[0])
    # The console shows the same figures as the CSV.
    last = [m for m in epoch_line.finditer(out)][-1].group(0)
    assert f"Val Accuracy: {100 * float(rows[-1]['val_accuracy']):.2f}%" in last

    for name in ("best.pt", "last.pt"):
        ckpt = torch.load(run / name, map_location="cpu", weights_only=True)
        assert ckpt["arch"] == ARCH and ckpt["taxonomy"]["classes"] == list(PATTERNS)
        assert ckpt["preprocessing"]["image_size"] == 32 and len(ckpt["preprocessing"]["mean"]) == 3
        assert ckpt["train_args"]["batch_size"] == 8
    # The best checkpoint alone rebuilds the model, and scores what the log says it scored.
    best = torch.load(run / "best.pt", weights_only=True)
    loaded = load_model(run / "best.pt")
    assert loaded.taxonomy.classes == tuple(PATTERNS)
    from race_classifier.data.dataset import FaceDataset, collate_skipping_failures
    from race_classifier.data.manifest import read_manifest
    from race_classifier.data.transforms import build_transform
    from race_classifier.training.engine import evaluate
    val = FaceDataset(read_manifest(manifests / "val.txt", loaded.taxonomy), build_transform(loaded.preprocessing, False))
    loader = torch.utils.data.DataLoader(val, batch_size=8, collate_fn=collate_skipping_failures)
    result = evaluate(loaded.model, loader, torch.device("cpu"), None, loaded.heads)
    assert result["accuracy"] == pytest.approx(best["metrics"]["val_accuracy"], abs=1e-6)


def test_bad_image_is_skipped_and_listed(manifests, tmp_path, capsys):
    bad, bad_val = tmp_path / "broken.jpg", tmp_path / "broken_val.jpg"
    for path in (bad, bad_val):
        path.write_bytes(b"\xff\xd8\xff\xe0 not really a jpeg")
    train_txt, val_txt = tmp_path / "train.txt", tmp_path / "val.txt"
    train_txt.write_text((manifests / "train.txt").read_text() + f"{bad}\tstripes\t\t\n")
    val_txt.write_text((manifests / "val.txt").read_text() + f"{bad_val}\tdots\t\t\n")
    n_train, n_val = (sum(1 for l in p.read_text().splitlines() if l and not l.startswith("#"))
                      for p in (train_txt, val_txt))
    run = tmp_path / "run"
    args = train_args(manifests, run, "--num_epochs", "2", "--taxonomy", str(manifests / "classes.txt"))
    args[args.index("--train_txt") + 1], args[args.index("--val_txt") + 1] = str(train_txt), str(val_txt)
    assert train_main(args) == 0
    out = capsys.readouterr().out
    # The header counts the images listed; each epoch says once per split how many were skipped, and which.
    assert f"on {n_train} training / {n_val} validation images listed, 4 classes" in out
    for epoch in (1, 2):
        training = f"Skipped 1 unreadable training image(s) of the {n_train} listed in epoch {epoch} "
        validation = f"Skipped 1 unreadable validation image(s) of the {n_val} listed in epoch {epoch} "
        assert out.count(training) == 1 and out.count(validation) == 1
        block = out[out.index(training):]
        assert block.index(str(bad)) < block.index(validation) < block.index(str(bad_val))
    assert out.count("Skipped ") == 4
    assert read_log(run / "log.csv")[0]["skipped_images"] == "2"
    assert {str(bad), str(bad_val)} <= set(re.findall(r"^(\S+)\t", (run / "skipped_images.txt").read_text(), re.M))
    # With an image cache the unreadable images are known before training: the header says so.
    cached = tmp_path / "cached"
    args = train_args(manifests, cached, "--num_epochs", "1", "--taxonomy", str(manifests / "classes.txt"),
                      "--cache_dir", str(tmp_path / "cache"))
    args[args.index("--train_txt") + 1], args[args.index("--val_txt") + 1] = str(train_txt), str(val_txt)
    assert train_main(args) == 0
    assert (f"on {n_train} training / {n_val} validation images listed (1 training / 1 validation unreadable in "
            f"the image cache: skipped, {n_train - 1} / {n_val - 1} used)") in capsys.readouterr().out
    # Started afresh on clean data, the run does not keep the previous run's listing.
    assert train_main(train_args(manifests, run, "--num_epochs", "1", "--overwrite")) == 0
    assert read_log(run / "log.csv")[0]["skipped_images"] == "0" and not (run / "skipped_images.txt").exists()


def test_unknown_label_names_file_and_line(manifests, tmp_path, caplog):
    train_txt = tmp_path / "train.txt"
    lines = (manifests / "train.txt").read_text().splitlines()
    lines[3] = lines[3].split("\t")[0] + "\tzigzags\t\t"
    train_txt.write_text("\n".join(lines) + "\n")
    args = train_args(manifests, tmp_path / "run", "--num_epochs", "1", "--taxonomy", str(manifests / "classes.txt"))
    args[args.index("--train_txt") + 1] = str(train_txt)
    assert train_main(args) == 2
    assert f"{train_txt}:4" in caplog.text and "zigzags" in caplog.text


def test_existing_run_needs_resume_or_overwrite(manifests, tmp_path, caplog):
    run = tmp_path / "run"
    assert train_main(train_args(manifests, run, "--num_epochs", "1")) == 0
    assert train_main(train_args(manifests, run, "--num_epochs", "1")) == 2
    assert "--resume" in caplog.text
    assert train_main(train_args(manifests, run, "--num_epochs", "1", "--overwrite")) == 0
    assert len(read_log(run / "log.csv")) == 1


def test_freeze_until_keeps_the_pretrained_layers_before_the_module(manifests, tmp_path, caplog):
    from race_classifier.models.factory import create_model
    pretrained = create_model(ARCH, 4).state_dict()
    torch.save(pretrained, tmp_path / "imagenet.pth")
    run = tmp_path / "run"
    args = train_args(manifests, run, "--num_epochs", "1", "--learning_rate", "0.01",
                      "--pretrained", str(tmp_path / "imagenet.pth"), "--freeze_until", "blocks.2")
    assert train_main(args) == 0
    trained = load_model(run / "last.pt").model
    changed = {n for n, p in trained.named_parameters() if not torch.equal(p, pretrained[n])}
    names = [n for n, _ in trained.named_parameters()]
    first_trained = next(i for i, n in enumerate(names) if n.startswith("blocks.2."))
    assert not changed & set(names[:first_trained])  # the stem and blocks 0-1 are the pretrained ones
    assert set(names[first_trained:]) <= changed

    args[args.index("blocks.2")] = "features.4"  # torchvision's MobileNetV2 name, not this timm model's
    assert train_main(args + ["--overwrite"]) == 2
    assert "--freeze_until features.4" in caplog.text and "blocks.2" in caplog.text


def test_initial_checkpoint_starts_from_every_weight_of_an_earlier_run(manifests, trained_checkpoints, tmp_path,
                                                                       caplog):
    """Progressive resizing: a run at another input size starts from a finished run's weights, classifier
    included (lr 0 keeps the parameters where they started), and its model card says where they came from."""
    earlier = trained_checkpoints[1]
    run = tmp_path / "larger"
    args = train_args(manifests, run, "--num_epochs", "1", "--image_size", "48", "--learning_rate", "0",
                      "--warmup_epochs", "0", "--weight_decay", "0", "--initial_checkpoint", str(earlier))
    assert train_main(args) == 0
    start, after = load_model(earlier).model, load_model(run / "best.pt")
    assert after.preprocessing.image_size == 48
    for (name, p), (_, q) in zip(start.named_parameters(), after.model.named_parameters()):
        assert torch.equal(p, q), name
    card = (run / "MODEL_CARD.md").read_text()
    assert f"initial weights: {earlier} (epoch 3 of a run at 32 px" in card

    args = train_args(manifests, tmp_path / "mismatch", "--num_epochs", "1", "--initial_checkpoint", str(earlier))
    args[args.index(ARCH)] = "resnet10t"
    assert train_main(args) == 2
    assert str(earlier) in caplog.text and "this run asks for" in caplog.text


def test_weight_average_is_what_best_pt_keeps_and_the_log_scores(manifests, tmp_path, capsys):
    """--model_ema_decay: the epoch's figures and best.pt are the weight average's; the trained weights
    (last.pt) are scored too, on their own line and columns; the model card says which weights it describes."""
    from race_classifier.data.dataset import FaceDataset, collate_skipping_failures
    from race_classifier.data.manifest import read_manifest
    from race_classifier.data.transforms import build_transform
    from race_classifier.training.engine import evaluate

    run = tmp_path / "run"
    assert train_main(train_args(manifests, run, "--num_epochs", "2", "--learning_rate", "0.01",
                                 "--model_ema_decay", "0.95")) == 0
    out = capsys.readouterr().out
    rows = read_log(run / "log.csv")
    assert re.findall(r"^Without weight averaging: Val Loss: \d+\.\d{4}, Val Accuracy: (\d+\.\d\d)%$", out, re.M) == [
        f"{100 * float(r['val_accuracy_without_ema']):.2f}" for r in rows]
    best, last = load_model(run / "best.pt"), load_model(run / "last.pt")
    best_epoch = torch.load(run / "best.pt", weights_only=True)["epoch"]
    averaged = dict(best.model.named_parameters())
    assert any(not torch.equal(p, averaged[n]) for n, p in last.model.named_parameters())

    def score(model) -> tuple[float, float]:
        val = FaceDataset(read_manifest(manifests / "val.txt", best.taxonomy), build_transform(best.preprocessing, False))
        loader = torch.utils.data.DataLoader(val, batch_size=8, collate_fn=collate_skipping_failures)
        result = evaluate(model, loader, torch.device("cpu"), None, best.heads)
        return result["accuracy"], result["loss"]

    row = rows[best_epoch - 1]
    assert score(best.model) == pytest.approx((float(row["val_accuracy"]), float(row["val_loss"])), abs=1e-5)
    assert score(last.model) == pytest.approx(
        (float(rows[-1]["val_accuracy_without_ema"]), float(rows[-1]["val_loss_without_ema"])), abs=1e-5)
    assert "exponential moving average of the trained weights (decay 0.95" in (run / "MODEL_CARD.md").read_text()

    # Resuming must keep the run's choice: an average started afresh, or dropped, would mix two recipes.
    assert train_main(train_args(manifests, run, "--num_epochs", "2", "--resume")) == 2
    assert train_main(train_args(manifests, tmp_path / "plain", "--num_epochs", "1")) == 0
    assert train_main(train_args(manifests, tmp_path / "plain", "--num_epochs", "2", "--resume",
                                 "--model_ema_decay", "0.95")) == 2


def test_yaml_config_sets_defaults_and_flags_win(manifests, tmp_path):
    from race_classifier.training.config import parse_args
    cfg = tmp_path / "c.yaml"
    cfg.write_text(yaml.safe_dump({"batch_size": 16, "learning_rate": 0.01, "arch": "resnet18"}))
    args = parse_args(["-c", str(cfg), *train_args(manifests, tmp_path / "r", "--learning_rate", "0.5")])
    assert args.batch_size == 8  # train_args passes --batch_size 8 on the command line
    assert args.learning_rate == 0.5 and args.num_epochs == 50
    args = parse_args(["-c", str(cfg), "--dataset", "x", "--train_txt", "t", "--val_txt", "v"])
    assert (args.batch_size, args.learning_rate, args.arch) == (16, 0.01, "resnet18")
    assert args.checkpoint_dir == str(Path("runs") / "x")
    cfg.write_text("bacth_size: 3\n")
    with pytest.raises(SystemExit):
        parse_args(["-c", str(cfg), "--dataset", "x", "--train_txt", "t", "--val_txt", "v"])


def _metrics(rows: list[dict]) -> list[dict]:
    return [{k: v for k, v in r.items() if k != "epoch_time_s"} for r in rows]


@pytest.mark.parametrize("options", [(), ("--model_ema_decay", "0.9"), ("--mixup", "0.4", "--cutmix", "1.0")],
                         ids=["plain", "weight-average", "mixup-cutmix"])
def test_resume_after_sigkill_mid_epoch_matches_uninterrupted_run(manifests, tmp_path, one_thread, options):
    """Kill -9 in the middle of epoch 2, resume: 3 epochs logged once each, figures as if never killed (with a
    weight average, its figures and the trained weights' both: last.pt carries the average)."""
    reference = tmp_path / "reference"
    assert train_main(train_args(manifests, reference, "--num_epochs", "3", *options)) == 0

    run = tmp_path / "killed"
    # The run kills itself (SIGKILL, no clean-up) when it is about to save epoch 2's second mid-epoch
    # checkpoint: the batch trained since the first one is lost, as in a real kill. Polling last.pt from
    # here instead raced the few-batch epochs of this tiny set and failed on a loaded machine.
    args = train_args(manifests, run, "--num_epochs", "3", "--save_every_steps", "1", *options)
    proc = _kill_in_epoch_2(args)
    assert proc.returncode == -signal.SIGKILL, proc.stderr[-2000:]
    resume = torch.load(run / "last.pt", weights_only=True)["resume"]
    assert resume["epoch"] == 1 and resume["progress"]["batches"] == 1
    assert len(read_log(run / "log.csv")) == 1

    assert train_main(train_args(manifests, run, "--num_epochs", "3", "--resume", *options)) == 0
    rows = read_log(run / "log.csv")
    assert [r["epoch"] for r in rows] == ["1", "2", "3"]
    expected = _metrics(read_log(reference / "log.csv"))
    assert ("val_accuracy_without_ema" in expected[0]) == ("--model_ema_decay" in options)
    for got, want in zip(_metrics(rows), expected):
        for key in want:
            assert float(got[key]) == pytest.approx(float(want[key]), rel=1e-4, abs=1e-6), key


def _kill_in_epoch_2(args: list[str]) -> subprocess.CompletedProcess:
    """Run train.py with ``args`` in a subprocess that kills itself (SIGKILL, no clean-up) when it is about to
    save epoch 2's second mid-epoch checkpoint (--save_every_steps 1): the batch trained since the first one is
    lost, as in a real kill."""
    launcher = (
        "import os, runpy, signal, sys\n"
        "from race_classifier.training.train import Trainer\n"
        "save_last = Trainer.save_last\n"
        "def save_or_die(self, epoch, in_progress):\n"
        "    if epoch == 1 and in_progress and self.progress.batches >= 2:\n"
        "        os.kill(os.getpid(), signal.SIGKILL)\n"
        "    save_last(self, epoch, in_progress)\n"
        "Trainer.save_last = save_or_die\n"
        f"sys.argv = ['train.py', *{args!r}]\n"
        "runpy.run_path('train.py', run_name='__main__')\n")
    return subprocess.run([sys.executable, "-c", launcher], cwd=REPO, capture_output=True, text=True, timeout=300)


def test_dropout_figures_do_not_depend_on_workers_or_a_resume(manifests, tmp_path, one_thread):
    """A model with dropout draws from the global torch RNG every training step. Three epochs (the third was
    where it broke: starting a loader's iteration drew from that RNG, once per epoch without persistent workers,
    once per run with them, and again after a resume) give the same figures with --workers 0 and --workers 2,
    and a --workers 2 run killed in epoch 2 and resumed gives that run's own epoch 3."""
    options = ("--num_epochs", "3", "--drop_rate", "0.5")
    runs = {}
    for workers in ("0", "2"):
        runs[workers] = tmp_path / f"workers{workers}"
        assert train_main(train_args(manifests, runs[workers], *options, "--workers", workers)) == 0
    by_workers = [_metrics(read_log(runs[w] / "log.csv")) for w in ("0", "2")]
    assert len(by_workers[0]) == 3
    for epoch, (w0, w2) in enumerate(zip(*by_workers), 1):
        for key in w0:
            assert float(w2[key]) == pytest.approx(float(w0[key]), rel=1e-5, abs=1e-7), (epoch, key)

    killed = tmp_path / "killed"
    args = train_args(manifests, killed, *options, "--workers", "2", "--save_every_steps", "1")
    proc = _kill_in_epoch_2(args)
    assert proc.returncode == -signal.SIGKILL, proc.stderr[-2000:]
    assert torch.load(killed / "last.pt", weights_only=True)["resume"]["epoch"] == 1
    assert train_main([*args, "--resume"]) == 0
    rows = _metrics(read_log(killed / "log.csv"))
    assert [r["epoch"] for r in rows] == ["1", "2", "3"]
    for epoch, (got, want) in enumerate(zip(rows, by_workers[1]), 1):
        for key in want:
            assert float(got[key]) == pytest.approx(float(want[key]), rel=1e-5, abs=1e-7), (epoch, key)


@pytest.mark.shared("data/fairface/fairface_label_train.csv", "weights/mobilenet_v2-b0353104.pth")
def test_real_faces_fairface_to_seed5_with_offline_imagenet_weights(shared_dir, tmp_path, capsys):
    """The brief's path on real faces: prepare FairFace into seed5, fine-tune the offline MobileNetV2."""
    from race_classifier.cli import main as cli_main
    out = tmp_path / "fairface"
    assert cli_main(["prepare", "fairface", str(shared_dir / "data/fairface"), "--out", str(out)]) == 0
    for name, n in (("train.txt", 192), ("val.txt", 96)):  # a slice keeps the test to seconds
        lines = (out / name).read_text().splitlines()
        (out / f"small_{name}").write_text("\n".join(lines[:n + 1]) + "\n")
    run = tmp_path / "run"
    args = ["--dataset", "fairface_smoke", "--checkpoint_dir", str(run), "--log_file", str(run / "log.csv"),
            "--train_txt", str(out / "small_train.txt"), "--val_txt", str(out / "small_val.txt"),
            "--arch", "torchvision:mobilenet_v2", "--pretrained", str(shared_dir / "weights/mobilenet_v2-b0353104.pth"),
            "--image_size", "64", "--batch_size", "32", "--num_epochs", "1", "--workers", "2"]
    assert train_main(args) == 0
    text = capsys.readouterr().out
    for name in ("Asian", "Black", "Indian", "White", "Latino_Hispanic"):
        assert re.search(rf"^ - {name}_accuracy: (\d+\.\d\d%|n/a.*)$", text, re.M), name
    ckpt = torch.load(run / "best.pt", weights_only=True)
    assert ckpt["taxonomy"] == {"name": "seed5", "classes": ["Asian", "Black", "Indian", "White", "Latino_Hispanic"]}
    assert len(read_log(run / "log.csv")) == 1


def test_linear_probe_head_init_starts_from_a_logistic_regression_on_the_pretrained_features(manifests, tmp_path,
                                                                                              caplog):
    """--head_init linear_probe (LP-FT): the race layer starts as the unweighted last-layer refit of the
    pretrained backbone (the same fit `rebalance --balance none` makes), the backbone as pretrained; lr 0
    keeps both where they started. Not with --initial_checkpoint, which brings its own layer."""
    import numpy as np

    from race_classifier.data.manifest import read_manifest
    from race_classifier.models.factory import create_model
    from race_classifier.post_training.rebalance import extract_features, fit_race_layer
    pretrained = create_model(ARCH, 4)
    torch.save(pretrained.state_dict(), tmp_path / "pretrained.pth")
    run = tmp_path / "lpft"
    args = train_args(manifests, run, "--num_epochs", "1", "--learning_rate", "0", "--warmup_epochs", "0",
                      "--weight_decay", "0", "--pretrained", str(tmp_path / "pretrained.pth"),
                      "--head_init", "linear_probe")
    with caplog.at_level("INFO"):
        assert train_main(args) == 0
    assert "--head_init linear_probe: race layer fitted on the frozen features of" in caplog.text
    after = load_model(run / "best.pt")
    train = read_manifest(manifests / "train.txt", after.taxonomy)
    # In batches of 8 as the run extracted them: on 48 faces and 1,024 random features the regression is
    # ill-conditioned, so features a few ulps apart (another batch size) would fit visibly other weights.
    features = extract_features(pretrained, train, after.preprocessing, batch_size=8, workers=0)
    weight, bias = fit_race_layer(features, train, "none", 4)
    classifier = after.model.get_classifier()
    assert np.allclose(classifier.weight.detach().numpy(), weight, rtol=1e-4, atol=1e-3)
    assert np.allclose(classifier.bias.detach().numpy(), bias, rtol=1e-4, atol=1e-3)
    assert not np.allclose(weight, pretrained.get_classifier().weight.detach().numpy(), atol=1e-3)
    for name, p in after.model.named_parameters():
        if not name.startswith("classifier."):
            assert torch.equal(p, pretrained.state_dict()[name]), name
    assert "the race layer started as a linear probe" in (run / "MODEL_CARD.md").read_text()

    conflicting = train_args(manifests, tmp_path / "both", "--num_epochs", "1", "--head_init", "linear_probe",
                             "--initial_checkpoint", str(run / "best.pt"))
    assert train_main(conflicting) == 2
    assert "not with --initial_checkpoint" in caplog.text
