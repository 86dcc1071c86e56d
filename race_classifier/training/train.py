"""The training run: manifests -> datasets -> model -> epochs -> best.pt / last.pt, console and CSV log;
then best.pt is calibrated on the validation set and MODEL_CARD.md written beside it (post_training/calibrate.py).

A run killed at any moment (even SIGKILL mid-epoch) continues with ``--resume``: last.pt holds the
optimizer, scaler, RNG and sampler position, and the CSV log is rewritten from the checkpoint's history,
so the resumed run logs every epoch exactly once. The global generators (dropout's) are reseeded at the start
of every epoch (rng.epoch_seed) and the loaders draw from generators of their own, so the figures depend
neither on --workers nor on a resume.

Under torchrun (WORLD_SIZE > 1) the run is data-parallel (training/distributed.py): every process trains
on its shard of each epoch's order with --batch_size images per step (the global batch is world size times
that; the learning rate is not scaled), gradients are averaged by DistributedDataParallel, and the epoch's
training sums are added over the ranks. Validation runs on rank 0 over the whole validation set with the
same weights every rank holds, so the figures are a single process's. Rank 0 alone prints and writes the
log, checkpoints, skipped-image listing and model card; the other ranks print nothing but errors. Every rank
resumes from last.pt, whose RNG state is rank 0's.

What the run reads (manifests, heads, datasets, the sampler and the loaders) is set up in run_data.py;
the device and mixed precision are resolved in race_classifier/device.py, torch.compile in accel.py; best.pt
and last.pt (which epoch is best, their order, what a resume must match) are checkpoint_saver.py's. This
module holds the model, the optimizer, the loop and what a checkpoint holds.

--accum_steps N: one optimizer step per N batches (engine.train_one_epoch); the schedule, global_step and
--save_every_steps count optimizer steps, and mid-epoch checkpoints fall between steps. --compile:
torch.compile of the training model; checkpoints and evaluation use the plain model, which shares its weights.
"""
from __future__ import annotations

import contextlib
import functools
import logging
import os
import time
from pathlib import Path

import torch
from timm.optim import create_optimizer_v2, param_groups_weight_decay
from timm.scheduler import CosineLRScheduler
from timm.utils import ModelEmaV3
from torch import nn

from race_classifier.data.transforms import (
    FAIRFACE_MARGIN,
    IMAGENET_MEAN,
    IMAGENET_STD,
    Preprocessing,
    arcface_crop,
)
from race_classifier.device import resolve_device, resolve_precision
from race_classifier.models.checkpoint import load_checkpoint, save_checkpoint
from race_classifier.models.factory import classifier_prefix, create_model, freeze_until
from race_classifier.post_training.calibrate import finalize_run
from race_classifier.post_training.rebalance import fit_linear_probe
from race_classifier.rng import (
    epoch_seed,
    get_rng_state,
    seed_everything,
    set_rng_state,
)
from race_classifier.training import TrainingError, config
from race_classifier.training.accel import compile_model, is_compile_error
from race_classifier.training.checkpoint_saver import CheckpointSaver
from race_classifier.training.distill import SoftLabelError, SoftLabels, TeacherTargets
from race_classifier.training.distributed import World, init_from_env, teardown
from race_classifier.training.engine import (
    EpochProgress,
    MultiHeadLoss,
    evaluate,
    train_one_epoch,
)
from race_classifier.training.mixing import BatchMixer
from race_classifier.training.report import (
    append_csv_row,
    epoch_row,
    format_epoch,
    rewrite_csv,
)
from race_classifier.training.run_data import (
    RunSamples,
    build_loaders,
    known_unreadable,
)
from race_classifier.utils import atomic_write_text, run_command

log = logging.getLogger("race_classifier.train")


def training_crop(choice: str, pretrained_cfg: dict) -> dict:
    """Preprocessing.crop for --crop: arcface (ArcFace's alignment, as a box of FairFace's chips), fairface
    (the released chips whole), or auto: the backbone's own (its pretrained_cfg's crop), else fairface."""
    own = (pretrained_cfg.get("crop") or {}).get("template")
    if choice == "arcface" or (choice == "auto" and own == "arcface"):
        return arcface_crop()
    return {"aligned": True, "margin": FAIRFACE_MARGIN}


