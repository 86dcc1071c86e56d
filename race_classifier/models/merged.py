"""A model that answers in coarser race classes than it was trained in.

A model trained in fairface7 and scored in seed5 (East Asian + Southeast Asian -> Asian, Middle Eastern ->
White) beat a model trained in seed5 here; ``race-classifier merge-classes`` (post_training/merge_classes.py)
makes such a model deployable in the coarser classes. The checkpoint keeps the trained network untouched
and records the merge under ``merged_classes``:

    {"from": the trained taxonomy (to_dict), "taxonomy": the target taxonomy (to_dict), "table": target class
     index per trained class (None: dropped), "temperature": the trained model's temperature, applied before
     summing, "source": the trained checkpoint's path, "offsets": per target class, added to the merged
     logits (``rebalance --balance recall`` on a merged model; absent: none)}

``MergedRaceClasses`` puts the merge in the network itself, so predict, serve, evaluate and the ONNX export
see an ordinary model of the target classes: its race output is log(sum of the calibrated probabilities of
each target class's members), valid logits whose softmax is exactly those sums (renormalised over the kept
classes when some are dropped). Other heads pass through unchanged.
"""
from __future__ import annotations

import torch
from torch import nn

from race_classifier.labels import LabelMapping, Taxonomy, get_mapping

# log of a sum whose members all underflowed: a finite floor keeps softmax and the ONNX graph free of -inf
LOG_FLOOR_PROBABILITY = 1e-30


def membership_matrix(table: list[int | None], num_target: int) -> torch.Tensor:
    """(trained classes, target classes) 0/1 matrix: which target class each trained class is summed into."""
    matrix = torch.zeros(len(table), num_target)
    for source, target in enumerate(table):
        if target is not None:
            matrix[source, target] = 1.0
    return matrix


class MergedRaceClasses(nn.Module):
    """``model``'s race logits (its first ``len(table)`` outputs) turned into log summed probabilities."""

    def __init__(self, model: nn.Module, table: list[int | None], num_target: int, temperature: float = 1.0,
                 offsets: list[float] | None = None):
        super().__init__()
        self.model, self.num_source, self.temperature = model, len(table), float(temperature)
        self.register_buffer("membership", membership_matrix(table, num_target), persistent=False)
        self.register_buffer("offsets", torch.tensor(offsets or [0.0] * num_target, dtype=torch.float32),
                             persistent=False)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        logits = self.model(images)
        race, rest = logits[:, :self.num_source], logits[:, self.num_source:]
        probs = torch.softmax(race.float() / self.temperature, dim=1)
        merged = torch.log((probs @ self.membership).clamp_min(LOG_FLOOR_PROBABILITY)) + self.offsets
        if rest.shape[1] == 0:  # race only: no empty tensor in the graph (int8 calibration cannot range one)
            return merged.to(logits.dtype)
        return torch.cat([merged.to(logits.dtype), rest], dim=1)


def describe_merge(merge: dict) -> str:
    """'East Asian + Southeast Asian -> Asian, Middle Eastern -> White' (classes left as they are unnamed)."""
    source = Taxonomy.from_dict(merge["from"])
    target = Taxonomy.from_dict(merge["taxonomy"])
    members: dict[int, list[str]] = {}
    for name, index in zip(source.classes, merge["table"]):
        if index is not None:
            members.setdefault(index, []).append(name)
    parts = [f"{' + '.join(names)} -> {target.classes[i]}" for i, names in sorted(members.items())
             if names != [target.classes[i]]]
    dropped = [name for name, index in zip(source.classes, merge["table"]) if index is None]
    if dropped:
        parts.append(f"{', '.join(dropped)} dropped (the rest renormalised)")
    return ", ".join(parts) or "each class into the class of the same name"


def merge_summary(merge: dict) -> str:
    """'trained in fairface7: East Asian + Southeast Asian -> Asian, ...' for model information and metadata."""
    return f"trained in {merge['from']['name']}: {describe_merge(merge)}"


def label_mapping(ckpt: dict, labels):
    """How labels in taxonomy ``labels`` become the classes ``ckpt`` answers in: a merged model's own merge
    for labels in the classes it was trained in (label-map overrides included), else the built-in mapping;
    None when they are its classes already."""
    target, merge = Taxonomy.from_dict(ckpt["taxonomy"]), ckpt.get("merged_classes")
    if list(labels.classes) == list(target.classes):
        return None
    if merge and list(labels.classes) == list(merge["from"]["classes"]):
        return LabelMapping(labels, target, tuple(merge["table"]))
    return get_mapping(labels, target)
