"""Face alignment: cut the crop the model was trained on from a photo, given a face's 5 landmarks.

FairFace's crops are dlib face chips: a similarity transform (rotation, uniform scale, translation) puts
the face's landmarks on dlib's mean face shape, with ``padding`` = 0.25 of the face size on every side.
Here the same geometry is rebuilt for the detector's 5 landmarks (eye centres, nose tip, mouth corners).

The template (``TEMPLATE``, in dlib's normalised face space: the unit square before padding) was derived
empirically: the median landmark positions RetinaFace finds on 1,200 FairFace training crops (which ARE
such chips, padding 0.25), mapped back through the padding. It was cross-checked against dlib's own
68-point ``mean_face_shape`` (interpolation.h, ``get_face_chip_details``; eye centre = mean of the 6 eye
contour points, nose tip = point 30, mouth corners = points 48 and 54): the two agree within 3.5 px on a
224 px chip (``DLIB_MEAN_SHAPE_TEMPLATE``; a test keeps them in agreement). The empirical one is used
because it also absorbs the detector's own landmark conventions (its "eye" is the pupil; its nose point
sits a little lower than dlib's), so a face is put where the training crops had it *as this detector
sees it*.

Face-recognition backbones (``arch: mobilefacenet``) expect ArcFace's 112x112 five-point alignment instead
(``ARCFACE_TEMPLATE``, insightface's ``arcface_dst``). Their crop (``arcface_crop()``, ``template: arcface``)
is described on FairFace's chips: the fixed box ``chip_box`` of a 224 px chip (zero-padded outside it),
scaled to the chip's size, approximates the template (``../shared/weights/README.md``); the model's transform
cuts it (data/transforms.py), so training and evaluation on the released chips need nothing else. From a
photo, ``align_face`` puts the detector's five landmarks where that box holds the template, so the same
transform then gives exactly ArcFace's alignment.
"""
from __future__ import annotations

import math

import cv2
import numpy as np
from PIL import Image

from race_classifier.data.transforms import (
    FAIRFACE_CHIP_SIZE,
    FAIRFACE_MARGIN,
    arcface_crop,
    chip_box,
)

# Median RetinaFace landmarks on 1,200 FairFace chips (224 px, padding 0.25), as fractions of the chip:
# left eye, right eye (image order), nose tip, left and right mouth corner.
_FAIRFACE_CHIP_MEDIANS = np.array([[0.3161, 0.3021], [0.6738, 0.3020], [0.4895, 0.5259],
                                   [0.3472, 0.6844], [0.6473, 0.6861]])
# Back to dlib's unpadded unit face square: chip = (margin + face) / (1 + 2 margin).
TEMPLATE = _FAIRFACE_CHIP_MEDIANS * (1 + 2 * FAIRFACE_MARGIN) - FAIRFACE_MARGIN

# dlib's 68-point mean face shape (points 17-67), for the cross-check described above.
_DLIB_MEAN_X = [0.000213256, 0.0752622, 0.18113, 0.29077, 0.393397, 0.586856, 0.689483, 0.799124, 0.904991,
                0.98004, 0.490127, 0.490127, 0.490127, 0.490127, 0.36688, 0.426036, 0.490127, 0.554217,
                0.613373, 0.121737, 0.187122, 0.265825, 0.334606, 0.260918, 0.182743, 0.645647, 0.714428,
                0.793132, 0.858516, 0.79751, 0.719335, 0.254149, 0.340985, 0.428858, 0.490127, 0.551395,
                0.639268, 0.726104, 0.642159, 0.556721, 0.490127, 0.423532, 0.338094, 0.290379, 0.428096,
                0.490127, 0.552157, 0.689874, 0.553364, 0.490127, 0.42689]
