"""Data-parallel training under torchrun: sharded sampling, and 2 Gloo processes scoring as 1 process."""
from __future__ import annotations

import csv
import os
import subprocess
import sys

import pytest
import torch

from race_classifier.data.sampler import EpochSampler, class_balanced_weights
from race_classifier.training.train import main as train_main

from conftest import REPO, train_args


@pytest.mark.parametrize("n, world", [(48, 2), (11, 3), (2, 4)])
@pytest.mark.parametrize("weighted", [False, True])
def test_rank_shards_are_disjoint_and_cover_the_epoch_order(n, world, weighted):
    weights = class_balanced_weights([i % 3 for i in range(n)], 3) if weighted else None
    samplers = [EpochSampler(n, seed=5, weights=weights, rank=r, world_size=world) for r in range(world)]
    for s in samplers:
        s.set_epoch(2)
    single = EpochSampler(n, seed=5, weights=weights)
    single.set_epoch(2)
    order = single.order()
    shards = [list(s) for s in samplers]
    assert len({len(s) for s in shards}) == 1 and all(len(s) == len(x) for s, x in zip(samplers, shards))
    # Position k of rank r is slot k * world + r of the epoch's order (padded by repeating its head).
    padded = (order * world)[:len(shards[0]) * world]
    assert [shards[k % world][k // world] for k in range(len(padded))] == padded
    assert padded[:n] == order  # every slot of the order is on exactly one rank
    # Resuming mid-epoch skips positions of the rank's own shard.
    samplers[1].set_epoch(2, start=1)
    assert list(samplers[1]) == shards[1][1:] and len(samplers[1]) == len(shards[1]) - 1


def test_one_rank_is_the_plain_sampler():
    a, b = EpochSampler(30, seed=2), EpochSampler(30, seed=2, rank=0, world_size=1)
    a.set_epoch(1, start=3), b.set_epoch(1, start=3)
    assert list(a) == list(b) == a.order()[3:]
    with pytest.raises(ValueError):
        EpochSampler(30, rank=2, world_size=2)


def _rows(path) -> list[dict]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


# GroupNorm, not BatchNorm (whose batch statistics are per process, and SyncBatchNorm is CUDA-only), and no
# random augmentation: two processes of 4 images then take the same steps as one process of 8.
SAME_STEPS = ("--arch", "test_efficientnet_gn", "--hflip", "0", "--scale_min", "1", "--color_jitter", "0",
              "--num_epochs", "1")


def test_two_gloo_processes_score_as_one(manifests, tmp_path):
    single = tmp_path / "single"
    assert train_main(train_args(manifests, single, *SAME_STEPS, "--batch_size", "8")) == 0

    run = tmp_path / "ddp"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    env.pop("WORLD_SIZE", None)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           str(REPO / "train.py"), *train_args(manifests, run, *SAME_STEPS, "--batch_size", "4", "--device", "cpu")]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=REPO, timeout=180)
    assert proc.returncode == 0, proc.stderr[-3000:]

    # Rank 0 alone reports: one header, one epoch line, one card.
    assert proc.stdout.count("Training smoke") == 1 and "x 2 processes" in proc.stdout
    assert proc.stdout.count("Epoch 1/1 |") == 1 and proc.stdout.count("Model card:") == 1
    with open(run / "log.csv") as f:
        assert f.read().count("epoch,train_loss") == 1
    got, want = _rows(run / "log.csv"), _rows(single / "log.csv")
    assert len(got) == 1
    for key, value in want[0].items():
        if key == "epoch_time_s":
            continue
        if key.endswith("loss") or key == "lr":
            assert float(got[0][key]) == pytest.approx(float(value), rel=1e-3), key
        else:
            assert got[0][key] == value, key
    # The checkpoint holds the unwrapped model's weights: loadable as a single process's.
    ckpt = torch.load(run / "best.pt", weights_only=True)
    assert not any(k.startswith("module.") for k in ckpt["state_dict"])
    assert sorted(p.name for p in run.iterdir()) == sorted(p.name for p in single.iterdir())