def backbone_lr_groups(ratio: float, weight_decay: float):
    """For --backbone_lr_ratio: a timm param_group_fn giving every parameter outside the classifier
    ``ratio`` x the learning rate (timm's schedulers honour ``lr_scale``); None at 1 (timm's own groups).
    The classifier's groups come first, so the lr logged (group 0's) is the head's."""
    if ratio == 1.0:
        return None
    if not ratio > 0:
        raise TrainingError(f"--backbone_lr_ratio must be positive, got {ratio}")

    def groups(model: nn.Module) -> list[dict]:
        head = {id(p) for p in model.get_submodule(classifier_prefix(model)).parameters()}
        by_decay = param_groups_weight_decay(model, weight_decay, no_weight_decay_list=getattr(
            model, "no_weight_decay", lambda: set())())
        return [{**g, "params": params, "lr_scale": 1.0 if in_head else ratio}
                for in_head in (True, False) for g in by_decay
                if (params := [p for p in g["params"] if (id(p) in head) == in_head])]
    return groups


class Trainer:
    def __init__(self, args, world: World = World(), device: torch.device | None = None):
        self.args = args
        self.world = world
        self.device = device or resolve_device(args.device)
        self.amp_dtype = resolve_precision(args.amp, self.device)
        self.memory_format = torch.channels_last if args.channels_last else torch.contiguous_format
        self.dir = Path(args.checkpoint_dir)
        self.skipped: dict[str, str] = {}  # path -> reason, over the whole run

        self.samples = RunSamples.read(args)
        self.taxonomy, self.classes, self.heads = self.samples.taxonomy, self.samples.classes, self.samples.heads
        self.train_samples, self.val_samples = self.samples.train, self.samples.val
        self.saver = CheckpointSaver(self.dir, args.best_metric, self._save, world, arch=args.arch,
                                     classes=self.classes, heads=self.heads)
        self.last_path, self.best_path = self.saver.last_path, self.saver.best_path

        seed_everything(args.seed)
        pretrained = None if args.resume or args.initial_checkpoint else args.pretrained
        self.model = create_model(args.arch, self.heads.num_outputs, pretrained, args.drop_rate).to(self.device)
        self.initialised_from = None  # what --initial_checkpoint was, for the model card
        if args.initial_checkpoint and not args.resume:
            self.initialised_from = self._load_initial_checkpoint(Path(args.initial_checkpoint))
        if args.channels_last:
            self.model = self.model.to(memory_format=torch.channels_last)
        # Normalise as the backbone was pretrained (timm records it; torchvision's are ImageNet's).
        cfg = getattr(self.model, "pretrained_cfg", None) or {}
        self.preprocessing = Preprocessing(image_size=args.image_size, mean=tuple(cfg.get("mean", IMAGENET_MEAN)),
                                           std=tuple(cfg.get("std", IMAGENET_STD)),
                                           crop=training_crop(getattr(args, "crop", "auto"), cfg))
        if getattr(args, "head_init", "random") == "linear_probe":
            self._fit_probe_head()
        if args.freeze_until:
            frozen = freeze_until(self.model, args.freeze_until)
            log.info("froze the %d parameter tensors before %s", frozen, args.freeze_until)
        # The weight average starts from the weights training starts from (pretrained, initial or, on
        # resume, replaced by last.pt's average). Warm-up (power 3/4, for short runs) keeps the early
        # average from being dominated by the barely trained first steps.
        self.ema = ModelEmaV3(self.model, decay=args.model_ema_decay, use_warmup=True,
                              warmup_power=0.75) if args.model_ema_decay else None
        self.train_model = self.model  # what training calls: the model itself, its DDP wrapper, compiled
        if world.distributed:
            self.train_model = nn.parallel.DistributedDataParallel(
                self.model, device_ids=[self.device.index] if self.device.type == "cuda" else None)
            if world.rank:  # the same weights everywhere (DDP copies rank 0's), other random draws (dropout)
                seed_everything(args.seed + world.rank)
        if args.compile:  # around DDP, as PyTorch advises (it then splits the graph at DDP's gradient buckets)
            self.train_model = compile_model(self.train_model, self.device)
        if self.device.type == "cuda":
            torch.backends.cudnn.benchmark = True
        self.data = build_loaders(args, world, self.samples, self.preprocessing, self.device)

        total_steps = self.data.steps_per_epoch * args.num_epochs
        self.optimizer = create_optimizer_v2(self.model, "adamw", lr=args.learning_rate, weight_decay=args.weight_decay,
                                             param_group_fn=backbone_lr_groups(getattr(args, "backbone_lr_ratio", 1.0),
                                                                               args.weight_decay))
        min_lr = args.learning_rate * args.min_lr_ratio
        self.scheduler = CosineLRScheduler(
            self.optimizer, t_initial=total_steps, lr_min=min_lr, t_in_epochs=False,
            warmup_t=int(args.warmup_epochs * self.data.steps_per_epoch), warmup_lr_init=min_lr, warmup_prefix=True)
        self.scaler = torch.amp.GradScaler(self.device.type, enabled=self.amp_dtype == torch.float16)

        labels = torch.tensor(self.data.train_set.labels)
        class_weights = None
        if args.balance == "loss":
            counts = torch.bincount(labels[labels >= 0], minlength=self.taxonomy.num_classes).float()
            class_weights = torch.where(counts > 0, counts.sum() / (counts.clamp(min=1) * (counts > 0).sum()), 0.0)
        self.mixer, self.teacher, self.distillation = self._soft_race_targets(args, world.rank)
        self.criterion = MultiHeadLoss(list(self.heads.slices().values()), class_weights,
                                       args.label_smoothing).to(self.device)
        self.start_epoch, self.global_step, self.history = 0, 0, []
        self.progress, self.elapsed = EpochProgress.empty(len(self.heads.heads)), 0.0

    def _soft_race_targets(self, args, rank: int) -> tuple[BatchMixer | None, TeacherTargets | None, dict[str, str]]:
        """Mixup/CutMix and distillation: both replace the race labels by target distributions, so both are
        race-only. The distillation's record (sha256 of the soft labels, their teachers) goes with the run:
        the model card names the teachers, a resume checks it has the same file."""
        if (args.mixup or args.cutmix or args.soft_labels) and (self.heads.extra or args.balance == "loss"):
            used = "--mixup/--cutmix mix" if args.mixup or args.cutmix else "--soft_labels distil"
            raise TrainingError(f"{used} race labels only: not with gender/age heads (--heads) "
                                "or class-weighted loss (--balance loss)")
        mixer = teacher = None
        if args.mixup or args.cutmix:
            mixer = BatchMixer(args.mixup, args.cutmix, args.mix_prob, self.taxonomy.num_classes,
                               args.label_smoothing, args.seed, rank)
        if not args.soft_labels:
            return mixer, None, {}
        try:
            soft = SoftLabels.load(args.soft_labels)
            teacher = TeacherTargets(soft, self.samples.train, self.classes, args.distill_weight,
                                     args.label_smoothing, args.soft_labels)
        except SoftLabelError as e:
            raise TrainingError(str(e)) from None
        for changed in soft.changed_teachers():
            log.warning("%s: teacher %s has changed since these soft labels were written from it: they may be "
                        "stale (write them again with `race-classifier soft-labels`)", args.soft_labels, changed)
        return mixer, teacher, {"soft_labels_sha256": soft.sha256, "soft_label_teachers": "; ".join(soft.teachers)}

    # -- checkpoints -------------------------------------------------------------------------------

    def _train_args(self) -> dict:
        train_args = {k: v for k, v in vars(self.args).items() if isinstance(v, (str, int, float, bool, type(None)))}
        if self.initialised_from is not None:
            train_args["initialised_from"] = self.initialised_from
        return train_args | self.distillation

    def _fit_probe_head(self) -> None:
        """--head_init linear_probe: on a fresh run, the race layer starts as a logistic regression on the
        pretrained features (rank 0 fits it; DistributedDataParallel then copies its weights to every rank)."""
        if self.args.initial_checkpoint:
            raise TrainingError("--head_init linear_probe fits a new race layer: not with --initial_checkpoint, "
                                "which brings its own")
        if self.args.resume or self.world.rank:
            return
        start = time.perf_counter()
        balance = {"sampler": "sampler", "loss": "sampler", "group": "group"}.get(self.args.balance, "none")
        accuracy = fit_linear_probe(self.model, self.train_samples, self.preprocessing, self.taxonomy.num_classes,
                                    balance, self.args.batch_size, self.args.workers)
        log.info("--head_init linear_probe: race layer fitted on the frozen features of %d training images "
                 "(%s) in %.0f s; its training accuracy %.2f%%", len(self.train_samples),
                 "unweighted" if balance == "none" else f"{balance}-balanced", time.perf_counter() - start,
                 100 * accuracy)

    def _load_initial_checkpoint(self, path: Path) -> str:
        """Every weight of ``path`` (classifier included) into the new model; returns a one-line account of it.
        Its optimizer state, temperature and threshold are not carried: this run refits them."""
        ckpt = load_checkpoint(path)
        self.saver.check_same_model(ckpt, path)
        self.model.load_state_dict(ckpt["state_dict"])
        before = ckpt.get("train_args") or {}
        size = (ckpt.get("preprocessing") or {}).get("image_size")
        account = (f"{path} (epoch {ckpt.get('epoch')} of a run at {size} px, itself initialised from "
                   f"{before.get('initialised_from') or before.get('pretrained') or 'random weights'})")
        log.info("initialised every weight from %s", account)
        return account

    def _save(self, path: Path, epoch: int, metrics: dict, resume: dict | None,
              model: nn.Module | None = None) -> None:
        save_checkpoint(path, model=self.model if model is None else model, arch=self.args.arch,
                        taxonomy=self.taxonomy, preprocessing=self.preprocessing, train_args=self._train_args(),
                        epoch=epoch, metrics=metrics, history=self.history, resume=resume, heads=self.heads)

    def save_last(self, epoch: int, in_progress: bool) -> None:
        """``epoch`` is the number of the epoch to run next; ``in_progress`` saves a partial epoch."""
        resume = {
            "epoch": epoch,
            "global_step": self.global_step,
            "progress": self._epoch_progress().to_dict() if in_progress else None,
            "elapsed": self.elapsed_now() if in_progress else 0.0,
            "optimizer": self.optimizer.state_dict(),
            "scaler": self.scaler.state_dict(),
            "rng": get_rng_state(),
            "skipped": dict(self.skipped),
            "world_size": self.world.size,  # a mid-epoch position is per rank
            "accum_steps": self.args.accum_steps,  # and falls on this many batches' group boundary
            "model_ema": self.ema.module.state_dict() if self.ema else None,
        }
        self.saver.save_last(epoch, resume)

    def _epoch_progress(self) -> EpochProgress:
        """The epoch's progress over all ranks (collective: every rank calls it at the same step)."""
        p = self.progress
        if not self.world.distributed:
            return p
        n = len(p.correct)
        sums = self.world.all_sum(p.loss_sum, p.seen, *p.correct, *p.labelled)
        failures = {}
        for part in self.world.all_gather(p.failures):
            failures.update(part)
        return EpochProgress(p.batches, sums[0], int(sums[1]), [int(x) for x in sums[2:2 + n]],
                             [int(x) for x in sums[2 + n:]], failures)

    def restore(self) -> None:
        ckpt = self.saver.load_last(self.args, self.distillation.get("soft_labels_sha256"))
        self.initialised_from = (ckpt.get("train_args") or {}).get("initialised_from")
        r = ckpt["resume"]
        self.model.load_state_dict(ckpt["state_dict"])
        self.optimizer.load_state_dict(r["optimizer"])
        self.scaler.load_state_dict(r["scaler"])
        if self.ema is not None:
            self.ema.module.load_state_dict(r["model_ema"])
        set_rng_state(r["rng"])
        self.start_epoch, self.global_step, self.history = r["epoch"], r["global_step"], list(ckpt["history"])
        self.skipped = dict(r["skipped"])
        if r["progress"] is not None:
            self.progress, self.elapsed = EpochProgress.from_dict(r["progress"]), r["elapsed"]
            if not self.world.main:  # the saved sums are all ranks' together: rank 0 carries them on
                self.progress = EpochProgress.empty(len(self.heads.heads), self.progress.batches)
        # The log becomes exactly the epochs the checkpoint knows: no duplicates, none lost.
        if self.world.main:
            rewrite_csv(self.args.log_file, self.history)
        where = f"batch {self.progress.batches} of epoch {self.start_epoch + 1}" if r["progress"] else f"epoch {self.start_epoch + 1}"
        print(f"Resuming {self.args.dataset} from {self.last_path} at {where}", flush=True)

    # -- the loop ----------------------------------------------------------------------------------

    def elapsed_now(self) -> float:
        return self.elapsed + (time.time() - self._epoch_started)

    def _train_epoch(self, epoch: int, on_step) -> int:
        """One epoch's training from where ``self.progress`` stands; returns the new global step."""
        self.data.sampler.set_epoch(epoch, start=self.progress.batches * self.args.batch_size)
        try:
            return train_one_epoch(
                self.train_model, self.data.train_loader, self.criterion, self.optimizer, self.scheduler,
                self.scaler, self.device, self.amp_dtype, self.progress, self.global_step,
                desc=f"epoch {epoch + 1}/{self.args.num_epochs}", on_step=on_step, show=self.world.main,
                memory_format=self.memory_format, accum_steps=self.args.accum_steps,
                mix=functools.partial(self.mixer, epoch=epoch) if self.mixer else None, teacher=self.teacher)
        except Exception as e:
            if self.args.compile and is_compile_error(e):
                first_line = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
                raise TrainingError(f"--compile: torch.compile failed on this model and machine ({first_line}); "
                                    "run without --compile") from e
            raise

    def _report_skipped(self, epoch: int, *splits: tuple[str, dict[int, str], list]) -> None:
        """One block per split ("training", "validation") that skipped images this epoch, naming the split and
        how many of its listed images were skipped; the run's listing gets them all."""
        if not self.world.main:
            return
        listing = self.dir / "skipped_images.txt"
        blocks = []
        for split, failures, samples in splits:
            new = {samples[i].path: reason for i, reason in failures.items()}
            if new:
                self.skipped.update(new)
                blocks.append((split, len(samples), new))
        if not blocks:
            return
        atomic_write_text(listing, "".join(f"{p}\t{r}\n" for p, r in sorted(self.skipped.items())))
        for split, listed, new in blocks:
            print(f"Skipped {len(new)} unreadable {split} image(s) of the {listed} listed in epoch {epoch} "
                  f"(all listed in {listing}):", flush=True)
            for path, reason in list(new.items())[:10]:
                print(f"   {path}: {reason}", flush=True)

    def run(self) -> dict:
        if self.world.main:
            return self._run()
        with open(os.devnull, "w") as devnull, contextlib.redirect_stdout(devnull):
            return self._run()

    def _run(self) -> dict:
        args = self.args
        self.saver.prepare(resume=args.resume, overwrite=args.overwrite, log_file=Path(args.log_file))
        if args.resume:
            self.restore()
        print(f"Training {args.dataset}: {args.arch} on {self._image_counts()}, {len(self.classes)} classes "
              f"({', '.join(self.classes)}), device {self.device}"
              + (f" x {self.world.size} processes" if self.world.distributed else ""),
              flush=True)
        for epoch in range(self.start_epoch, args.num_epochs):
            if args.patience and self.saver.epochs_since_best >= args.patience:
                break
            self._epoch_started = time.time()
            if not self.progress.batches:  # a fresh epoch (a resumed one continues its saved random state)
                seed_everything(epoch_seed(args.seed, epoch, self.world.rank))

            def on_step(step: int, epoch=epoch) -> None:
                self.global_step = step
                if self.ema is not None:
                    self.ema.update(self.model, step=step)
                if args.save_every_steps and step % args.save_every_steps == 0:
                    self.save_last(epoch, in_progress=True)

            self.global_step = self._train_epoch(epoch, on_step)
            val = without_ema = None
            if self.world.main:  # the unwrapped model: no collectives while the other ranks wait
                val = self._validate(self.kept_model)
                if self.ema is not None:  # the trained weights too, to show what the average adds
                    without_ema = self._validate(self.model)
            val, without_ema = self.world.broadcast((val, without_ema))
            p = self._epoch_progress()
            row = epoch_row(epoch + 1, p.loss_sum / p.seen if p.seen else float("nan"),
                            p.accuracy(0), val, self.classes,
                            self.optimizer.param_groups[0]["lr"], self.elapsed_now(),
                            len(p.failures) + len(val["failures"]), heads=self.heads,
                            train_head_acc={h.name: p.accuracy(i + 1) for i, h in enumerate(self.heads.extra)},
                            without_ema=without_ema)
            self.history.append(row)
            self.progress, self.elapsed = EpochProgress.empty(len(self.heads.heads)), 0.0
            self.saver.save_epoch(row, self.kept_model, lambda epoch=epoch: self.save_last(epoch + 1, in_progress=False))
            if self.world.main:
                append_csv_row(args.log_file, row)
            print(format_epoch(row, args.num_epochs, self.classes, self.heads, self.data.val_sources), flush=True)
            self._report_skipped(epoch + 1, ("training", p.failures, self.train_samples),
                                 ("validation", val["failures"], self.val_samples))
        self.data.close()
        if args.patience and self.saver.epochs_since_best >= args.patience:
            print(f"Early stopping: no {args.best_metric} improvement in {args.patience} epochs", flush=True)
        summary = self._summary()
        if self.world.main:
            self.finalize()
        self.world.barrier()
        return summary

    def _image_counts(self) -> str:
        """'48 training / 24 validation images listed', and how many of them are known unreadable before
        training starts (an image cache records them; without one, each epoch's 'Skipped' lines say it)."""
        text = f"{len(self.train_samples)} training / {len(self.val_samples)} validation images listed"
        bad_train, bad_val = known_unreadable(self.data.train_set), known_unreadable(self.data.val_set)
        if bad_train or bad_val:
            text += (f" ({bad_train} training / {bad_val} validation unreadable in the image cache: skipped, "
                     f"{len(self.train_samples) - bad_train} / {len(self.val_samples) - bad_val} used)")
        return text

    @property
    def kept_model(self) -> nn.Module:
        """What validation scores and best.pt keeps: the weight average when there is one."""
        return self.ema.module if self.ema is not None else self.model

    def _validate(self, model: nn.Module) -> dict:
        return evaluate(model, self.data.val_loader, self.device, self.amp_dtype, self.heads,
                        memory_format=self.memory_format,
                        sources=[s.source for s in self.val_samples] if self.data.val_sources else None)

    def finalize(self) -> dict | None:
        """Temperature and abstention threshold fitted on the validation set, stored in best.pt (never
        last.pt), and MODEL_CARD.md beside it; skipped when no epoch produced a best.pt."""
        return finalize_run(self.best_path, self.val_samples, val_txt=self.args.val_txt,
                            train_samples=self.train_samples, train_txt=self.args.train_txt,
                            coverage=self.args.abstain_coverage, batch_size=self.args.batch_size,
                            workers=self.args.workers, device=self.device, seed=self.args.seed,
                            epochs_run=len(self.history))

    def _summary(self) -> dict:
        metric, best_row = self.args.best_metric, self.saver.best
        if best_row is not None and self.best_path.is_file():
            print(f"Best epoch {best_row['epoch']}: {metric} {best_row[metric]:.4f}; checkpoint {self.best_path}, "
                  f"log {self.args.log_file}", flush=True)
        elif self.history:
            print(f"No best checkpoint: {metric} was never defined (no readable, labelled validation image?); "
                  f"the last weights are in {self.last_path}, log {self.args.log_file}", flush=True)
        return {"best": best_row, "history": self.history}


def run(args) -> int:
    world, device = init_from_env(args.device)
    if not world.main:
        logging.getLogger().setLevel(logging.ERROR)  # other ranks: errors only
    try:
        Trainer(args, world, device).run()
    finally:
        teardown(world)
    return 0


def main(argv: list[str] | None = None, prog: str = "train.py") -> int:
    return run_command(run, config.parse_args(argv, prog=prog))