_DLIB_MEAN_Y = [0.106454, 0.038915, 0.0187482, 0.0344891, 0.0773906, 0.0773906, 0.0344891, 0.0187482,
                0.038915, 0.106454, 0.203352, 0.307009, 0.409805, 0.515625, 0.587326, 0.609345, 0.628106,
                0.609345, 0.587326, 0.216423, 0.178758, 0.179852, 0.231733, 0.245099, 0.244077, 0.231733,
                0.179852, 0.178758, 0.216423, 0.244077, 0.245099, 0.780233, 0.745405, 0.727388, 0.742578,
                0.727388, 0.745405, 0.780233, 0.864805, 0.902192, 0.909281, 0.902192, 0.864805, 0.784792,
                0.778746, 0.785343, 0.778746, 0.784792, 0.824182, 0.831803, 0.824182]


def _dlib_template() -> np.ndarray:
    shape = np.stack([_DLIB_MEAN_X, _DLIB_MEAN_Y], axis=1)

    def point(i):
        return shape[i - 17]
    return np.array([shape[36 - 17:42 - 17].mean(axis=0), shape[42 - 17:48 - 17].mean(axis=0),
                     point(30), point(48), point(54)])


DLIB_MEAN_SHAPE_TEMPLATE = _dlib_template()


def chip_template(size: int, margin: float = FAIRFACE_MARGIN) -> np.ndarray:
    """The 5 template points in pixels of a ``size`` px chip with ``margin`` padding (dlib's formula)."""
    return (margin + TEMPLATE) / (1 + 2 * margin) * size


# Weights of the 5 points in the fit. dlib's 5-point chip is fitted to 4 eye corners and the nose base, so
# each eye counts twice and the nose once; the mouth, which dlib ignores, gets half weight as a stabiliser.
# On 400 FairFace chips re-aligned from RetinaFace's landmarks (ideally the identity) this gave the smallest
# deviations (median 5.6% scale, 2.7 deg, 4.2 px at 224 px) of the weightings tried (equal weights:
# 6.4%, 3.5 deg, 5.0 px; eyes and nose only: p90 rotation 12.8 deg).
LANDMARK_WEIGHTS = np.array([2.0, 2.0, 1.0, 0.5, 0.5])


def similarity_transform(src: np.ndarray, dst: np.ndarray, weights=None) -> np.ndarray:
    """The 2x3 similarity (rotation, uniform scale, translation) mapping ``src`` onto ``dst`` in the
    (weighted) least-squares sense (Umeyama 1991, reflection excluded)."""
    src, dst = np.asarray(src, dtype=np.float64), np.asarray(dst, dtype=np.float64)
    w = np.ones(len(src)) if weights is None else np.asarray(weights, dtype=np.float64)
    w = w / w.sum()
    mu_s, mu_d = w @ src, w @ dst
    s_c, d_c = src - mu_s, dst - mu_d
    cov = (w[:, None] * d_c).T @ s_c
    u, sig, vt = np.linalg.svd(cov)
    d = np.diag([1.0, np.sign(np.linalg.det(u) * np.linalg.det(vt)) or 1.0])
    rotation = u @ d @ vt
    var_s = float(w @ (s_c ** 2).sum(axis=1))
    scale = float(np.trace(np.diag(sig) @ d) / var_s) if var_s > 0 else 1.0
    translation = mu_d - scale * rotation @ mu_s
    return np.hstack([scale * rotation, translation[:, None]])


def _warp(rgb: np.ndarray, matrix: np.ndarray, size: int) -> Image.Image:
    """``rgb`` warped by ``matrix`` into a ``size`` px square; outside the photo is black, as in dlib.

    A face much larger than the chip is first warped at a multiple of the size and then area-averaged
    down, so the chip is not aliased (FairFace's chips were resampled smoothly too)."""
    scale = math.hypot(matrix[0, 0], matrix[0, 1])
    factor = min(4, max(1, int(1.0 / scale + 1e-6))) if scale > 0 else 1  # 1 unless shrinking 2x or more
    big = size * factor
    # Output pixel u of the chip is the mean of big pixels f*u .. f*u+f-1, centred at f*u + (f-1)/2.
    m = matrix * factor
    m[:, 2] += (factor - 1) / 2
    out = cv2.warpAffine(rgb, m, (big, big), flags=cv2.INTER_LINEAR, borderMode=cv2.BORDER_CONSTANT,
                         borderValue=(0, 0, 0))
    if factor > 1:
        out = cv2.resize(out, (size, size), interpolation=cv2.INTER_AREA)
    return Image.fromarray(out)


