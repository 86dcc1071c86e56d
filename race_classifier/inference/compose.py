"""Test photos with known faces: face crops pasted, scaled and rotated, onto a larger canvas.

Used by the tests and ``bench/predict_latency.py`` to measure detection recall and end-to-end speed on
real faces (FairFace crops) without shipping any photo: where each face went is known exactly.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from PIL import Image


@dataclass(frozen=True)
class Placement:
    """Where a crop went: its centre, its side after scaling (before rotation), and the rotation."""
    centre: tuple[float, float]
    side: int
    angle: float


def _background(size: tuple[int, int], kind: str, rng: np.random.Generator) -> Image.Image:
    w, h = size
    if kind == "noise":  # low-frequency coloured noise: texture without face-like structure
        small = rng.integers(60, 200, size=(h // 16 + 1, w // 16 + 1, 3), dtype=np.uint8)
        img = Image.fromarray(small).resize((w, h), Image.Resampling.BILINEAR)
        grain = rng.normal(0, 6, size=(h, w, 3))
        return Image.fromarray(np.clip(np.asarray(img, dtype=np.float64) + grain, 0, 255).astype(np.uint8))
    return Image.new("RGB", size, (128, 128, 128))


def compose_photo(crops: list[Image.Image], size: tuple[int, int] = (640, 480), side_range=(100, 200),
                  max_angle: float = 10.0, background: str = "noise", seed: int = 0,
                  grid: tuple[int, int] = (2, 2)) -> tuple[Image.Image, list[Placement]]:
    """Paste up to columns x rows crops, one per cell of a ``grid`` (so they never overlap), each scaled to a
    side in ``side_range`` and rotated by up to ``max_angle`` degrees. Returns the photo and the placements."""
    columns, rows = grid
    if not 1 <= len(crops) <= columns * rows:
        raise ValueError(f"compose_photo places 1 to {columns * rows} crops on a {columns}x{rows} grid")
    rng = np.random.default_rng(seed)
    canvas = _background(size, background, rng)
    cell_w, cell_h = size[0] // columns, size[1] // rows
    placements = []
    for i, crop in enumerate(crops):
        side = int(rng.integers(side_range[0], side_range[1] + 1))
        angle = float(rng.uniform(-max_angle, max_angle))
        face = crop.convert("RGB").resize((side, side), Image.Resampling.LANCZOS)
        rotated = face.rotate(angle, resample=Image.Resampling.BICUBIC, expand=True)
        mask = Image.new("L", face.size, 255).rotate(angle, resample=Image.Resampling.BICUBIC, expand=True)
        rw, rh = rotated.size
        cx0, cy0 = (i % columns) * cell_w, (i // columns) * cell_h
        # Random position inside the cell, the crop kept whole when it fits.
        x = cx0 + int(rng.integers(0, max(1, cell_w - rw + 1)))
        y = cy0 + int(rng.integers(0, max(1, cell_h - rh + 1)))
        canvas.paste(rotated, (x, y), mask)
        placements.append(Placement((x + rw / 2, y + rh / 2), side, angle))
    return canvas, placements
