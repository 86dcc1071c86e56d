"""One training epoch and one evaluation pass. Unreadable images arrive as batch failures and are
recorded, never raised."""
from __future__ import annotations

import contextlib
import logging
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch
from torch import nn
from tqdm import tqdm

from race_classifier.evaluation.metrics import summarize
from race_classifier.heads import HeadLayout

log = logging.getLogger("race_classifier.train")
LOG_EVERY = 50  # batches between progress lines when no terminal shows a progress bar


@dataclass
class EpochProgress:
    """Running sums of a training epoch; saved mid-epoch so a resumed epoch reports whole-epoch figures.
    ``correct``/``labelled``: per head (race first), right answers and samples labelled for that head."""
    batches: int = 0
    loss_sum: float = 0.0
    seen: int = 0
    correct: list[int] = field(default_factory=lambda: [0])
    labelled: list[int] = field(default_factory=lambda: [0])
    failures: dict[int, str] = field(default_factory=dict)

    def accuracy(self, head: int = 0) -> float | None:
        return self.correct[head] / self.labelled[head] if self.labelled[head] else None

    def to_dict(self) -> dict:
        return {"batches": self.batches, "loss_sum": self.loss_sum, "seen": self.seen, "correct": list(self.correct),
                "labelled": list(self.labelled), "failures": {int(k): v for k, v in self.failures.items()}}

    @classmethod
    def from_dict(cls, d: dict) -> "EpochProgress":
        correct, labelled = d["correct"], d.get("labelled", d["seen"])
        if isinstance(correct, int):  # saved before heads existed: race only
            correct, labelled = [correct], [labelled]
        return cls(d["batches"], d["loss_sum"], d["seen"], list(correct), list(labelled),
                   {int(k): v for k, v in d["failures"].items()})

    @classmethod
    def empty(cls, num_heads: int, batches: int = 0) -> "EpochProgress":
        return cls(batches, correct=[0] * num_heads, labelled=[0] * num_heads)


class MultiHeadLoss(nn.Module):
    """The sum over heads of each head's cross-entropy on the samples labelled for it (target -1: that head
    is not trained on that sample). With the race head alone it is plain cross-entropy."""

    def __init__(self, slices: list[slice], race_weights: torch.Tensor | None = None, label_smoothing: float = 0.0):
        super().__init__()
        self.slices = slices
        self.losses = nn.ModuleList(
            nn.CrossEntropyLoss(weight=race_weights if i == 0 else None, ignore_index=-1,
                                label_smoothing=label_smoothing) for i in range(len(slices)))

    def forward(self, logits: torch.Tensor, targets: torch.Tensor,
                soft_race: torch.Tensor | None = None) -> torch.Tensor:
        """``soft_race``: (N, race classes) target distributions (mixup/cutmix) replacing the race labels."""
        total = logits.new_zeros(())
        for i, (s, loss) in enumerate(zip(self.slices, self.losses)):
            if i == 0 and soft_race is not None:
                total = total + nn.functional.cross_entropy(logits[:, s].float(), soft_race)  # class probabilities
            elif (targets[:, i] >= 0).any():  # all-unlabelled would be 0/0
                total = total + loss(logits[:, s].float(), targets[:, i])
        return total


def count_correct(logits: torch.Tensor, targets: torch.Tensor, slices: list[slice]) -> tuple[list[int], list[int]]:
    """Per head: right answers and labelled samples."""
    correct, labelled = [], []
    for i, s in enumerate(slices):
        known = targets[:, i] >= 0
        correct.append(int((logits[known][:, s].argmax(1) == targets[known, i]).sum()))
        labelled.append(int(known.sum()))
    return correct, labelled


def autocast(device: torch.device, dtype: torch.dtype | None):
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=dtype)


def train_one_epoch(model: nn.Module, loader, criterion: nn.Module, optimizer: torch.optim.Optimizer,
                    scheduler, scaler: torch.amp.GradScaler, device: torch.device, amp_dtype: torch.dtype | None,
                    progress: EpochProgress, global_step: int, desc: str = "train",
                    on_step: Callable[[int], None] | None = None, show: bool = True,
                    memory_format: torch.memory_format = torch.contiguous_format, accum_steps: int = 1,
                    mix: Callable | None = None, teacher: Callable | None = None) -> int:
    """Train over ``loader`` (already positioned past ``progress.batches``); returns the new global step.
    ``show``: a progress bar (or, off a terminal, progress log lines).

    Gradient accumulation: the epoch's batches form groups of ``accum_steps``, counted from the epoch's start
    (a resumed epoch keeps its groups); each group's losses are scaled by 1/its size and its gradients summed,
    then the optimizer steps once (the epoch's last group may be shorter and steps too). ``global_step`` and
    ``on_step`` count optimizer steps, and ``on_step`` runs only after one, when no gradient is pending: a
    checkpoint written there resumes exactly. Under DDP the non-final batches of a group skip the all-reduce.
    ``mix(images, race targets, batch=number)`` (mixing.BatchMixer with its epoch bound): mixed images and
    soft race targets to train on; the epoch's training accuracy is still counted against the unmixed labels.
    ``teacher(race targets, dataset indices)`` (distill.TeacherTargets): soft race targets to train on (then mixed
    by ``mix``, if given)."""
    model.train()
    quiet = not sys.stderr.isatty()  # tqdm hides itself then; a log line every LOG_EVERY batches instead
    started, seen_before, total = time.time(), progress.seen, progress.batches + len(loader)
    optimizer.zero_grad(set_to_none=True)
    pending = False  # gradients accumulated since the last optimizer step
    for batch in tqdm(loader, desc=desc, leave=False, disable=None if show else True, unit="batch"):
        progress.failures.update(batch["failures"])
        progress.batches += 1
        group_size, ends_group = _accumulation_group(progress.batches, total, accum_steps)
        if show and quiet and progress.batches % LOG_EVERY == 0 and progress.seen:
            rate = (progress.seen - seen_before) / max(time.time() - started, 1e-9)
            log.info("%s: batch %d/%d, loss %.4f, %.1f images/s", desc, progress.batches, total,
                     progress.loss_sum / progress.seen, rate)
        if batch["images"] is not None:
            images = batch["images"].to(device, non_blocking=True, memory_format=memory_format)
            targets = batch["targets"].to(device, non_blocking=True)
            soft_race = teacher(targets[:, 0], batch["indices"]) if teacher is not None else None
            if mix is not None:
                images, soft_race = mix(images, targets[:, 0], soft_race, batch=progress.batches)
            with _gradient_sync(model, ends_group):
                with autocast(device, amp_dtype):
                    logits = model(images)
                    loss = criterion(logits, targets, soft_race)
                scaler.scale(loss / group_size).backward()
            pending = True
            progress.loss_sum += loss.item() * len(targets)
            progress.seen += len(targets)
            correct, labelled = count_correct(logits.detach(), targets, criterion.slices)
            progress.correct = [a + b for a, b in zip(progress.correct, correct)]
            progress.labelled = [a + b for a, b in zip(progress.labelled, labelled)]
        if ends_group and pending:
            scheduler.step_update(global_step)
            scaler.step(optimizer)
            scaler.update()
            optimizer.zero_grad(set_to_none=True)
            pending = False
            global_step += 1
            if on_step is not None:
                on_step(global_step)
    return global_step


