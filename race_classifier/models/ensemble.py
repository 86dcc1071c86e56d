"""Several trained models as one model file: ``race-classifier ensemble``.

Averaging the calibrated probabilities of independently trained runs is what passed 70% on fairface7 here,
where every single run stayed near 68.5% (README, "Accuracy recipe and benchmark"): runs make different
errors. This puts the average in the network, so predict, serve, evaluate, compare, merge-classes and the
ONNX export see an ordinary model. The checkpoint records under ``ensemble``:

    {"members": [{"source": path, "sha256": of that file, "arch": its architecture, "temperature": its own,
                  "epoch": its best epoch, "val_accuracy": its training-time figure}, ...],
     "offsets": per class, added to the averaged logits (``rebalance --balance recall``; absent: none)}

and ``state_dict`` holds every member's weights (``members.<i>.<name>``). Members must share classes and be
race-only models as trained (not merged, not ensembles themselves).

Members may preprocess differently (e.g. a 112 px MobileFaceNet on ArcFace's box of the chip, and a 160 px
MobileNetV2 on the whole chip): each member's record then holds its ``preprocessing``, the ensemble takes the
whole face chip at the largest resolution any member reads (pixel values in [0, 1]), and an
:class:`InputAdapter` in the network makes each member's input from it: the member's box of the chip (black
outside the chip), resized as Pillow's bilinear filter does (with its 8-bit rounding), normalised with the
member's mean and std. The resize is two fixed matrices, so the ONNX export needs no antialiased Resize (the
exporter has none).
"""
from __future__ import annotations

import numpy as np
import torch
from torch import nn

from race_classifier.data.transforms import FAIRFACE_CHIP_SIZE, Preprocessing, chip_box
from race_classifier.models.factory import create_model
from race_classifier.models.merged import LOG_FLOOR_PROBABILITY

# What a member's crop may add to the chip geometry the ensemble takes: its box of that chip.
BOX_KEYS = ("chip_box", "chip_size", "template")


def bilinear_resize_matrix(length: int, out_size: int) -> np.ndarray:
    """(out_size, length) weights of Pillow's bilinear resize of a line of ``length`` pixels to ``out_size``:
    a triangle filter widened by the reduction factor (antialiasing), normalised per output pixel, as
    Pillow's ImagingResample precomputes them."""
    scale = length / out_size
    filter_scale = max(scale, 1.0)
    support = filter_scale  # bilinear's support is 1 pixel, times the reduction
    weights = np.zeros((out_size, length))
    for i in range(out_size):
        center = (i + 0.5) * scale
        lo, hi = max(int(center - support + 0.5), 0), min(int(center + support + 0.5), length)
        x = np.arange(lo, hi)
        w = np.clip(1.0 - np.abs((x - center + 0.5) / filter_scale), 0.0, None)
        weights[i, lo:hi] = w / w.sum()
    return weights


def box_resize_matrix(source_size: int, start: int, length: int, out_size: int) -> np.ndarray:
    """(out_size, source_size): the span [start, start + length) of a line of ``source_size`` pixels (black
    where it leaves the line) resized to ``out_size``."""
    weights = bilinear_resize_matrix(length, out_size)
    out = np.zeros((out_size, source_size))
    inside = [(k, start + k) for k in range(length) if 0 <= start + k < source_size]
    for k, j in inside:
        out[:, j] = weights[:, k]
    return out


def ensemble_input(members: list[Preprocessing]) -> Preprocessing:
    """The input of an ensemble of members that preprocess differently: the whole face chip they share, at
    the largest resolution any of them reads, as pixel values in [0, 1]."""
    bases = [{k: v for k, v in (m.crop or {}).items() if k not in BOX_KEYS} for m in members]
    if any(b != bases[0] for b in bases) or any(m.interpolation != "bilinear" for m in members):
        raise ValueError("these members cut their faces from different chips (alignment or margin) or resize "
                         f"other than bilinearly: {[m.to_dict() for m in members]}; an ensemble needs one chip "
                         "that each member's input can be cut from")
    size = max(max(m.image_size for m in members),
               *(int(m.crop.get("chip_size", FAIRFACE_CHIP_SIZE)) for m in members if (m.crop or {}).get("chip_box")))
    return Preprocessing(image_size=size, mean=(0.0, 0.0, 0.0), std=(1.0, 1.0, 1.0), crop=bases[0])


