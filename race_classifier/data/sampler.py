"""A sampler whose order is a pure function of (seed, epoch): a run resumed mid-epoch can skip
exactly the batches it had already trained on, and reruns are reproducible.

Its optional per-sample weights come from ``class_balanced_weights`` (every class drawn equally,
``--balance sampler``) or ``group_balanced_weights`` (every race x gender cell drawn equally,
``--balance group``), and, in a mix of datasets, ``source_weighted`` (each source its share of the draws,
the balance mode applied within each source).

Distributed (``rank``/``world_size``), each rank takes ``order[rank::world_size]`` of the epoch's order, padded
by repeating its head to a multiple of the world size (torch's DistributedSampler semantics): the ranks' shards
are disjoint slots that together cover the whole order, and ``start`` counts positions in the rank's shard.

``SeededEpochSampler`` also gives each slot of the order an augmentation seed drawn from (seed, epoch): the
training loader hands FaceDataset (index, seed) keys, so augmentation depends on the run's seed, the epoch and
the slot alone, not on the number of worker processes, whether they persist, or the world size."""
from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from torch.utils.data import Sampler

from race_classifier.heads import canonical_gender


def class_balanced_weights(labels: Sequence[int], num_classes: int) -> torch.Tensor:
    """Per-sample weights that give every present class the same total weight. Samples without a race label
    (-1, kept by multi-task training for their other heads) are one more class."""
    labels = torch.as_tensor(labels)
    labels = torch.where(labels < 0, num_classes, labels)
    counts = torch.bincount(labels, minlength=num_classes + 1).double()
    per_class = torch.where(counts > 0, 1.0 / counts.clamp(min=1), torch.zeros_like(counts))
    return per_class[labels]


def group_balanced_weights(labels: Sequence[int], groups: Sequence[str]) -> torch.Tensor:
    """Per-sample weights that give every present (class, group) cell the same total weight.

    ``groups`` is each sample's group within its class (the manifest's gender column), spelt as the gender
    head reads it ('M', 'male' and 'Male' are one group). An unknown group ('', '-', 'unknown') is a cell of
    its own in each class: unknown-gender faces are neither dropped nor counted as one of the genders.
    """
    if len(labels) != len(groups):
        raise ValueError(f"{len(labels)} labels but {len(groups)} groups")
    cells = list(zip((int(y) for y in labels), (canonical_gender(g) or "" for g in groups)))
    index = {cell: i for i, cell in enumerate(dict.fromkeys(cells))}
    cell_ids = torch.tensor([index[c] for c in cells], dtype=torch.long)
    counts = torch.bincount(cell_ids, minlength=len(index)).double()
    return (1.0 / counts)[cell_ids]


def source_weighted(sources: Sequence[str], shares: dict[str, float],
                    within: Callable[[list[int]], torch.Tensor | None] | None = None) -> torch.Tensor:
    """Per-sample weights that give each source ``shares[source] / sum(shares)`` of the draws.

    Inside a source, the draws follow ``within(indices of that source's samples)`` (a balance mode's weights
    computed on that source alone, so its classes are balanced within it), or are uniform when it gives None.
    Every source of ``sources`` must have a share; a share of 0 leaves that source out of training.
    """
    members: dict[str, list[int]] = {}
    for i, name in enumerate(sources):
        members.setdefault(name, []).append(i)
    unknown = [n or "(no source)" for n in members if n not in shares]
    if unknown:
        raise ValueError(f"no sampling weight for source(s) {', '.join(unknown)} (weights given for "
                         f"{', '.join(shares) or 'none'})")
    total = sum(shares[n] for n in members)
    if total <= 0:
        raise ValueError("the sampling weights of the sources present add up to 0")
    weights = torch.zeros(len(sources), dtype=torch.double)
    for name, idx in members.items():
        inner = within(idx) if within is not None else None
        inner = torch.ones(len(idx), dtype=torch.double) if inner is None else inner.double()
        weights[idx] = inner / inner.sum() * (shares[name] / total)
    return weights


class EpochSampler(Sampler[int]):
    """Shuffles (or draws by ``weights`` with replacement) with a generator seeded by seed and epoch;
    yields this rank's shard of that order."""

    def __init__(self, num_items: int, seed: int = 0, shuffle: bool = True, weights: torch.Tensor | None = None,
                 rank: int = 0, world_size: int = 1):
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} is not in a world of {world_size}")
        self.num_items = num_items
        self.seed = seed
        self.shuffle = shuffle
        self.weights = weights
        self.rank, self.world_size = rank, world_size
        self.epoch = 0
        self.start = 0

    def set_epoch(self, epoch: int, start: int = 0) -> None:
        """Order of ``epoch``; ``start`` skips that many leading indices of this rank's shard (resuming mid-epoch)."""
        self.epoch, self.start = epoch, start

    def _generator(self) -> torch.Generator:
        return torch.Generator().manual_seed(self.seed * 1_000_003 + self.epoch)

    def order(self, generator: torch.Generator | None = None) -> list[int]:
        g = generator or self._generator()
        if self.weights is not None:
            return torch.multinomial(self.weights, self.num_items, replacement=True, generator=g).tolist()
        if self.shuffle:
            return torch.randperm(self.num_items, generator=g).tolist()
        return list(range(self.num_items))

    def shard(self) -> list[int]:
        """This rank's part of ``order()``: every world_size-th index, padded so all ranks get as many."""
        return self._shard_of(self.order())

    def _shard_of(self, slots: list) -> list:
        if self.world_size == 1:
            return slots
        padding = self.shard_size * self.world_size - len(slots)
        slots = slots + (slots * (padding // max(len(slots), 1) + 1))[:padding]
        return slots[self.rank::self.world_size]

    @property
    def shard_size(self) -> int:
        return -(-self.num_items // self.world_size)

    def __iter__(self):
        return iter(self.shard()[self.start:])

    def __len__(self) -> int:
        return self.shard_size - self.start


class SeededEpochSampler(EpochSampler):
    """An EpochSampler that yields (index, augmentation seed) keys for FaceDataset: the same indices in the
    same order, each with a seed drawn for its slot of the epoch's order (after the order, from its generator)."""

    def keys(self) -> list[tuple[int, int]]:
        """This rank's whole shard of (index, seed) keys for the current epoch."""
        g = self._generator()
        order = self.order(g)
        seeds = torch.randint(2**62, (len(order),), generator=g).tolist()
        return self._shard_of(list(zip(order, seeds)))

    def __iter__(self):
        return iter(self.keys()[self.start:])
