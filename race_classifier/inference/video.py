"""Faces in video files and camera streams, frame by frame, through OpenCV (opencv-python-headless).

Every ``every``-th frame is classified (detect + align + classify); an annotated copy of the video can be
written with the latest boxes and labels (and gender / age group, for a model with those heads) drawn on
every frame. The speed achieved is reported as frames
processed per second of wall time.
"""
from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import cv2
import numpy as np

from race_classifier.data.image_io import load_rgb
from race_classifier.inference.classifier import (
    Classifier,
    FacePrediction,
    ImagePrediction,
)
from race_classifier.utils import atomic_write_bytes, sibling_temp_file

log = logging.getLogger(__name__)

_FONT, _FONT_SCALE = cv2.FONT_HERSHEY_SIMPLEX, 0.5


@dataclass
class FrameResult:
    frame: int
    time_s: float
    prediction: ImagePrediction


@dataclass
class VideoResult:
    source: str
    frames: list[FrameResult] = field(default_factory=list)
    frames_read: int = 0
    seconds: float = 0.0
    source_fps: float | None = None

    @property
    def fps(self) -> float:
        """Frames classified per second of wall time."""
        return len(self.frames) / self.seconds if self.seconds > 0 else 0.0


def open_capture(source: str | int):
    """A cv2.VideoCapture on a file, or on a camera given by its index ("0", "1", ...)."""
    if isinstance(source, str) and source.isdigit():
        source = int(source)
    elif not isinstance(source, int) and not Path(str(source)).is_file():
        raise FileNotFoundError(f"video not found: {source}")
    cap = cv2.VideoCapture(source)
    if not cap.isOpened():
        cap.release()
        raise ValueError(f"cannot open video {source!r} (not a video OpenCV can decode, or no such camera)")
    return cap


def _temporary_path(path: str | Path) -> Path:
    """A new file beside ``path``, with its suffix (OpenCV picks the container by it), to be renamed onto it."""
    if Path(path).is_dir():
        raise ValueError(f"cannot write video {path}: it is a folder")
    return sibling_temp_file(path, suffix=f".tmp{Path(path).suffix}")


def _writer(path: str | Path, fps: float, size: tuple[int, int], shown: str | Path | None = None):
    path = Path(path)
    fourcc = "MJPG" if path.suffix.lower() == ".avi" else "mp4v"
    writer = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*fourcc), fps, size)
    if not writer.isOpened():
        raise ValueError(f"cannot write video {shown or path} with codec {fourcc} (use .mp4 or .avi)")
    return writer


def caption(face: FacePrediction) -> str:
    """'White 0.91', or with gender / age-group heads 'White 0.91 | Male 0.88 | Adult 0.75'."""
    parts = [f"{face.label} {face.confidence:.2f}"]
    if face.gender is not None:
        parts.append(f"{face.gender} {face.gender_confidence:.2f}")
    if face.age_group is not None:
        parts.append(f"{face.age_group} {face.age_confidence:.2f}")
    return " | ".join(parts)  # ASCII only: OpenCV's Hershey fonts have no other glyphs


def draw(frame_bgr: np.ndarray, prediction: ImagePrediction | None) -> np.ndarray:
    """Boxes, landmarks and each face's ``caption`` drawn on a BGR frame (in place)."""
    for face in (prediction.faces if prediction else []):
        if face.box is None:
            continue
        x1, y1, x2, y2 = (int(round(v)) for v in face.box)
        cv2.rectangle(frame_bgr, (x1, y1), (x2, y2), (0, 200, 255), 2)
        for x, y in face.landmarks or ():
            cv2.circle(frame_bgr, (int(x), int(y)), 2, (0, 255, 0), -1)
        text = caption(face)
        (w, h), baseline = cv2.getTextSize(text, _FONT, _FONT_SCALE, 1)
        origin = caption_origin((x1, y1), (w, h + baseline), frame_bgr.shape[1::-1])
        cv2.putText(frame_bgr, text, origin, _FONT, _FONT_SCALE, (0, 200, 255), 1, cv2.LINE_AA)
    return frame_bgr


def caption_origin(top_left: tuple[int, int], text_size: tuple[int, int],
                   frame_size: tuple[int, int], gap: int = 6) -> tuple[int, int]:
    """Where a box's caption starts (``cv2.putText``'s bottom-left corner): ``gap`` px above the box, or
    ``gap`` px inside its top edge where the frame has no room above (a face at the top of a photo), and
    moved left so that it ends inside the frame. ``text_size`` is (width, height below and above the
    baseline together); ``frame_size`` is (width, height)."""
    (x1, y1), (w, h), (frame_w, frame_h) = top_left, text_size, frame_size
    y = y1 - gap if y1 - gap - h >= 0 else min(y1 + gap + h, frame_h - 1)
    return max(0, min(x1, frame_w - w)), y


def annotate_photo(prediction: ImagePrediction, out: str | Path) -> None:
    """A copy of the photo ``prediction`` was made from with its faces ``draw``n on it, written atomically
    (the format from ``out``'s suffix)."""
    bgr = np.ascontiguousarray(np.asarray(load_rgb(prediction.source))[:, :, ::-1])
    ok, encoded = cv2.imencode(Path(out).suffix.lower() or ".jpg", draw(bgr, prediction))
    if not ok:
        raise ValueError(f"cannot write the annotated photo {out}: use .jpg or .png")
    atomic_write_bytes(out, encoded.tobytes())


def predict_video(clf: Classifier, source: str | int, *, every: int = 1, annotate: str | Path | None = None,
                  max_frames: int | None = None,
                  on_frame: Callable[[FrameResult], None] | None = None) -> VideoResult:
    """Classify the faces of every ``every``-th frame of ``source`` (a file or a camera index)."""
    every = max(1, every)
    cap = open_capture(source)
    fps_in = cap.get(cv2.CAP_PROP_FPS) or 0.0
    result = VideoResult(str(source), source_fps=fps_in or None)
    writer, latest = None, None
    partial, done = None, False
    started = time.perf_counter()
    try:
        # The annotated copy is written beside its name and renamed onto it once complete: never half a video.
        partial = _temporary_path(annotate) if annotate else None
        while max_frames is None or result.frames_read < max_frames:
            ok, frame = cap.read()
            if not ok:
                break
            index = result.frames_read
            result.frames_read += 1
            if index % every == 0:
                latest = clf.predict(frame, channels="BGR")  # OpenCV decodes to BGR
                latest.source = f"{source}#{index}"
                item = FrameResult(index, index / fps_in if fps_in else 0.0, latest)
                result.frames.append(item)
                if on_frame:
                    on_frame(item)
            if annotate:
                if writer is None:
                    writer = _writer(partial, fps_in or 25.0, (frame.shape[1], frame.shape[0]), shown=annotate)
                writer.write(draw(frame, latest))
        done = True
    finally:
        cap.release()
        if writer is not None:
            writer.release()
        if partial is not None:
            if done and writer is not None:
                os.replace(partial, annotate)
            else:
                partial.unlink(missing_ok=True)
    result.seconds = time.perf_counter() - started
    if result.frames_read == 0:
        raise ValueError(f"no frames could be read from {source!r}")
    return result
