"""``race-classifier predict``: classify the faces in photos, folders, lists of files, or a video.

    race-classifier predict group.jpg                       # the bundled seed5 model, CSV on standard output
    race-classifier predict photos/ group.jpg list.txt --model_path best.pt --output faces.csv
    find . -name '*.jpg' | race-classifier predict - --model_path fairface7 --output faces.json
    race-classifier predict --video clip.mp4 --every 5 --annotate annotated.mp4 --model_path best.pt

One row per face (image, face index, box, 5 landmarks, detection score, label, confidence, one
probability per class; for a model with gender / age-group heads also gender, gender_confidence, age_group,
age_confidence and their classes' probabilities); an image without a face, or one that cannot be read, gets
one row that says so.

Exit status (``EXIT_STATUS``): 0 every input was read (images without a face included); 1 some inputs could
not be read (missing, not an image), the others were classified; 3 no input could be read; 2 bad usage (an
unknown flag, a bad value, no input at all, an unreadable model file). With 1 and 3 the output is still written,
with a row saying ``error`` for each input that failed.
"""
from __future__ import annotations

import csv
import io
import json
import logging
import sys
from pathlib import Path

import torch

from race_classifier.heads import Head
from race_classifier.inference.classifier import (
    HEAD_FIELDS,
    Classifier,
    ImagePrediction,
)
from race_classifier.inference.video import annotate_photo, predict_video
from race_classifier.utils import atomic_write_text

log = logging.getLogger("race_classifier.predict")

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff", ".gif", ".jfif", ".ppm", ".pgm"}
LANDMARK_NAMES = ("left_eye", "right_eye", "nose", "mouth_left", "mouth_right")
# Exit codes (module docstring); 2, bad usage, is run_command's and argparse's.
EXIT_OK, EXIT_SOME_FAILED, EXIT_ALL_FAILED = 0, 1, 3


# --- inputs -----------------------------------------------------------------------------------------------

def _list_file_paths(lines, base: Path) -> list[str]:
    """Paths from a list (one a line; a manifest's trailing label is dropped); relative to ``base``."""
    out = []
    for raw in lines:
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        path = line.split("\t")[0]
        candidate = Path(path) if Path(path).is_absolute() else base / path
        if not candidate.exists() and len(path.split()) > 1:  # "<path> <label>": a manifest line
            stripped = path.rsplit(None, 1)[0]
            candidate = Path(stripped) if Path(stripped).is_absolute() else base / stripped
        out.append(str(candidate))
    return out


def _read_list(path: Path) -> list[str]:
    """The lines of a .txt list of paths; one that is not UTF-8 is refused naming the file and the line."""
    data = path.read_bytes()
    try:
        return data.decode("utf-8").splitlines()
    except UnicodeDecodeError as e:
        line = data[:e.start].count(b"\n") + 1
        raise ValueError(f"{path}: line {line} is not UTF-8 text (a list of image paths, one a line)") from None


def expand_inputs(inputs: list[str], stdin=None) -> list[str]:
    """Image paths from files, folders (recursive, sorted), .txt lists and '-' (a list on ``stdin``).
    A listed file that does not exist is kept: it becomes an error row."""
    paths = []
    for item in inputs:
        p = Path(item)
        if item == "-":
            try:
                text = (stdin or sys.stdin).read()
            except UnicodeDecodeError as e:
                raise ValueError(f"standard input: the list of paths is not UTF-8 text ({e})") from None
            paths += _list_file_paths(text.splitlines(), Path.cwd())
        elif p.is_dir():
            paths += sorted(str(f) for f in p.rglob("*") if f.is_file() and f.suffix.lower() in IMAGE_SUFFIXES)
        elif p.suffix.lower() == ".txt" and p.is_file():
            paths += _list_file_paths(_read_list(p), p.parent)
        else:
            paths.append(item)
    return paths


# --- outputs ----------------------------------------------------------------------------------------------

