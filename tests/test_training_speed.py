"""Training-speed options that must not change the numbers: gradient accumulation (--accum_steps), one
persistent training DataLoader whose augmentation is seeded per image (--workers, --persistent_workers),
and --compile's clear refusal where torch.compile cannot work."""
from __future__ import annotations

import csv
import random
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from race_classifier.data.dataset import FaceDataset
from race_classifier.data.manifest import read_manifest
from race_classifier.data.sampler import EpochSampler, SeededEpochSampler, class_balanced_weights
from race_classifier.data.transforms import Augmentation, Preprocessing, build_transform
from race_classifier.labels import get_taxonomy
from race_classifier.training import accel
from race_classifier.training.engine import EpochProgress, MultiHeadLoss, train_one_epoch
from race_classifier.training.train import Trainer
from race_classifier.training.train import main as train_main

from conftest import train_args

# GroupNorm (no batch statistics) and no random augmentation: 2 batches of 8 then give the gradient of 1 of 16.
NO_BATCH_STATS = ("--arch", "test_efficientnet_gn", "--hflip", "0", "--scale_min", "1", "--color_jitter", "0")


def read_log(path: Path) -> list[dict]:
    with open(path, newline="") as f:
        return [{k: v for k, v in row.items() if k != "epoch_time_s"} for row in csv.DictReader(f)]


def weights(run: Path) -> dict[str, torch.Tensor]:
    return torch.load(run / "last.pt", weights_only=True)["state_dict"]


def train_images(manifests: Path) -> int:
    return len(read_manifest(manifests / "train.txt", get_taxonomy(str(manifests / "classes.txt"))))


# -- gradient accumulation ---------------------------------------------------------------------------

def test_two_batches_of_8_accumulated_train_as_one_batch_of_16(manifests, tmp_path, one_thread):
    assert train_images(manifests) % 16 == 0  # no partial group: both runs see the same images per step
    big, accumulated = tmp_path / "b16", tmp_path / "b8x2"
    assert train_main(train_args(manifests, big, *NO_BATCH_STATS, "--num_epochs", "1", "--batch_size", "16")) == 0
    assert train_main(train_args(manifests, accumulated, *NO_BATCH_STATS, "--num_epochs", "1",
                                 "--batch_size", "8", "--accum_steps", "2")) == 0
    want, got = weights(big), weights(accumulated)
    assert want.keys() == got.keys()
    for name in want:
        assert torch.allclose(got[name].float(), want[name].float(), rtol=1e-4, atol=1e-6), name
    # The schedule counted optimizer steps: same learning rate at the end, same training loss.
    (row_big,), (row_acc,) = read_log(big / "log.csv"), read_log(accumulated / "log.csv")
    assert float(row_acc["lr"]) == pytest.approx(float(row_big["lr"]), rel=1e-9)
    assert float(row_acc["train_loss"]) == pytest.approx(float(row_big["train_loss"]), rel=1e-4)


