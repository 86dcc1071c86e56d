"""The embedded smoke-test dataset: abstract patterns, generated on the spot, in the brief's folder layout.

Deliberately not faces and not skin tones: its classes are stripes, checks, rings and dots, drawn in
saturated greens, blues and purples. It exists to exercise the pipeline end to end without a download;
accuracy on it says nothing about faces.
"""
from __future__ import annotations

import colorsys
from pathlib import Path

import numpy as np
from PIL import Image

PATTERNS = ("stripes", "checks", "rings", "dots")
SMOKE_BANNER = ("SMOKE RUN on synthetic abstract patterns (stripes, checks, rings, dots), not faces: "
                "its accuracy means nothing about race classification.")


def _colour(rng: np.random.Generator) -> np.ndarray:
    hue = rng.uniform(0.3, 0.85)  # green through purple: far from any skin tone
    return np.array(colorsys.hsv_to_rgb(hue, rng.uniform(0.6, 1.0), rng.uniform(0.6, 1.0))) * 255


def render(pattern: str, size: int, rng: np.random.Generator, style: dict) -> np.ndarray:
    """One image of ``pattern``; ``style`` (frequency, angle, colours) is shared by an 'identity'."""
    y, x = np.mgrid[0:size, 0:size].astype(np.float64) / size
    x, y = x + rng.uniform(-0.1, 0.1), y + rng.uniform(-0.1, 0.1)  # each image shifted a little
    f, a = style["frequency"], style["angle"]
    u = x * np.cos(a) + y * np.sin(a)
    v = -x * np.sin(a) + y * np.cos(a)
    if pattern == "stripes":
        mask = np.sin(2 * np.pi * f * u) > 0
    elif pattern == "checks":
        mask = (np.sin(2 * np.pi * f * u) > 0) ^ (np.sin(2 * np.pi * f * v) > 0)
    elif pattern == "rings":
        mask = np.sin(2 * np.pi * f * np.hypot(x - 0.5, y - 0.5)) > 0
    elif pattern == "dots":
        mask = (np.sin(2 * np.pi * f * u) * np.sin(2 * np.pi * f * v)) > 0.5
    else:
        raise ValueError(f"unknown pattern {pattern!r}")
    image = np.where(mask[..., None], style["fg"], style["bg"])
    image += rng.normal(0, 12, image.shape)
    return np.clip(image, 0, 255).astype(np.uint8)


def generate(root: str | Path, identities_per_class: int = 24, images_per_identity: int = 3,
             size: int = 48, seed: int = 0) -> Path:
    """Write ``root/<pattern>/<identity>/<n>.png`` and return root."""
    root = Path(root)
    rng = np.random.default_rng(seed)
    for pattern in PATTERNS:
        for identity in range(identities_per_class):
            style = {"frequency": rng.uniform(3, 7), "angle": rng.uniform(0, np.pi),
                     "fg": _colour(rng), "bg": _colour(rng)}
            folder = root / pattern / f"id{identity:03d}"
            folder.mkdir(parents=True, exist_ok=True)
            for n in range(images_per_identity):
                Image.fromarray(render(pattern, size, rng, style)).save(folder / f"{n}.png")
    return root