def csv_columns(classes, extra_heads: tuple[Head, ...] = ()) -> list[str]:
    """The CSV header; ``extra_heads`` (gender, age) add their label, confidence and probability columns."""
    marks = [f"{name}_{axis}" for name in LANDMARK_NAMES for axis in ("x", "y")]
    return ["image", "frame", "time_s", "face", "status", "error", "x1", "y1", "x2", "y2", *marks,
            "det_score", "label", "confidence", "top_label", *[f"prob_{c}" for c in classes],
            *[column for head in extra_heads for column in _head_columns(head)]]


def _head_columns(head: Head) -> list[str]:
    label, confidence, _ = HEAD_FIELDS[head.name]
    return [label, confidence, *[f"prob_{head.name}_{c}" for c in head.classes]]


def prediction_rows(pred: ImagePrediction, classes, frame: int | None = None, time_s: float | None = None,
                    extra_heads: tuple[Head, ...] = ()):
    """One CSV row per face, or one row saying 'no_face' / 'error'."""
    base = {"image": pred.source, "frame": "" if frame is None else frame,
            "time_s": "" if time_s is None else round(time_s, 3), "status": pred.status, "error": pred.error or ""}
    if not pred.faces:
        yield {**base, "face": ""}
        return
    for face in pred.faces:
        row = {**base, "face": face.index, "det_score": "" if face.score is None else face.score,
               "label": face.label, "confidence": round(face.confidence, 6), "top_label": face.top_label}
        if face.box is not None:
            row.update(zip(("x1", "y1", "x2", "y2"), face.box))
        for name, (x, y) in zip(LANDMARK_NAMES, face.landmarks or ()):
            row[f"{name}_x"], row[f"{name}_y"] = x, y
        row.update({f"prob_{c}": round(face.probabilities[c], 6) for c in classes})
        for head in extra_heads:
            row.update(_head_values(face, head))
        yield row


def _head_values(face, head: Head) -> dict:
    label, confidence, probabilities = HEAD_FIELDS[head.name]
    return {label: getattr(face, label), confidence: round(getattr(face, confidence), 6),
            **{f"prob_{head.name}_{c}": round(p, 6) for c, p in getattr(face, probabilities).items()}}


def to_csv(rows, classes, extra_heads: tuple[Head, ...] = ()) -> str:
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=csv_columns(classes, extra_heads), restval="", lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    return buffer.getvalue()


def json_header(args, clf: Classifier) -> dict:
    """What every JSON output starts with: the model, TTA, the race classes and, for a model with gender /
    age-group heads, those heads' classes."""
    header = {"model": str(args.model_path), "tta": args.tta, "classes": list(clf.classes)}
    heads = clf.heads_description()
    return {**header, "heads": heads} if heads else header  # race-only output as before heads existed


def write_output(output: str | None, csv_text_fn, json_obj_fn) -> None:
    if output and Path(output).suffix.lower() == ".json":
        atomic_write_text(output, json.dumps(json_obj_fn(), indent=1) + "\n")
    elif output:
        atomic_write_text(output, csv_text_fn())
    else:
        sys.stdout.write(csv_text_fn())


def _summary(preds: list[ImagePrediction]) -> str:
    faces = sum(len(p.faces) for p in preds)
    no_face = sum(p.status == "no_face" for p in preds)
    errors = sum(p.status == "error" for p in preds)
    return f"{len(preds)} images, {faces} faces, {no_face} without a face, {errors} unreadable"


# --- run --------------------------------------------------------------------------------------------------

def build_classifier(args) -> "Classifier":
    return Classifier.load(args.model_path, labels=args.labels, image_size=args.image_size, mean=args.mean,
                           std=args.std, device=args.device, detect=not args.no_detect, min_face=args.min_face,
                           min_confidence=args.min_confidence, abstain=args.abstain, tta=args.tta, amp=args.amp,
                           batch_size=args.batch_size,
                           detect_size=args.detect_size, detect_threshold=args.detect_threshold)


