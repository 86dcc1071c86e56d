"""Seeding and the random-number state a resumed run restores, in types weights_only loading accepts."""
from __future__ import annotations

import contextlib
import random

import numpy as np
import torch


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def epoch_seed(seed: int, epoch: int, rank: int = 0) -> int:
    """The seed the global generators get at the start of epoch ``epoch`` (0-based) on ``rank``.

    Reseeding every epoch makes the random draws of training (dropout) a function of (seed, epoch, rank, step)
    alone: nothing drawn before the epoch (validation, a DataLoader starting its iteration, the number of
    worker processes, a resume) carries into it."""
    return int(np.random.SeedSequence([seed % 2**32, epoch, rank]).generate_state(1)[0])


@contextlib.contextmanager
def seeded(seed: int):
    """Python's, numpy's and torch's CPU generators seeded with ``seed`` inside the block and put back after it.

    A training image's augmentation runs in here with its own seed, so it is the same in whichever process
    draws it (the main one, any worker, a persistent one), and the caller's random stream (dropout in the
    main process with --workers 0) is not disturbed. CUDA generators are left alone."""
    saved = random.getstate(), np.random.get_state(), torch.get_rng_state()
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.default_generator.manual_seed(seed)
    try:
        yield
    finally:
        random.setstate(saved[0])
        np.random.set_state(saved[1])
        torch.set_rng_state(saved[2])


def seed_worker(worker_id: int) -> None:
    """DataLoader workers: derive numpy's and Python's seeds from the worker's torch seed."""
    seed = torch.initial_seed() % 2**32
    np.random.seed(seed)
    random.seed(seed)


def get_rng_state() -> dict:
    np_state = np.random.get_state(legacy=False)
    return {
        "python": random.getstate(),
        "numpy": {"key": np_state["state"]["key"].tolist(), "pos": int(np_state["state"]["pos"]),
                  "has_gauss": int(np_state["has_gauss"]), "gauss": float(np_state["gauss"])},
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
    }


def set_rng_state(state: dict) -> None:
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    n = state["numpy"]
    np.random.set_state({"bit_generator": "MT19937", "state": {"key": np.array(n["key"], dtype=np.uint32), "pos": n["pos"]},
                         "has_gauss": n["has_gauss"], "gauss": n["gauss"]})
    torch.set_rng_state(state["torch"])
    if state["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