class InputAdapter(nn.Module):
    """A member's input from the ensemble's (``source``: the whole chip, normalised by its mean and std): its
    box of the chip, black outside it, resized as Pillow's bilinear resize does, normalised as it was
    trained. ``target``'s preprocessing is what the member's training transform did to the same chip."""

    def __init__(self, source: Preprocessing, target: Preprocessing):
        super().__init__()
        size = source.image_size
        box = chip_box(target.crop, size, size) or (0, 0, size, size)
        left, top = round(box[0]), round(box[1])  # as data/transforms.ChipBoxCrop rounds it
        width, height = round(box[2] - box[0]), round(box[3] - box[1])
        rows = box_resize_matrix(size, top, height, target.image_size)
        cols = box_resize_matrix(size, left, width, target.image_size)
        self.register_buffer("rows", torch.tensor(rows, dtype=torch.float32), persistent=False)
        self.register_buffer("cols_t", torch.tensor(cols.T.copy(), dtype=torch.float32), persistent=False)
        for name, values in (("source_mean", source.mean), ("source_std", source.std),
                             ("target_mean", target.mean), ("target_std", target.std)):
            self.register_buffer(name, torch.tensor(values, dtype=torch.float32).view(1, 3, 1, 1), persistent=False)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        pixels = images.float() * self.source_std + self.source_mean  # [0, 1], black 0: padding adds nothing
        # Pillow resizes 8-bit images horizontally, then vertically, rounding to 8 bits after each pass.
        across = torch.round(pixels @ self.cols_t * 255.0) / 255.0
        resized = torch.round(self.rows @ across * 255.0) / 255.0
        return ((resized - self.target_mean) / self.target_std).to(images.dtype)


class AveragedProbabilities(nn.Module):
    """log(mean over members of softmax(logits / member temperature)) + offsets: valid logits whose softmax
    is the members' mean calibrated probabilities (shifted by the offsets)."""

    def __init__(self, members: list[nn.Module], temperatures: list[float], offsets: list[float] | None = None,
                 adapters: list[nn.Module] | None = None):
        super().__init__()
        self.members = nn.ModuleList(members)
        self.adapters = nn.ModuleList(adapters or [nn.Identity() for _ in members])
        self.temperatures = [float(t) for t in temperatures]
        self.register_buffer("offsets", torch.tensor(offsets or [0.0], dtype=torch.float32), persistent=False)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        probs = [torch.softmax(member(adapt(images)).float() / t, dim=1)
                 for member, adapt, t in zip(self.members, self.adapters, self.temperatures)]
        mean = torch.stack(probs).mean(dim=0)
        return torch.log(mean.clamp_min(LOG_FLOOR_PROBABILITY)) + self.offsets


def build_ensemble(ensemble: dict, num_classes: int, preprocessing: dict) -> AveragedProbabilities:
    """The network of an ensemble record; ``preprocessing``: the ensemble's input (the checkpoint's)."""
    members = [create_model(m["arch"], num_classes) for m in ensemble["members"]]
    source = Preprocessing.from_dict(preprocessing)
    adapters = [nn.Identity() if m.get("preprocessing") in (None, preprocessing)
                else InputAdapter(source, Preprocessing.from_dict(m["preprocessing"])) for m in ensemble["members"]]
    return AveragedProbabilities(members, [m.get("temperature", 1.0) for m in ensemble["members"]],
                                 ensemble.get("offsets"), adapters)


def describe_ensemble(ensemble: dict) -> str:
    """'the mean calibrated probabilities of 3 models: a/best.pt (torchvision:mobilenet_v2, T 0.942), ...'"""
    parts = [f"`{m['source']}` ({m['arch']}, T {m.get('temperature', 1.0):.3f})" for m in ensemble["members"]]
    return f"the mean calibrated probabilities of {len(parts)} models: {', '.join(parts)}"