def _sgd_epoch(batches: list[tuple[torch.Tensor, torch.Tensor]], accum_steps: int) -> torch.nn.Linear:
    """A linear model trained by plain SGD (whose step, unlike Adam's, scales with the gradient) for an epoch."""
    torch.manual_seed(0)
    model = torch.nn.Linear(4, 3)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.5)
    loader = [{"images": x, "targets": y[:, None], "failures": []} for x, y in batches]
    steps = train_one_epoch(model, loader, MultiHeadLoss([slice(0, 3)]), optimizer,
                            SimpleNamespace(step_update=lambda step: None), torch.amp.GradScaler("cpu", enabled=False),
                            torch.device("cpu"), None, EpochProgress.empty(1), 0, show=False,
                            accum_steps=accum_steps)
    assert steps == -(-len(batches) // accum_steps)
    return model


def test_accumulated_gradient_is_the_mean_over_the_group():
    g = torch.Generator().manual_seed(1)
    x, y = torch.randn(40, 4, generator=g), torch.randint(0, 3, (40,), generator=g)
    eights = [(x[i:i + 8], y[i:i + 8]) for i in range(0, len(x), 8)]
    # 5 batches of 8 in groups of 2: (16, 16, 8): the last, short group is the mean over its one batch.
    want = _sgd_epoch([(x[:16], y[:16]), (x[16:32], y[16:32]), (x[32:], y[32:])], accum_steps=1)
    got = _sgd_epoch(eights, accum_steps=2)
    assert torch.allclose(got.weight, want.weight, atol=1e-6) and torch.allclose(got.bias, want.bias, atol=1e-6)
    assert not torch.allclose(_sgd_epoch(eights, accum_steps=1).weight, want.weight, atol=1e-3)


def test_the_epochs_last_short_group_steps_too(manifests, tmp_path):
    """6 batches in groups of 4: a group of 4 and one of 2, so 2 optimizer steps an epoch, 4 over 2 epochs."""
    n = train_images(manifests)
    assert n // 8 == 6
    run = tmp_path / "run"
    steps = []
    original = Trainer.save_last

    def record(self, epoch, in_progress):
        steps.append((self.global_step, self.progress.batches, in_progress))
        original(self, epoch, in_progress)

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(Trainer, "save_last", record)
        assert train_main(train_args(manifests, run, "--num_epochs", "2", "--accum_steps", "4",
                                     "--save_every_steps", "1")) == 0
    # Mid-epoch checkpoints only where a group has just stepped (no gradient pending): batches 4 and 6.
    mid_epoch = [(step, batches) for step, batches, in_progress in steps if in_progress]
    assert mid_epoch == [(1, 4), (2, 6), (3, 4), (4, 6)]
    assert torch.load(run / "last.pt", weights_only=True)["resume"]["global_step"] == 4


class Interrupted(BaseException):
    """Stands for SIGKILL right after a mid-epoch checkpoint (BaseException: nothing on the way catches it)."""


def test_resume_mid_epoch_with_accumulation_matches_an_uninterrupted_run(manifests, tmp_path, one_thread):
    reference = tmp_path / "reference"
    options = ("--num_epochs", "3", "--accum_steps", "4", "--save_every_steps", "1")
    assert train_main(train_args(manifests, reference, *options)) == 0

    run = tmp_path / "killed"
    original = Trainer.save_last

    def die_in_epoch_2(self, epoch, in_progress):
        original(self, epoch, in_progress)
        if epoch == 1 and in_progress and self.progress.batches == 4:
            raise Interrupted

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(Trainer, "save_last", die_in_epoch_2)
        with pytest.raises(Interrupted):
            train_main(train_args(manifests, run, *options))
    resume = torch.load(run / "last.pt", weights_only=True)["resume"]
    assert (resume["epoch"], resume["progress"]["batches"], resume["accum_steps"]) == (1, 4, 4)

    # Another --accum_steps would regroup the epoch's remaining batches: refused, with the reason.
    assert train_main(train_args(manifests, run, *options[:2], "--accum_steps", "2", "--resume")) == 2
    assert train_main(train_args(manifests, run, *options, "--resume")) == 0
    got, want = read_log(run / "log.csv"), read_log(reference / "log.csv")
    assert [r["epoch"] for r in got] == ["1", "2", "3"]
    for row_got, row_want in zip(got, want):
        for key in row_want:
            assert float(row_got[key]) == pytest.approx(float(row_want[key]), rel=1e-4, abs=1e-6), key
    for name, tensor in weights(reference).items():
        assert torch.allclose(weights(run)[name].float(), tensor.float(), rtol=1e-4, atol=1e-6), name


# -- augmentation seeded per image; one persistent loader ------------------------------------------------

@pytest.mark.parametrize("weighted", [False, True])
def test_seeded_sampler_keys_follow_the_order_and_do_not_depend_on_world_size(weighted):
    n = 11
    w = class_balanced_weights([i % 3 for i in range(n)], 3) if weighted else None
    single = SeededEpochSampler(n, seed=5, weights=w)
    single.set_epoch(2)
    plain = EpochSampler(n, seed=5, weights=w)
    plain.set_epoch(2)
    keys = list(single)
    assert [index for index, _ in keys] == plain.order()
    assert len({seed for _, seed in keys}) == n  # a seed per slot, even where an image is drawn twice
    # Two ranks: slot k * 2 + r of the same keys, so each image is augmented as in one process.
    ranks = [SeededEpochSampler(n, seed=5, weights=w, rank=r, world_size=2) for r in range(2)]
    for r in ranks:
        r.set_epoch(2)
    assert [list(ranks[k % 2])[k // 2] for k in range(n)] == keys
    single.set_epoch(2, start=4)
    assert list(single) == keys[4:]
    single.set_epoch(3)
    assert [seed for _, seed in single] != [seed for _, seed in keys]


def test_a_seeded_item_is_augmented_the_same_whatever_the_global_rng(manifests):
    samples = read_manifest(manifests / "train.txt", get_taxonomy(str(manifests / "classes.txt")))
    transform = build_transform(Preprocessing(image_size=32), True, Augmentation(hflip=0.5, scale=(0.5, 1.0)))
    dataset = FaceDataset(samples, transform)
    torch.manual_seed(1)
    random.seed(1)
    first = dataset[(3, 12345)]["image"]
    torch.manual_seed(2)
    random.seed(2)
    state = torch.get_rng_state(), random.getstate()
    assert torch.equal(dataset[(3, 12345)]["image"], first)
    assert torch.equal(torch.get_rng_state(), state[0]) and random.getstate() == state[1]  # left as it was
    assert not torch.equal(dataset[(3, 54321)]["image"], first)


def test_two_persistent_workers_give_the_figures_of_no_workers(manifests, tmp_path, one_thread):
    """Augmentation on (the defaults): the images each step sees do not depend on the loader's processes."""
    runs = {}
    for workers in ("0", "2"):
        run = tmp_path / f"workers{workers}"
        assert train_main(train_args(manifests, run, "--num_epochs", "2", "--workers", workers)) == 0
        runs[workers] = read_log(run / "log.csv")
    assert len(runs["0"]) == 2 and runs["2"] == runs["0"]


def test_persistent_workers_default_on_with_workers(manifests, tmp_path):
    from race_classifier.training.config import parse_args
    base = train_args(manifests, tmp_path / "r")
    assert parse_args(base).persistent_workers is False  # train_args uses --workers 0
    assert parse_args([*base, "--workers", "2"]).persistent_workers is True
    assert parse_args([*base, "--workers", "2", "--no-persistent_workers"]).persistent_workers is False
    for bad in (("--accum_steps", "0"), ("--workers", "-1"), ("--save_every_steps", "-2")):
        with pytest.raises(SystemExit):
            parse_args([*base, *bad])


# -- --compile ------------------------------------------------------------------------------------------

def test_compile_without_a_cpp_compiler_is_one_clear_error(manifests, tmp_path, monkeypatch, caplog):
    monkeypatch.delenv("CXX", raising=False)
    monkeypatch.setattr(accel.shutil, "which", lambda name: None)
    assert train_main(train_args(manifests, tmp_path / "run", "--num_epochs", "1", "--compile")) == 2
    assert "--compile: torch.compile on a CPU needs a C++ compiler" in caplog.text
    assert "Traceback" not in caplog.text
