"""What a training run reads, in the order data flows: manifests (mapped into the taxonomy) -> samples and
the heads they label (``RunSamples``) -> datasets, sampler and loaders (``RunLoaders``).

Split from the Trainer (train.py), which owns the model, the optimizer and the loop: the model's size
depends on the heads read here, and the datasets' normalisation on the model, so the Trainer builds
``RunSamples`` first, then the model, then ``RunLoaders``.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass

import torch
from torch.utils.data import DataLoader

from race_classifier.data.cache import ImageCache, cache_size_for
from race_classifier.data.dataset import FaceDataset, collate_skipping_failures
from race_classifier.data.manifest import Sample, read_manifest
from race_classifier.data.mix import read_source_weights
from race_classifier.data.sampler import (
    SeededEpochSampler,
    class_balanced_weights,
    group_balanced_weights,
    source_weighted,
)
from race_classifier.data.shards import find_shards
from race_classifier.data.transforms import Augmentation, Preprocessing, build_transform
from race_classifier.heads import (
    AgeBins,
    HeadLayout,
    canonical_gender,
    gender_classes,
    head_targets,
)
from race_classifier.labels import Taxonomy, get_mapping, get_taxonomy, load_label_map
from race_classifier.rng import seed_worker
from race_classifier.training import TrainingError
from race_classifier.training.distributed import World

log = logging.getLogger("race_classifier.train")


@dataclass
class RunSamples:
    """Both manifests read into one taxonomy, the head layout they define, and each sample's targets."""
    taxonomy: Taxonomy
    train: list[Sample]
    val: list[Sample]
    heads: HeadLayout
    train_targets: torch.Tensor  # (N, heads) class index per head, -1 where a sample has no label
    val_targets: torch.Tensor

    @property
    def classes(self) -> list[str]:
        return list(self.taxonomy.classes)

    @classmethod
    def read(cls, args) -> "RunSamples":
        taxonomy = get_taxonomy(args.taxonomy)
        mapping = None
        if args.source_taxonomy or args.label_map:
            source = get_taxonomy(args.source_taxonomy) if args.source_taxonomy else taxonomy
            mapping = get_mapping(source, taxonomy, load_label_map(args.label_map) if args.label_map else None)
        head_names = tuple(args.heads.split(","))
        multi = head_names != ("race",)  # other heads: keep the samples without a race label for them
        train = read_manifest(args.train_txt, taxonomy, mapping, keep_unlabelled=multi)
        val = read_manifest(args.val_txt, taxonomy, mapping, keep_unlabelled=multi)
        heads = HeadLayout.build(list(taxonomy.classes), head_names, gender_classes(s.gender for s in train),
                                 AgeBins.parse(args.age_bins) if "age" in head_names else None)
        samples = cls(taxonomy, train, val, heads, torch.from_numpy(head_targets(heads, train, args.train_txt)),
                      torch.from_numpy(head_targets(heads, val, args.val_txt)))
        samples.warn_about_class_coverage()
        return samples

    def warn_about_class_coverage(self) -> None:
        for name, samples in (("training", self.train), ("validation", self.val)):
            counts = torch.bincount(torch.tensor([s.label for s in samples if s.label >= 0], dtype=torch.long),
                                    minlength=len(self.classes))
            empty = [c for c, n in zip(self.classes, counts.tolist()) if n == 0]
            if empty:
                log.warning("no %s images for class(es) %s: their %s accuracy is reported as n/a",
                            name, ", ".join(empty), name)

    def validation_sources(self, val_txt: str) -> list[str] | None:
        """The validation manifest's sources when it has more than one (a mix): each gets its accuracy logged."""
        names = list(dict.fromkeys(s.source for s in self.val if s.source))
        if len(names) < 2:
            return None
        taken = {"balanced", "worst_class"} | {h.name for h in self.heads.extra}
        for name in names:
            if name in taken or any(name.startswith(f"{h.name}_") for h in self.heads.extra):
                raise TrainingError(f"{val_txt}: source name {name!r} would clash with the log column "
                                    f"of another figure (val_{name}_accuracy); rename the source")
        return names


@dataclass
class RunLoaders:
    train_set: FaceDataset
    val_set: FaceDataset
    sampler: SeededEpochSampler
    train_loader: DataLoader | None
    val_loader: DataLoader | None
    steps_per_epoch: int  # optimizer steps: with --accum_steps N, one per N batches (the last group steps too)
    val_sources: list[str] | None  # a mix's validation sources, each logged with its own accuracy

    def close(self) -> None:
        """Drop the loaders: persistent workers would otherwise idle through finalize (which reads the
        images with loaders of its own)."""
        self.train_loader = self.val_loader = None


