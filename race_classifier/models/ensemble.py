"""Several trained models as one model file: ``race-classifier ensemble``.

Averaging the calibrated probabilities of independently trained runs is what passed 70% on fairface7 here,
where every single run stayed near 68.5% (README, "Accuracy recipe and benchmark"): runs make different
errors. This puts the average in the network, so predict, serve, evaluate, compare, merge-classes and the
ONNX export see an ordinary model. The checkpoint records under ``ensemble``:

    {"members": [{"source": path, "sha256": of that file, "arch": its architecture, "temperature": its own,
                  "epoch": its best epoch, "val_accuracy": its training-time figure}, ...],
     "offsets": per class, added to the averaged logits (``rebalance --balance recall``; absent: none)}

and ``state_dict`` holds every member's weights (``members.<i>.<name>``). Members must share classes and
preprocessing and be race-only models as trained (not merged, not ensembles themselves).
"""
from __future__ import annotations

import torch
from torch import nn

from race_classifier.models.factory import create_model
from race_classifier.models.merged import LOG_FLOOR_PROBABILITY


class AveragedProbabilities(nn.Module):
    """log(mean over members of softmax(logits / member temperature)) + offsets: valid logits whose softmax
    is the members' mean calibrated probabilities (shifted by the offsets)."""

    def __init__(self, members: list[nn.Module], temperatures: list[float], offsets: list[float] | None = None):
        super().__init__()
        self.members = nn.ModuleList(members)
        self.temperatures = [float(t) for t in temperatures]
        self.register_buffer("offsets", torch.tensor(offsets or [0.0], dtype=torch.float32), persistent=False)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        probs = [torch.softmax(member(images).float() / t, dim=1) for member, t in zip(self.members, self.temperatures)]
        mean = torch.stack(probs).mean(dim=0)
        return torch.log(mean.clamp_min(LOG_FLOOR_PROBABILITY)) + self.offsets


def build_ensemble(ensemble: dict, num_classes: int) -> AveragedProbabilities:
    members = [create_model(m["arch"], num_classes) for m in ensemble["members"]]
    return AveragedProbabilities(members, [m.get("temperature", 1.0) for m in ensemble["members"]],
                                 ensemble.get("offsets"))


def describe_ensemble(ensemble: dict) -> str:
    """'the mean calibrated probabilities of 3 models: a/best.pt (torchvision:mobilenet_v2, T 0.942), ...'"""
    parts = [f"`{m['source']}` ({m['arch']}, T {m.get('temperature', 1.0):.3f})" for m in ensemble["members"]]
    return f"the mean calibrated probabilities of {len(parts)} models: {', '.join(parts)}"