# ArcFace's five-point template for a 112x112 crop, in pixels: left eye, right eye (image order), nose tip,
# left and right mouth corner (insightface's arcface_dst).
ARCFACE_SIZE = 112
ARCFACE_TEMPLATE = np.array([[38.2946, 51.6963], [73.5318, 51.5014], [56.0252, 71.7366], [41.5493, 92.3655],
                             [70.7299, 92.2041]])
def crop_template(crop: dict | None) -> str:
    """The alignment a model expects: 'fairface' (dlib's chip, the default) or 'arcface'."""
    template = (crop or {}).get("template", "fairface")
    if template not in ("fairface", "arcface"):
        raise ValueError(f"unknown crop template {template!r} (this version knows fairface and arcface)")
    return template


def arcface_matrix(landmarks, size: int = ARCFACE_SIZE) -> np.ndarray:
    """The 2x3 similarity putting five landmarks on ArcFace's template in a ``size`` px crop (least squares,
    equal weights, as insightface's ``estimate_norm``)."""
    return similarity_transform(np.asarray(landmarks, dtype=np.float64), ARCFACE_TEMPLATE * (size / ARCFACE_SIZE))


def align_arcface(rgb: np.ndarray, landmarks, size: int = ARCFACE_SIZE) -> Image.Image:
    """ArcFace's aligned ``size`` px crop, cut directly from an RGB photo (black outside it)."""
    return _warp(np.ascontiguousarray(rgb), arcface_matrix(landmarks, size), size)


def arcface_chip_points(crop: dict | None, size: int) -> np.ndarray:
    """Where ArcFace's template points lie on a ``size`` px chip whose ``chip_box`` is the model's input."""
    x0, y0, x1, y1 = chip_box({**arcface_crop(), **(crop or {})}, size, size)
    return np.array([x0, y0]) + ARCFACE_TEMPLATE / ARCFACE_SIZE * np.array([x1 - x0, y1 - y0])


def crop_geometry(crop: dict | None) -> tuple[bool, float]:
    """(aligned, margin) from a Preprocessing.crop dict; a model that names none is given FairFace's."""
    crop = crop or {}
    return bool(crop.get("aligned", True)), float(crop.get("margin", FAIRFACE_MARGIN))


def align_face(rgb: np.ndarray, landmarks, crop: dict | None = None, size: int = FAIRFACE_CHIP_SIZE,
               box=None) -> Image.Image:
    """The face chip the model expects, cut from the full-resolution RGB photo.

    ``crop`` is the model's ``Preprocessing.crop``: ``aligned`` (landmark alignment, FairFace's) or not
    (a square around the detector's box, widened by ``margin`` on every side, upright). With ``template``
    arcface, the landmarks go where ArcFace's template lies in the chip's ``chip_box``, which the model's
    transform then cuts out."""
    aligned, margin = crop_geometry(crop)
    if crop_template(crop) == "arcface":
        matrix = similarity_transform(np.asarray(landmarks, dtype=np.float64), arcface_chip_points(crop, size))
    elif aligned:
        matrix = similarity_transform(np.asarray(landmarks, dtype=np.float64), chip_template(size, margin),
                                      LANDMARK_WEIGHTS)
    else:
        if box is None:
            raise ValueError("an unaligned crop needs the face box")
        x1, y1, x2, y2 = box
        side = max(x2 - x1, y2 - y1) * (1 + 2 * margin)
        cx, cy, s = (x1 + x2) / 2, (y1 + y2) / 2, size / side
        matrix = np.array([[s, 0, size / 2 - s * cx], [0, s, size / 2 - s * cy]])
    return _warp(np.ascontiguousarray(rgb), matrix, size)
