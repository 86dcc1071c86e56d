"""One training epoch and one evaluation pass. Unreadable images arrive as batch failures and are
recorded, never raised."""
from __future__ import annotations

import contextlib
import logging
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import nn
from tqdm import tqdm

from race_classifier.evaluation.metrics import summarize

log = logging.getLogger("race_classifier.train")
LOG_EVERY = 50  # batches between progress lines when no terminal shows a progress bar


@dataclass
class EpochProgress:
    """Running sums of a training epoch; saved mid-epoch so a resumed epoch reports whole-epoch figures."""
    batches: int = 0
    loss_sum: float = 0.0
    correct: int = 0
    seen: int = 0
    failures: dict[int, str] = field(default_factory=dict)

    def to_dict(self) -> dict:
        return {"batches": self.batches, "loss_sum": self.loss_sum, "correct": self.correct, "seen": self.seen,
                "failures": {int(k): v for k, v in self.failures.items()}}

    @classmethod
    def from_dict(cls, d: dict) -> "EpochProgress":
        return cls(d["batches"], d["loss_sum"], d["correct"], d["seen"], {int(k): v for k, v in d["failures"].items()})


def autocast(device: torch.device, dtype: torch.dtype | None):
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=dtype)


def train_one_epoch(model: nn.Module, loader, criterion: nn.Module, optimizer: torch.optim.Optimizer,
                    scheduler, scaler: torch.amp.GradScaler, device: torch.device, amp_dtype: torch.dtype | None,
                    progress: EpochProgress, global_step: int, desc: str = "train",
                    on_step: Callable[[int], None] | None = None, show: bool = True) -> int:
    """Train over ``loader`` (already positioned past ``progress.batches``); returns the new global step.
    ``show``: a progress bar (or, off a terminal, progress log lines)."""
    model.train()
    quiet = not sys.stderr.isatty()  # tqdm hides itself then; a log line every LOG_EVERY batches instead
    started, seen_before, total = time.time(), progress.seen, progress.batches + len(loader)
    for batch in tqdm(loader, desc=desc, leave=False, disable=None if show else True, unit="batch"):
        progress.failures.update(batch["failures"])
        progress.batches += 1
        if show and quiet and progress.batches % LOG_EVERY == 0 and progress.seen:
            rate = (progress.seen - seen_before) / max(time.time() - started, 1e-9)
            log.info("%s: batch %d/%d, loss %.4f, %.1f images/s", desc, progress.batches, total,
                     progress.loss_sum / progress.seen, rate)
        if batch["images"] is not None:
            images = batch["images"].to(device, non_blocking=True)
            labels = batch["labels"].to(device, non_blocking=True)
            scheduler.step_update(global_step)
            with autocast(device, amp_dtype):
                logits = model(images)
                loss = criterion(logits, labels)
            optimizer.zero_grad(set_to_none=True)
            scaler.scale(loss).backward()
            scaler.step(optimizer)
            scaler.update()
            global_step += 1
            progress.loss_sum += loss.item() * len(labels)
            progress.correct += int((logits.argmax(1) == labels).sum())
            progress.seen += len(labels)
        if on_step is not None:
            on_step(global_step)
    return global_step


@torch.no_grad()
def evaluate(model: nn.Module, loader, device: torch.device, amp_dtype: torch.dtype | None,
             num_classes: int, desc: str = "val") -> dict:
    """Loss (plain cross-entropy), accuracy and per-class accuracy over ``loader``."""
    model.eval()
    loss_sum, y_true, y_pred, failures = 0.0, [], [], {}
    for batch in tqdm(loader, desc=desc, leave=False, disable=None, unit="batch"):
        failures.update(batch["failures"])
        if batch["images"] is None:
            continue
        images, labels = batch["images"].to(device), batch["labels"].to(device)
        with autocast(device, amp_dtype):
            logits = model(images)
        loss_sum += nn.functional.cross_entropy(logits.float(), labels, reduction="sum").item()
        y_true += labels.tolist()
        y_pred += logits.argmax(1).tolist()
    result = summarize(y_true, y_pred, num_classes)
    result["loss"] = loss_sum / len(y_true) if y_true else float("nan")
    result["failures"] = failures
    return result
