"""Preprocessing: the one description of how a face image becomes a model input.

A ``Preprocessing`` travels inside every checkpoint (``to_dict``), so whoever loads the model
preprocesses exactly as training did. Transforms are timm's, built from it.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, field

from timm.data import create_transform
from torchvision import transforms

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
FAIRFACE_MARGIN = 0.25
FAIRFACE_CHIP_SIZE = 224  # the released crops' size: chips are cut at it, then the model's transform resizes
# On a 224 px FairFace chip (padding 0.25), the square (x0, y0, x1, y1) that approximates ArcFace's 112x112
# five-point alignment (inference/align.py's ARCFACE_TEMPLATE; ../shared/weights/README.md).
FAIRFACE_ARCFACE_BOX = (-10, -41, 231, 200)


def arcface_crop() -> dict:
    """Preprocessing.crop for ArcFace-aligned models: FairFace-geometry chips (aligned, margin 0.25) cut to
    ``chip_box`` (pixels of a ``chip_size`` px chip, scaled to the chip's size; black outside it)."""
    return {"aligned": True, "margin": FAIRFACE_MARGIN, "template": "arcface",
            "chip_box": list(FAIRFACE_ARCFACE_BOX), "chip_size": FAIRFACE_CHIP_SIZE}


def chip_box(crop: dict | None, width: int, height: int) -> tuple[float, float, float, float] | None:
    """The box of a ``width`` x ``height`` chip the model's input is cut from (``crop["chip_box"]``, scaled
    from its ``chip_size``), or None when the model takes the whole chip."""
    box = (crop or {}).get("chip_box")
    if not box:
        return None
    reference = float((crop or {}).get("chip_size", FAIRFACE_CHIP_SIZE))
    x0, y0, x1, y1 = (float(v) for v in box)
    sx, sy = width / reference, height / reference
    return x0 * sx, y0 * sy, x1 * sx, y1 * sy


@dataclass(frozen=True)
class Preprocessing:
    image_size: int = 224
    mean: tuple[float, float, float] = IMAGENET_MEAN
    std: tuple[float, float, float] = IMAGENET_STD
    interpolation: str = "bilinear"
    # Geometry of the face crops the model was trained on; inference must cut crops the same way.
    # FairFace's crops: dlib 5-landmark aligned chips with padding 0.25 around the face. Face-recognition
    # backbones: inference/align.py's arcface_crop(), ArcFace's 112x112 alignment as a box of such a chip.
    crop: dict = field(default_factory=lambda: {"aligned": True, "margin": 0.25})

    def to_dict(self) -> dict:
        d = asdict(self)
        d["mean"], d["std"] = list(self.mean), list(self.std)
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "Preprocessing":
        return cls(image_size=int(d["image_size"]), mean=tuple(d["mean"]), std=tuple(d["std"]),
                   interpolation=d.get("interpolation", "bilinear"), crop=dict(d.get("crop") or {}))


@dataclass(frozen=True)
class Augmentation:
    """Training-only augmentation: mild, since a face crop is already framed."""
    hflip: float = 0.5
    scale: tuple[float, float] = (0.8, 1.0)
    ratio: tuple[float, float] = (0.9, 1.1)
    color_jitter: float = 0.2


class ChipBoxCrop:
    """The part of a face chip the model takes (``Preprocessing.crop["chip_box"]``, scaled to the chip's
    size), black where the box leaves the chip: e.g. ArcFace's alignment out of a FairFace chip."""

    def __init__(self, crop: dict):
        self.crop = dict(crop)

    def __call__(self, image):
        x0, y0, x1, y1 = chip_box(self.crop, *image.size)
        left, top = round(x0), round(y0)
        return image.crop((left, top, left + round(x1 - x0), top + round(y1 - y0)))

    def __repr__(self) -> str:
        return f"ChipBoxCrop({self.crop.get('chip_box')} of {self.crop.get('chip_size')} px)"


def build_transform(pre: Preprocessing, train: bool, aug: Augmentation | None = None):
    transform = _timm_transform(pre, train, aug)
    if (pre.crop or {}).get("chip_box"):  # before anything else, augmentation included: as the model's input
        return transforms.Compose([ChipBoxCrop(pre.crop), *transform.transforms])
    return transform


def _timm_transform(pre: Preprocessing, train: bool, aug: Augmentation | None):
    if train:
        aug = aug or Augmentation()
        return create_transform(pre.image_size, is_training=True, scale=aug.scale, ratio=aug.ratio,
                                hflip=aug.hflip, color_jitter=aug.color_jitter,
                                interpolation=pre.interpolation, mean=pre.mean, std=pre.std)
    # crop_pct 1.0: resize the shorter side to the input size and keep the whole (square) face crop.
    return create_transform(pre.image_size, is_training=False, crop_pct=1.0,
                            interpolation=pre.interpolation, mean=pre.mean, std=pre.std)
