"""best.pt and last.pt of a training run, owned by one object (after timm's CheckpointSaver): which epoch is
best, the order the two files are written in, and whether a checkpoint can be continued by this run.

What a checkpoint holds is the trainer's (its ``write``); where and when it goes, and what a resume must match,
is decided here, so the run's loop does not have to."""
from __future__ import annotations

import math
from collections.abc import Callable
from pathlib import Path

from torch import nn

from race_classifier.heads import HeadLayout
from race_classifier.models.checkpoint import load_checkpoint
from race_classifier.training import TrainingError
from race_classifier.training.distributed import World

# write(path, epoch, metrics, resume, model): one checkpoint file; model None: the trained model itself.
Write = Callable[..., None]


def better(value: float | None, best: float | None, metric: str) -> bool:
    """Whether ``value`` of ``metric`` beats ``best``: val_loss goes down, the accuracies up; an undefined
    value (no readable, labelled validation image) never wins."""
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return False
    if best is None:
        return True
    return value < best if metric == "val_loss" else value > best


class CheckpointSaver:
    def __init__(self, directory: Path, metric: str, write: Write, world: World, *, arch: str,
                 classes: list[str], heads: HeadLayout):
        self.dir, self.metric, self.write, self.world = Path(directory), metric, write, world
        self.last_path, self.best_path = self.dir / "last.pt", self.dir / "best.pt"
        self.arch, self.classes, self.heads = arch, classes, heads  # what every checkpoint of the run holds
        self.best: dict | None = None  # the best epoch's row so far (the one best.pt holds)
        self.latest: dict | None = None  # the last epoch's row (last.pt's metrics)
        self._epochs = self._best_at = 0  # epochs seen; the best one's number among them (0: none yet)

    # -- which epoch is best ---------------------------------------------------------------------

    def observe(self, row: dict) -> bool:
        """Count an epoch's row; True when it is the best so far. The first of equal values stays best."""
        self._epochs, self.latest = self._epochs + 1, row
        if not better(row[self.metric], self.best[self.metric] if self.best else None, self.metric):
            return False
        self.best, self._best_at = row, self._epochs
        return True

    @property
    def epochs_since_best(self) -> int:
        """For --patience: epochs after the best one (all of them while none has been best)."""
        return self._epochs - self._best_at

    # -- the files --------------------------------------------------------------------------------

    def prepare(self, *, resume: bool, overwrite: bool, log_file: Path) -> None:
        """A fresh run starts in a folder without another run's files (they go only with --overwrite);
        --resume needs last.pt."""
        if resume:
            if not self.last_path.is_file():
                raise TrainingError(f"--resume: no {self.last_path} to resume from")
            return
        existing = [p for p in (self.last_path, self.best_path, log_file) if p.is_file() and p.stat().st_size]
        if existing and not overwrite:
            raise TrainingError(f"run files already exist ({', '.join(map(str, existing))}): use --resume to "
                                "continue that run, --overwrite to start afresh, or another --checkpoint_dir")
        if self.world.main:
            for p in existing:
                p.unlink()
            if overwrite:  # the previous run's card and listing must not sit beside this run's files
                (self.dir / "MODEL_CARD.md").unlink(missing_ok=True)
                (self.dir / "skipped_images.txt").unlink(missing_ok=True)
            self.dir.mkdir(parents=True, exist_ok=True)
        self.world.barrier()

    def save_last(self, epoch: int, resume: dict) -> None:
        """last.pt (rank 0's): ``resume`` is the state to continue from at epoch ``epoch`` (0-based, next)."""
        if self.world.main:
            self.write(self.last_path, epoch, self.latest or {}, resume, None)

    def save_epoch(self, row: dict, best_model: nn.Module, save_last: Callable[[], None]) -> None:
        """An epoch's end: best.pt (``best_model``'s weights) when ``row`` is the best, then last.pt
        (``save_last``). In that order: killed in between, last.pt still holds the epoch before, so the
        resumed run redoes this one and writes both; the other order would lose this epoch's best.pt."""
        if self.observe(row) and self.world.main:
            self.write(self.best_path, row["epoch"], row, None, best_model)
        save_last()

    # -- what a checkpoint must match to be continued ------------------------------------------------

    def check_same_model(self, ckpt: dict, path: Path) -> None:
        """A checkpoint this run continues from must have this run's architecture, classes and heads."""
        if ckpt.get("ensemble"):
            raise TrainingError(f"{path} is an ensemble of {len(ckpt['ensemble']['members'])} models: train from "
                                "one of its members")
        merge = ckpt.get("merged_classes")
        if merge:
            raise TrainingError(f"{path} answers in classes merged from its network's "
                                f"({', '.join(merge['from']['classes'])}): train from the model it was made from, "
                                f"{merge.get('source')}")
        if ckpt["arch"] != self.arch or ckpt["taxonomy"]["classes"] != self.classes:
            raise TrainingError(f"{path} was trained as {ckpt['arch']} on {ckpt['taxonomy']['classes']}; "
                                f"this run asks for {self.arch} on {self.classes}")
        saved_heads = HeadLayout.from_dict(ckpt.get("heads"), self.classes)
        if saved_heads != self.heads:
            raise TrainingError(f"{path} has heads {saved_heads.to_dict()}; this run asks for "
                                f"{self.heads.to_dict()} (--heads, --age_bins or the gender classes differ)")

    def load_last(self, args, soft_labels_sha256: str | None) -> dict:
        """last.pt, once it is known this run can continue it: the same model, and the options that change
        what the remaining steps compute (a mid-epoch position is per rank and per --accum_steps group; the
        weight average and the soft labels are part of the recipe). Its history's best becomes the best."""
        path = self.last_path
        ckpt = load_checkpoint(path)
        self.check_same_model(ckpt, path)
        r, saved_args = ckpt["resume"], ckpt.get("train_args") or {}
        if r["progress"] is not None and r.get("world_size", 1) != self.world.size:
            raise TrainingError(f"{path} stopped mid-epoch in a run of {r.get('world_size', 1)} "
                                f"process(es); resume it with as many (this run has {self.world.size})")
        if r["progress"] is not None and r.get("accum_steps", 1) != args.accum_steps:
            raise TrainingError(f"{path} stopped mid-epoch with --accum_steps {r.get('accum_steps', 1)}; "
                                f"resume it with the same (this run has {args.accum_steps})")
        saved_decay = saved_args.get("model_ema_decay") or 0.0
        if (r.get("model_ema") is None) != (not args.model_ema_decay) or saved_decay != args.model_ema_decay:
            raise TrainingError(f"{path} was saved with --model_ema_decay {saved_decay}; resume it "
                                f"with the same (this run has {args.model_ema_decay})")
        saved_soft = saved_args.get("soft_labels_sha256")
        if saved_soft != soft_labels_sha256:
            raise TrainingError(f"{path} was trained with "
                                f"{'soft labels of sha256 ' + saved_soft if saved_soft else 'no --soft_labels'}; "
                                f"resume it with the same (this run has "
                                f"{args.soft_labels + ', another file' if args.soft_labels else 'none'})")
        for row in ckpt["history"]:
            self.observe(row)
        return ckpt
