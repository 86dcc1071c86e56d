"""The Python API for classifying faces in new photos: detect, align, classify.

    from race_classifier import Classifier
    clf = Classifier.load()                      # the bundled seed5 model; or "fairface7", or a model file
    result = clf.predict("group.jpg")            # or a PIL image, or an array with channels="RGB"/"BGR"
    for face in result.faces:
        print(face.box, face.label, face.confidence)
        print(face.gender, face.age_group)       # models with gender / age-group heads; None otherwise

Every model format ``load_predictor`` knows works. Crops are cut with the geometry the model was trained
on (``Preprocessing.crop``), from the full-resolution photo, and classified in batches across images.
A model with gender / age-group heads gives every head from the same forward pass; only race abstains.
The labels are perceived, socially constructed categories, not facts about a person.
"""
from __future__ import annotations

import logging
from collections.abc import Iterable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageOps

from race_classifier.data.image_io import ImageLoadError, _to_rgb, load_rgb
from race_classifier.data.transforms import build_transform
from race_classifier.heads import HeadLayout
from race_classifier.inference.align import FAIRFACE_CHIP_SIZE, align_face
from race_classifier.inference.detector import Face, FaceDetector
from race_classifier.models.loaders import Predictor, load_predictor

log = logging.getLogger(__name__)

UNCERTAIN = "uncertain"
CHANNEL_ORDERS = ("RGB", "BGR", "RGBA", "BGRA")
# A face's result fields for each head besides race: (label, confidence, probabilities).
HEAD_FIELDS = {"gender": ("gender", "gender_confidence", "gender_probabilities"),
               "age": ("age_group", "age_confidence", "age_probabilities")}


@dataclass
class FacePrediction:
    """One face: where it is (``None`` for a whole image given as a crop) and what the model says.

    ``label`` is ``"uncertain"`` when ``confidence`` is below the classifier's ``min_confidence``;
    ``top_label`` is always the most probable class. A model with gender / age-group heads also gives each
    head's most probable class, its calibrated probability and all its classes' (``HEAD_FIELDS``); these
    never abstain, and are None (and left out of ``to_dict``) for a race-only model."""
    index: int
    box: tuple[float, float, float, float] | None
    landmarks: tuple[tuple[float, float], ...] | None
    score: float | None  # detection score
    label: str
    confidence: float
    top_label: str
    probabilities: dict[str, float]
    gender: str | None = None
    gender_confidence: float | None = None
    gender_probabilities: dict[str, float] | None = None
    age_group: str | None = None
    age_confidence: float | None = None
    age_probabilities: dict[str, float] | None = None

    def to_dict(self) -> dict:
        absent = {f for fields in HEAD_FIELDS.values() for f in fields if getattr(self, f) is None}
        return {k: v for k, v in asdict(self).items() if k not in absent}  # race-only output as before heads


@dataclass
class ImagePrediction:
    """All faces of one image, best detection first; ``error`` says why an image gave no result."""
    source: str
    faces: list[FacePrediction] = field(default_factory=list)
    error: str | None = None
    width: int | None = None
    height: int | None = None

    @property
    def status(self) -> str:
        return "error" if self.error else ("ok" if self.faces else "no_face")

    def to_dict(self) -> dict:
        return {**asdict(self), "faces": [f.to_dict() for f in self.faces], "status": self.status}


@dataclass
class _Pending:
    """An image on its way through the pipeline: its result, and its face chips awaiting the model."""
    result: ImagePrediction
    faces: list[Face | None]
    chips: list[Image.Image]


def to_rgb_array(x, channels: str | None = None) -> np.ndarray:
    """An (H, W, 3) uint8 RGB array from a path, a PIL image, or an array whose channel order is stated."""
    if isinstance(x, (str, Path)):
        return np.asarray(load_rgb(x))
    if isinstance(x, Image.Image):
        try:  # a PIL image decodes lazily: truncated or corrupt data fails only here
            return np.asarray(_to_rgb(ImageOps.exif_transpose(x)))  # exif_transpose drops the tag: no double turn
        except (OSError, ValueError, SyntaxError, EOFError) as e:
            raise ImageLoadError(_describe(x), f"unreadable image ({e})") from None
    if isinstance(x, np.ndarray):
        return _array_to_rgb(x, channels)
    raise TypeError(f"expected a path, a PIL image or a numpy array, got {type(x).__name__}")