def build_loaders(args, world: World, samples: RunSamples, preprocessing: Preprocessing,
                  device: torch.device) -> RunLoaders:
    """One training DataLoader for the whole run: the sampler sets each epoch's order and gives every image
    an augmentation seed of its own (SeededEpochSampler), so augmentation is a function of (seed, epoch,
    slot in the epoch) whatever the worker processes, and the workers may persist across epochs."""
    aug = Augmentation(hflip=args.hflip, scale=(args.scale_min, 1.0), color_jitter=args.color_jitter)
    train_cache, val_cache = _image_caches(args, world, samples)
    train_set = FaceDataset(samples.train, build_transform(preprocessing, True, aug), train_cache,
                            draft_size=args.image_size, targets=samples.train_targets)
    val_set = FaceDataset(samples.val, build_transform(preprocessing, False), val_cache,
                          draft_size=args.image_size, targets=samples.val_targets)
    sampler = SeededEpochSampler(len(train_set), args.seed, rank=world.rank, world_size=world.size,
                                 weights=_sampling_weights(args, samples, train_set.labels))
    per_rank = sampler.shard_size
    drop_last = per_rank >= args.batch_size  # no size-1 batches for BatchNorm
    batches_per_epoch = max(1, per_rank // args.batch_size if drop_last else 1)
    pin = device.type == "cuda"
    train_loader = DataLoader(
        train_set, batch_size=args.batch_size, sampler=sampler, num_workers=args.workers,
        collate_fn=collate_skipping_failures, drop_last=drop_last, pin_memory=pin,
        persistent_workers=args.persistent_workers, worker_init_fn=seed_worker,
        # Its own generator: starting an epoch's iteration draws nothing from the global RNG.
        generator=torch.Generator().manual_seed(args.seed * 7919 + 104_729 * world.rank))
    # Its own generator too: starting an iteration draws the workers' base seed from the loader's generator,
    # or else from the global torch RNG (dropout's), once per epoch without persistent workers and once per run
    # with them; the figures then depended on --workers and on a resume from the third epoch on.
    val_loader = DataLoader(val_set, batch_size=args.batch_size, shuffle=False, num_workers=args.workers,
                            collate_fn=collate_skipping_failures, pin_memory=pin,
                            persistent_workers=args.persistent_workers,
                            generator=torch.Generator().manual_seed(args.seed * 7919 + 104_729 * world.rank + 1))
    return RunLoaders(train_set, val_set, sampler, train_loader, val_loader,
                      steps_per_epoch=-(-batches_per_epoch // args.accum_steps),
                      val_sources=samples.validation_sources(args.val_txt))


def known_unreadable(dataset: FaceDataset) -> int:
    """How many of ``dataset``'s images its image cache (--cache_dir, shards) recorded as unreadable when it
    was built: known before training, without decoding anything; 0 without a cache (found as epochs run)."""
    cache = dataset.cache
    if cache is None:
        return 0
    return sum(1 for row in cache.rows if row >= 0 and row in cache.errors)


def _image_caches(args, world: World, samples: RunSamples) -> tuple[ImageCache | None, ImageCache | None]:
    """(train, val) pre-resized images: --cache_dir (built here), else prepared shards (--shards), else none."""
    if args.cache_dir:
        size = cache_size_for(args.image_size, [s.path for s in samples.train])
        if not world.main:  # rank 0 builds the cache; the others then load it
            world.barrier()
        train_cache = ImageCache.build_or_load(samples.train, size, args.cache_dir, args.workers)
        # Validation images at exactly the input size, resized as inference resizes them: what validation
        # scores is then what the model file does on these images.
        val_cache = ImageCache.build_or_load(samples.val, args.image_size, args.cache_dir, args.workers)
        if world.main:
            world.barrier()
        return train_cache, val_cache
    root = find_shards(args.shards, args.train_txt, args.image_size)
    if root is None:
        return None, None
    shards = ImageCache.open(root)
    log.info("reading images from the prepared shards in %s (%d px)", root, shards.size)
    if shards.size != args.image_size:  # a second resize would make validation differ from inference
        log.info("validation images are read from their files: the shards hold them at %d px, not %d",
                 shards.size, args.image_size)
        return shards.for_samples(samples.train), None
    return shards.for_samples(samples.train), shards.for_samples(samples.val)


def _sampling_weights(args, samples: RunSamples, labels: list[int]) -> torch.Tensor | None:
    """Per-sample draw weights for --balance sampler (classes) or group (race x gender cells), and in a
    mix with --source_weights, each source's share of the draws (the balance mode applied within it)."""
    train = samples.train

    def balance(indices: list[int]) -> torch.Tensor | None:
        subset = [labels[i] for i in indices]
        if args.balance == "sampler":
            return class_balanced_weights(subset, samples.taxonomy.num_classes)
        if args.balance == "group":
            return group_balanced_weights(subset, [train[i].gender for i in indices])
        return None

    if args.balance == "group" and not any(canonical_gender(s.gender) for s in train):
        log.warning("--balance group: the training manifest has no gender column, so every class is one "
                    "cell and this is class-balanced sampling")
    if not args.source_weights:
        return balance(list(range(len(labels))))
    shares = read_source_weights(args.source_weights)
    present = {s.source for s in train}
    absent = [n for n in shares if n not in present]
    if absent:
        log.warning("--source_weights names source(s) the training manifest does not have: %s", ", ".join(absent))
    try:
        weights = source_weighted([s.source for s in train], shares, balance)
    except ValueError as e:
        raise TrainingError(f"{args.train_txt}: {e}") from None
    total = sum(shares[n] for n in present)
    log.info("sampling by source: %s", ", ".join(f"{n} {shares[n] / total:.1%}" for n in sorted(present)))
    return weights