def run(args) -> int:
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.output and Path(args.output).suffix.lower() not in (".csv", ".json"):
        raise ValueError(f"--output must end in .csv or .json: {args.output}")
    if args.video is not None:
        if args.inputs:
            raise ValueError("give either image PATHs or --video, not both")
        return _run_video(args)
    paths = expand_inputs(args.inputs)
    if not paths:
        raise ValueError("no input images (give files, folders, .txt lists or - for standard input)")
    annotated = annotation_paths(args.annotate, paths) if args.annotate else {}
    clf = build_classifier(args)
    classes, extra = clf.classes, clf.heads.extra
    preds = list(clf.iter_predict(paths))
    for p in preds:
        if p.error:
            log.warning("%s: %s", p.source, p.error)
        elif p.source in annotated:
            annotate_photo(p, annotated[p.source])
    write_output(args.output,
                 lambda: to_csv((r for p in preds for r in prediction_rows(p, classes, extra_heads=extra)),
                                classes, extra),
                 lambda: {**json_header(args, clf), "images": [p.to_dict() for p in preds]})
    log.info("%s", _summary(preds))
    return exit_status(preds)


def annotation_paths(annotate: str, paths: list[str]) -> dict[str, Path]:
    """{photo: its annotated copy}: ``annotate`` itself for one photo given as a .jpg/.png file name, else
    ``annotate``/<photo's name> (a folder, created; names made unique where two photos share one)."""
    target = Path(annotate)
    if len(paths) == 1 and target.suffix.lower() in (".jpg", ".jpeg", ".png") and not target.is_dir():
        return {paths[0]: target}
    if target.exists() and not target.is_dir():
        raise ValueError(f"--annotate {annotate}: with several photos, give a folder for their annotated copies")
    target.mkdir(parents=True, exist_ok=True)
    out, used = {}, set()
    for i, path in enumerate(paths):
        name = Path(path).name if Path(path).name not in used else f"{i}_{Path(path).name}"
        used.add(name)
        out[path] = target / name
    return out


def exit_status(preds: list[ImagePrediction]) -> int:
    """EXIT_OK when every input was read, EXIT_SOME_FAILED when some could not be, EXIT_ALL_FAILED when none
    could (module docstring); a failure is said once more, last, so a script's log ends with it."""
    failed = sum(p.status == "error" for p in preds)
    if not failed:
        return EXIT_OK
    log.error("%d of %d input(s) could not be read (their rows say why): exit status %d", failed, len(preds),
              EXIT_ALL_FAILED if failed == len(preds) else EXIT_SOME_FAILED)
    return EXIT_ALL_FAILED if failed == len(preds) else EXIT_SOME_FAILED


def _run_video(args) -> int:
    if args.no_detect:
        raise ValueError("--no_detect does not apply to --video: frames are searched for faces")
    clf = build_classifier(args)
    classes, extra = clf.classes, clf.heads.extra
    result = predict_video(clf, args.video, every=args.every, annotate=args.annotate, max_frames=args.max_frames)
    write_output(args.output,
                 lambda: to_csv((r for f in result.frames for r in prediction_rows(f.prediction, classes, f.frame,
                                                                                    f.time_s, extra)), classes, extra),
                 lambda: {**json_header(args, clf), "video": result.source,
                          "frames_read": result.frames_read, "fps": result.fps,
                          "frames": [{"frame": f.frame, "time_s": f.time_s, **f.prediction.to_dict()}
                                     for f in result.frames]})
    faces = sum(len(f.prediction.faces) for f in result.frames)
    log.info("%d frames read, %d classified (%d faces) in %.1f s: %.1f frames/s%s", result.frames_read,
             len(result.frames), faces, result.seconds, result.fps,
             f"; annotated video: {args.annotate}" if args.annotate else "")
    return 0
