"""Manifests: the text files that list a dataset, one image a line.

Format, as in the project's brief::

    <image path> <label>

* The label is a class name (or a synonym of one) or a class index of the taxonomy.
* Paths may contain spaces: the label is the last whitespace-separated field.
* Lines with a tab are split on tabs instead, which allows extra columns:
  ``<path>\\t<label>\\t<gender>\\t<age>[\\t<source>]`` (written by ``prepare``; empty where unknown;
  ``source`` names the dataset a line came from in a mix, ``prepare mix``).
* Relative paths resolve against the manifest's own folder. Blank lines and ``#`` comments are ignored.

Every problem is reported with the manifest's file name and line number.
"""
from __future__ import annotations

import codecs
import logging
import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from race_classifier.heads import UNKNOWN_VALUES
from race_classifier.labels import LabelMapping, Taxonomy, UnknownLabelError, class_file_text
from race_classifier.utils import atomic_write_text, atomic_write_set

EXTRA_COLUMNS = ("gender", "age", "source")
log = logging.getLogger(__name__)


class ManifestError(ValueError):
    pass


@dataclass(frozen=True)
class Sample:
    path: str
    label: int  # class index in the taxonomy the manifest was read with; -1: unknown (multi-task only)
    gender: str = ""
    age: str = ""
    line: int = 0  # line number in the manifest, for messages
    source: str = ""  # the dataset of a mix this image came from ('' outside mixes)


def parse_line(text: str) -> tuple[str, str, dict[str, str]] | None:
    """(path, label, extras) of one manifest line, or None for a blank or comment line."""
    stripped = text.rstrip("\r\n")
    if not stripped.strip() or stripped.lstrip().startswith("#"):
        return None
    if "\t" in stripped:
        fields = [f.strip() for f in stripped.split("\t")]
        path, label, rest = fields[0], (fields[1] if len(fields) > 1 else ""), fields[2:]
        extras = {name: value for name, value in zip(EXTRA_COLUMNS, rest)}
    else:
        parts = stripped.strip().rsplit(None, 1)
        path, label, extras = (parts[0], parts[1], {}) if len(parts) == 2 else (parts[0], "", {})
    if not path or not label:
        raise ManifestError("expected '<image path> <label>'")
    return path, label, extras


def read_manifest(path: str | Path, taxonomy: Taxonomy, mapping: LabelMapping | None = None,
                  check_files: bool = True, keep_unlabelled: bool = False) -> list[Sample]:
    """Read a manifest; labels are matched in ``mapping.source`` (then mapped) or in ``taxonomy``.

    Samples whose class the mapping drops are left out; missing images (when ``check_files``) are
    reported with their line and left out. ``keep_unlabelled`` (multi-task training): samples whose race
    is unknown (``-``, ``?``, ``unknown``) or dropped by the mapping are kept with label -1, so that they
    train the other heads. Raises ManifestError naming file and line for an unknown
    label or a malformed line, and for a manifest with no usable image.
    """
    path = Path(path)
    if not path.is_file():
        raise ManifestError(f"manifest not found: {path}")
    samples: list[Sample] = []
    missing: list[str] = []
    for lineno, image_path, label, extras in iter_manifest(path):
        try:
            if keep_unlabelled and label.strip().lower() in UNKNOWN_VALUES:
                index = -1
            elif mapping is not None:
                index = mapping.map_label(label)
                if index is None:
                    if not keep_unlabelled:
                        continue
                    index = -1
            else:
                index = taxonomy.index(label)
        except UnknownLabelError as e:
            raise ManifestError(f"{path}:{lineno}: {e}") from None
        if check_files and not os.path.isfile(image_path):
            missing.append(f"{path}:{lineno}: {image_path}")
            continue
        samples.append(Sample(image_path, index, extras.get("gender", ""), extras.get("age", ""), lineno,
                              extras.get("source", "")))
    if missing:
        # One missing file must not end a long run: report every one, by line, and go on without it.
        shown = "\n  ".join(missing[:20])
        more = f"\n  ... and {len(missing) - 20} more" if len(missing) > 20 else ""
        log.warning("skipping %d image(s) listed in %s that do not exist:\n  %s%s", len(missing), path, shown, more)
    if not samples:
        raise ManifestError(f"manifest {path} lists no usable images")
    return samples