def _accumulation_group(batch_number: int, total: int, accum_steps: int) -> tuple[int, bool]:
    """(size of the accumulation group holding the epoch's ``batch_number``-th batch, counted from 1, and
    whether that batch ends it)."""
    group_start = (batch_number - 1) // accum_steps * accum_steps
    group_size = min(accum_steps, total - group_start)
    return group_size, batch_number == group_start + group_size


def _gradient_sync(model: nn.Module, sync: bool):
    """DDP's no_sync() unless ``sync``: the gradients of a group's non-final batches stay local, and the last
    backward all-reduces their sum once. A plain model has nothing to sync."""
    no_sync = getattr(model, "no_sync", None)  # DDP, or a compiled DDP (which forwards attributes)
    return contextlib.nullcontext() if sync or no_sync is None else no_sync()


@torch.no_grad()
def evaluate(model: nn.Module, loader, device: torch.device, amp_dtype: torch.dtype | None,
             heads: HeadLayout, desc: str = "val",
             memory_format: torch.memory_format = torch.contiguous_format,
             sources: Sequence[str] | None = None) -> dict:
    """Race accuracy and per-class accuracy over ``loader`` (summarize's keys), ``loss`` (the sum over heads
    of each head's mean plain cross-entropy), and ``heads``: the same summary for every other head.
    ``sources`` (each dataset item's source, in a mix): ``sources`` in the result is the race accuracy per
    source, over its readable, race-labelled images (None for a source with none)."""
    model.eval()
    slices = list(heads.slices().values())
    all_logits, all_targets, all_indices, failures = [], [], [], {}
    for batch in tqdm(loader, desc=desc, leave=False, disable=None, unit="batch"):
        failures.update(batch["failures"])
        if batch["images"] is None:
            continue
        images = batch["images"].to(device, memory_format=memory_format)
        with autocast(device, amp_dtype):
            all_logits.append(model(images).float().cpu())
        all_targets.append(batch["targets"])
        all_indices.append(batch["indices"])
    logits = torch.cat(all_logits) if all_logits else torch.zeros(0, heads.num_outputs)
    targets = torch.cat(all_targets) if all_targets else torch.zeros(0, len(slices), dtype=torch.long)
    summaries, loss = [], 0.0
    for i, (head, s) in enumerate(zip(heads.heads, slices)):
        known = targets[:, i] >= 0
        y_true, head_logits = targets[known, i], logits[known][:, s]
        summaries.append(summarize(y_true.tolist(), head_logits.argmax(1).tolist(), len(head.classes)))
        if known.any():  # a head no validation image is labelled for adds nothing (a NaN would end best.pt)
            loss += nn.functional.cross_entropy(head_logits, y_true).item()
    result = summaries[0]
    result["loss"] = loss if len(targets) else float("nan")
    result["heads"] = {head.name: summary for head, summary in zip(heads.extra, summaries[1:])}
    result["failures"] = failures
    if sources is not None:
        indices = torch.cat(all_indices) if all_indices else torch.zeros(0, dtype=torch.long)
        result["sources"] = _accuracy_by_source(logits[:, slices[0]].argmax(1), targets[:, 0], indices, sources)
    return result


def _accuracy_by_source(predicted: torch.Tensor, truth: torch.Tensor, indices: torch.Tensor,
                        sources: Sequence[str]) -> dict[str, float | None]:
    names = list(dict.fromkeys(s for s in sources if s))
    right, count = dict.fromkeys(names, 0), dict.fromkeys(names, 0)
    for p, y, i in zip(predicted.tolist(), truth.tolist(), indices.tolist()):
        if y >= 0 and sources[i]:
            right[sources[i]] += p == y
            count[sources[i]] += 1
    return {n: right[n] / count[n] if count[n] else None for n in names}