def _array_to_rgb(a: np.ndarray, channels: str | None) -> np.ndarray:
    if a.dtype != np.uint8:
        raise ValueError(f"image arrays must be uint8 (0-255), got {a.dtype}")
    if a.ndim == 2:  # greyscale: no channel order to state
        return np.repeat(a[:, :, None], 3, axis=2)
    if a.ndim != 3 or a.shape[2] not in (3, 4):
        raise ValueError(f"image arrays must be (H, W), (H, W, 3) or (H, W, 4), got {a.shape}")
    # Stated explicitly: OpenCV gives BGR, PIL/matplotlib RGB, and a wrong guess silently changes skin tones.
    if channels is None or channels.upper() not in CHANNEL_ORDERS:
        raise ValueError(f"say the array's channel order: channels='RGB' or 'BGR' (got {channels!r})")
    if channels.upper().startswith("BGR"):
        a = a[:, :, [2, 1, 0, 3]] if a.shape[2] == 4 else a[:, :, ::-1]
    if a.shape[2] == 4:  # transparency composited on mid-grey, as for a file or a PIL image (_to_rgb)
        return np.asarray(_to_rgb(Image.fromarray(np.ascontiguousarray(a), "RGBA")))
    return np.ascontiguousarray(a)


def _describe(x) -> str:
    if isinstance(x, (str, Path)):
        return str(x)
    return getattr(x, "filename", "") or f"<{type(x).__name__}>"


