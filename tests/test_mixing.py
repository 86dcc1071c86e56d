"""Mixup / CutMix: what a mixed batch is (images and soft labels), that each batch's draw is its own seed's,
and that runs with gender/age heads refuse it."""
from __future__ import annotations

import numpy as np
import torch

from race_classifier.training.mixing import BatchMixer
from race_classifier.training.train import main as train_main

from conftest import train_args


def batch(n: int = 4):
    return torch.rand(n, 3, 8, 8, generator=torch.Generator().manual_seed(n)), torch.arange(n) % 4


def test_mixup_blends_each_image_with_its_mirror_in_the_batch_and_their_labels_alike():
    images, targets = batch()
    mixed, soft = BatchMixer(0.4, 0.0, 1.0, 4, 0.0, seed=0)(images.clone(), targets, epoch=0, batch=1)
    lam = float(soft[0, targets[0]])
    assert 0 < lam < 1
    torch.testing.assert_close(mixed, lam * images + (1 - lam) * images.flip(0))
    onehot = torch.eye(4)[targets]
    torch.testing.assert_close(soft, lam * onehot + (1 - lam) * onehot.flip(0))


def test_cutmix_pastes_one_box_of_the_mirror_and_weights_labels_by_its_area():
    images, targets = batch()
    mixed, soft = BatchMixer(0.0, 1.0, 1.0, 4, 0.1, seed=0)(images.clone(), targets, epoch=0, batch=2)
    pasted = (mixed != images).any(dim=1)[0]  # pixels of image 0 that came from image 3
    assert torch.equal(mixed[:, :, pasted], images.flip(0)[:, :, pasted])
    rows, cols = pasted.any(1).nonzero().flatten(), pasted.any(0).nonzero().flatten()
    assert pasted[rows.min():rows.max() + 1, cols.min():cols.max() + 1].all()  # one box
    lam = 1 - pasted.float().mean().item()
    smooth = torch.full((4, 4), 0.1 / 4) + 0.9 * torch.eye(4)[targets]  # label smoothing 0.1
    torch.testing.assert_close(soft, lam * smooth + (1 - lam) * smooth.flip(0))


def test_each_batch_draws_from_its_own_seed_and_odd_batches_stay_whole():
    images, targets = batch()
    mixer = BatchMixer(0.4, 1.0, 1.0, 4, 0.0, seed=3)
    np.random.seed(1)
    first = mixer(images.clone(), targets, epoch=2, batch=7)
    state = np.random.get_state()[1].copy()
    np.random.seed(99)
    again = mixer(images.clone(), targets, epoch=2, batch=7)
    assert all(torch.equal(a, b) for a, b in zip(first, again))
    np.random.seed(1)
    mixer(images.clone(), targets, epoch=2, batch=7)
    assert np.array_equal(np.random.get_state()[1], state)  # the caller's generator is left as it was
    assert not torch.equal(mixer(images.clone(), targets, epoch=2, batch=8)[1], first[1])

    odd_images, odd_targets = batch(5)
    out, soft = mixer(odd_images.clone(), odd_targets, epoch=0, batch=1)
    assert torch.equal(out, odd_images) and torch.equal(soft, torch.eye(4)[odd_targets])


def test_training_with_mixing_and_its_refusal_with_other_heads(manifests, multitask_manifests, tmp_path, caplog):
    assert train_main(train_args(manifests, tmp_path / "mixed", "--num_epochs", "1", "--cutmix", "1.0",
                                 "--mixup", "0.2")) == 0
    assert train_main(train_args(multitask_manifests, tmp_path / "heads", "--num_epochs", "1", "--mixup", "0.2",
                                 "--heads", "race,gender")) == 2
    assert "mix race labels only" in caplog.text