def iter_manifest(path: str | Path) -> Iterator[tuple[int, str, str, dict[str, str]]]:
    """(line number, image path, label, extra columns) of each entry of a manifest, the path resolved
    against the manifest's folder; a malformed line raises ManifestError naming the file and line."""
    path = Path(path)
    base = path.resolve().parent
    with open(path, encoding="utf-8-sig") as f:  # -sig: a byte-order mark (Windows editors) is not path text
        try:
            for lineno, text in enumerate(f, 1):
                try:
                    parsed = parse_line(text)
                except ManifestError as e:
                    raise ManifestError(f"{path}:{lineno}: {e}: {text.strip()!r}") from None
                if parsed is not None:
                    image, label, extras = parsed
                    image_path = Path(image).expanduser()
                    yield lineno, str(image_path if image_path.is_absolute() else base / image_path), label, extras
        except UnicodeDecodeError as e:
            raise ManifestError(not_utf8_message(path, e)) from None


def not_utf8_message(path: str | Path, error: UnicodeDecodeError) -> str:
    """'file:line: ...' for a text file that is not UTF-8 (a manifest or CSV saved as Latin-1 or cp1252): the
    decoder reads ahead in blocks, so the line is found again in the file's bytes."""
    data = Path(path).read_bytes()
    if data.startswith(codecs.BOM_UTF8):
        data = data[len(codecs.BOM_UTF8):]
    for lineno, raw in enumerate(data.splitlines(), 1):  # \n, \r and \r\n, as text mode splits lines
        try:
            raw.decode("utf-8")
        except UnicodeDecodeError as e:
            return (f"{path}:{lineno}: not UTF-8 text (byte {raw[e.start]:#04x} at column {e.start + 1}); "
                    "save the file as UTF-8")
    return f"{path}: not UTF-8 text ({error}); save the file as UTF-8"


def manifest_image_paths(path: str | Path) -> list[str]:
    """The image paths a manifest lists, resolved as ``read_manifest`` does, labels unread."""
    return [image for _, image, _, _ in iter_manifest(path)]


def format_sample(path: str, label: str, gender: str = "", age: str = "", source: str = "") -> str:
    for value, what in ((path, "path"), (label, "label"), (gender, "gender"), (age, "age"), (source, "source")):
        if "\t" in value or "\n" in value:
            raise ManifestError(f"{what} contains a tab or newline, which a manifest cannot hold: {value!r}")
        try:
            value.encode("utf-8")
        except UnicodeEncodeError:  # a file name in another encoding, as os.listdir gives it (surrogates)
            raise ManifestError(f"{what} is not UTF-8 (a file name in another encoding?), which a manifest "
                                f"cannot hold: {value!r}; rename it") from None
    # The source column only in mixes: other manifests keep their four columns.
    return f"{path}\t{label}\t{gender}\t{age}" + (f"\t{source}" if source else "") + "\n"


def manifest_text(rows: list[tuple[str, ...]]) -> str:
    """(path, class name, gender, age[, source]) rows, tab-separated, under a header comment."""
    with_source = any(len(row) > 4 and row[4] for row in rows)
    header = "# path\tlabel\tgender\tage" + ("\tsource" if with_source else "") + "\n"
    return header + "".join(format_sample(*row) for row in rows)


def write_manifest(path: str | Path, rows: list[tuple[str, ...]]) -> None:
    atomic_write_text(path, manifest_text(rows))


def write_manifest_set(out_dir: str | Path, train_rows: list[tuple[str, ...]], val_rows: list[tuple[str, ...]],
                       taxonomy: Taxonomy, also: dict[str, str | None] | None = None) -> None:
    """train.txt, val.txt, classes.txt (and ``also``: file name -> text, or None to remove that file) replaced
    together: a failure while writing them leaves the folder's previous set whole, never a mix of two."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    texts = {out_dir / "train.txt": manifest_text(train_rows), out_dir / "val.txt": manifest_text(val_rows),
             out_dir / "classes.txt": class_file_text(taxonomy)}
    texts.update({out_dir / name: text for name, text in (also or {}).items() if text is not None})
    atomic_write_set(texts)
    for name, text in (also or {}).items():
        if text is None:
            (out_dir / name).unlink(missing_ok=True)