class Classifier:
    """Faces in photos, classified by one model.

    ``detect``: find faces (default) or take every input as one face crop. ``min_face``: faces whose box
    is smaller (shorter side, in pixels of the photo) are ignored. ``min_confidence``: below it a face is
    labelled ``uncertain``. ``detect_size``: photos are shrunk so their longer side is at most this for
    detection (crops are still cut from the full-resolution photo). ``batch_size``: crops per model call.
    """

    def __init__(self, predictor: Predictor, *, detector: FaceDetector | None = None, detect: bool = True,
                 min_face: int = 32, min_confidence: float | None = None, batch_size: int = 32,
                 detect_size: int = 480, detect_threshold: float = 0.5):
        self.predictor = predictor
        self.detect, self.min_face, self.min_confidence = detect, min_face, min_confidence
        self.batch_size = max(1, batch_size)
        self._detector, self._detector_options = detector, dict(max_side=detect_size,
                                                                score_threshold=detect_threshold)
        self.transform = build_transform(predictor.preprocessing, train=False)
        # Chips are cut at FairFace's released size (or larger), then resized by the model's own transform,
        # exactly as the training crops were.
        self.chip_size = max(FAIRFACE_CHIP_SIZE, predictor.preprocessing.image_size)

    @classmethod
    def load(cls, path: str | Path | None = None, *, labels=None, image_size: int | None = None, mean=None, std=None,
             device: str = "cpu", abstain: bool = False, tta: bool = False, amp: str = "off",
             **options) -> "Classifier":
        """A classifier for any model file ``load_predictor`` reads, or a bundled model's name (``seed5``, the
        default, or ``fairface7``); ``options`` as for ``Classifier``.

        ``abstain``: faces below the model's stored abstention threshold (fitted on validation data) are
        labelled ``uncertain``; an explicit ``min_confidence`` wins over it. ``tta``: each face's
        probabilities are the mean of its crop's and the mirrored crop's (two model passes). ``amp``: as for
        ``load_predictor``."""
        predictor = load_predictor(path, labels=labels, image_size=image_size, mean=mean, std=std, device=device,
                                   tta=tta, amp=amp)
        if abstain and options.get("min_confidence") is None:
            if predictor.abstention_threshold is None:
                raise ValueError(f"{path} has no stored abstention threshold: calibrate it with "
                                 "`race-classifier calibrate` (or give --min_confidence)")
            options["min_confidence"] = predictor.abstention_threshold
        return cls(predictor, **options)

    @property
    def classes(self) -> tuple[str, ...]:
        return tuple(self.predictor.taxonomy.classes)

    @property
    def heads(self) -> HeadLayout:
        return self.predictor.heads

    def heads_description(self) -> dict:
        """{head: {"classes": [...]}} for the heads besides race (age groups with their years, e.g.
        'Teen (13-19)', as "groups"); {} for a race-only model."""
        out = {}
        for head in self.heads.extra:
            out[head.name] = {"classes": list(head.classes)}
            if head.name == "age" and self.heads.age_bins:
                out[head.name]["groups"] = self.heads.age_bins.describe()
        return out

    @property
    def detector(self) -> FaceDetector:
        if self._detector is None:  # built on first use: --no_detect never needs it
            self._detector = FaceDetector(**self._detector_options)
        return self._detector

    # --- public API -----------------------------------------------------------------------------------

    def predict(self, x, channels: str | None = None) -> ImagePrediction:
        """One image: a path, a PIL image, or a uint8 array with ``channels="RGB"`` or ``"BGR"``."""
        return self.predict_batch([x], channels=channels)[0]

    def predict_batch(self, xs: Iterable, channels: str | None = None) -> list[ImagePrediction]:
        return list(self.iter_predict(xs, channels=channels))

    def iter_predict(self, xs: Iterable, channels: str | None = None) -> Iterator[ImagePrediction]:
        """Results in input order, streamed: images are gathered until they hold ``batch_size`` crops,
        which go through the model together. An unreadable image yields an error result; the rest go on."""
        pending: list[_Pending] = []
        for x in xs:
            pending.append(self._prepare(x, channels))
            if sum(len(p.chips) for p in pending) >= self.batch_size:
                yield from self._classify(pending)
                pending = []
        yield from self._classify(pending)

    # --- pipeline -------------------------------------------------------------------------------------

    def _prepare(self, x, channels: str | None) -> _Pending:
        result = ImagePrediction(_describe(x))
        try:
            rgb = to_rgb_array(x, channels)
        except ImageLoadError as e:
            result.error = e.reason
            return _Pending(result, [], [])
        result.height, result.width = rgb.shape[:2]
        if not self.detect:
            return _Pending(result, [None], [Image.fromarray(rgb)])
        faces = [f for f in self.detector.detect(rgb) if min(f.width, f.height) >= self.min_face]
        crop = self.predictor.preprocessing.crop
        chips = [align_face(rgb, f.landmarks, crop, self.chip_size, box=f.box) for f in faces]
        return _Pending(result, faces, chips)

    def classify_chips(self, chips: list[Image.Image]) -> np.ndarray:
        """Race class probabilities (N, K) for face chips already cut, in batches of ``batch_size``."""
        return self.classify_chips_heads(chips)["race"]

    def classify_chips_heads(self, chips: list[Image.Image]) -> dict[str, np.ndarray]:
        """{head: calibrated probabilities (N, classes)} for face chips already cut: every head of a batch
        from one forward pass (``Predictor.predict_heads``)."""
        out = {head.name: [] for head in self.heads.heads}
        for i in range(0, len(chips), self.batch_size):
            batch = torch.stack([self.transform(c) for c in chips[i:i + self.batch_size]])
            for name, probs in self.predictor.predict_heads(batch).items():
                out[name].append(probs)
        return {head.name: np.concatenate(out[head.name]) if out[head.name]
                else np.zeros((0, len(head.classes)), dtype=np.float32) for head in self.heads.heads}

    def _classify(self, pending: list[_Pending]) -> Iterator[ImagePrediction]:
        probs = self.classify_chips_heads([c for p in pending for c in p.chips])
        k = 0
        for p in pending:
            for i, face in enumerate(p.faces):
                p.result.faces.append(self._face_prediction(i, face, {name: v[k] for name, v in probs.items()}))
                k += 1
            yield p.result

    def _face_prediction(self, index: int, face: Face | None, probs: dict[str, np.ndarray]) -> FacePrediction:
        race = probs["race"]
        top = int(np.argmax(race))
        confidence = float(race[top])
        label = self.classes[top]
        if self.min_confidence is not None and confidence < self.min_confidence:
            label = UNCERTAIN
        extra = {}
        for head in self.heads.extra:  # no abstention: the threshold was fitted for race only
            label_field, confidence_field, probs_field = HEAD_FIELDS[head.name]
            p = probs[head.name]
            best = int(np.argmax(p))
            extra.update({label_field: head.classes[best], confidence_field: float(p[best]),
                          probs_field: {c: float(v) for c, v in zip(head.classes, p)}})
        return FacePrediction(
            index=index, box=None if face is None else tuple(round(v, 1) for v in face.box),
            landmarks=None if face is None else tuple((round(x, 1), round(y, 1)) for x, y in face.landmarks),
            score=None if face is None else round(face.score, 4), label=label, confidence=confidence,
            top_label=self.classes[top], probabilities={c: float(v) for c, v in zip(self.classes, race)}, **extra)
