"""Readers of labelled image sources: each turns a source into ``Record``s (path, label, identity,
gender, age), with labels still in the source's taxonomy.

* ``folder``   a tree ``root/<race>/<identity>/<image>`` (``scan_folder_tree``); folder names are matched
               to classes through the taxonomy's synonyms (``Caucasian`` -> White, ``Latino Hispanic`` -> ...).
* ``fairface`` FairFace's label CSV (``file,age,gender,race,service_test``; ``read_fairface_csv``),
               including copies whose age ranges a spreadsheet turned into dates (``3-9`` -> ``9-Mar``):
               those are repaired, loudly.
* ``utkface``  UTKFace's file names ``AGE_GENDER_RACE_DATETIME.jpg.chip.jpg`` (``scan_utkface``).

Bad input raises ``PrepareError``, whose message names the file (and line) at fault; skipped or
repaired items are logged as warnings.

The labels are perceived, socially constructed categories, not facts about a person.
"""
from __future__ import annotations

import csv
import logging
import os
import re
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

from race_classifier.data.manifest import ManifestError, iter_manifest, not_utf8_message
from race_classifier.labels import Taxonomy, UnknownLabelError, get_taxonomy

log = logging.getLogger(__name__)

IMAGE_EXTENSIONS = frozenset({".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff"})

FAIRFACE_TAXONOMY = "fairface7"
FAIRFACE_TRAIN_CSV = "fairface_label_train.csv"
FAIRFACE_VAL_CSV = "fairface_label_val.csv"
FAIRFACE_COLUMNS = ("file", "age", "gender", "race")  # service_test is not needed
FAIRFACE_AGES = ("0-2", "3-9", "10-19", "20-29", "30-39", "40-49", "50-59", "60-69", "more than 70")

UTKFACE_TAXONOMY = "utkface5"  # its classes are in the order of UTKFace's race codes 0..4
UTKFACE_GENDERS = ("Male", "Female")

MAX_LISTED = 20  # problems listed one by one in a warning; the rest are counted

_MONTHS = {name: i for i, names in enumerate(
    [("jan", "january"), ("feb", "february"), ("mar", "march"), ("apr", "april"), ("may",),
     ("jun", "june"), ("jul", "july"), ("aug", "august"), ("sep", "sept", "september"),
     ("oct", "october"), ("nov", "november"), ("dec", "december")], 1) for name in names}
_NUMBER_MONTH = re.compile(r"^(\d{1,2})[-/ ]([A-Za-z]+)\.?$")
_MONTH_NUMBER = re.compile(r"^([A-Za-z]+)\.?[-/ ](\d{1,2})$")
_DIGITS = re.compile(r"^[0-9]+$")


class PrepareError(ValueError):
    """Bad input to ``prepare``; the message names the file (and line) at fault."""


@dataclass(frozen=True)
class Record:
    """One labelled image as read from a source, before mapping to the target taxonomy."""
    path: str  # absolute
    label: str  # class name as the source spells it, in the source taxonomy
    identity: str  # images of one identity never straddle the train/val split
    gender: str = ""
    age: str = ""
    source: str = ""  # the dataset's name in a mix (``prepare mix``)


def is_image(path: Path) -> bool:
    return path.suffix.lower() in IMAGE_EXTENSIONS and not path.name.startswith(".")


def _images_below(folder: Path) -> list[Path]:
    # Sorted, because directory order differs between file systems and the split must not.
    return sorted(p for p in folder.rglob("*") if p.is_file() and is_image(p)
                  and not any(part.startswith(".") for part in p.relative_to(folder).parts))


def _require_dir(path: str | Path, what: str) -> Path:
    path = Path(path)
    if not path.exists():
        raise PrepareError(f"{what} not found: {path}")
    if not path.is_dir():
        raise PrepareError(f"{what} must be a folder: {path}")
    return path


def _warn_list(message: str, items: list[str]) -> None:
    """One warning: the message, then up to MAX_LISTED items and a count of the rest."""
    shown = "\n  ".join(items[:MAX_LISTED])
    more = f"\n  ... and {len(items) - MAX_LISTED} more" if len(items) > MAX_LISTED else ""
    log.warning("%s:\n  %s%s", message, shown, more)


# --------------------------------------------------------------------------------------- folder tree

def scan_folder_tree(root: str | Path, taxonomy: Taxonomy | str | None = None) -> list[Record]:
    """Records of ``root/<race>/<identity>/<image>`` (anything deeper below an identity folder too).

    Identity is ``<race>/<identity>``. An image directly in ``root/<race>/`` is its own identity.
    With ``taxonomy``, every race folder must name one of its classes (or a synonym): an unknown
    folder is an error naming it, never a new class.
    """
    root = _require_dir(root, "folder tree")
    race_dirs = sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    if taxonomy is not None:
        _check_race_folders(race_dirs, get_taxonomy(taxonomy))
    stray = [p.name for p in root.iterdir() if p.is_file() and is_image(p)]
    if stray:
        _warn_list(f"ignoring {len(stray)} image(s) directly in {root}: they are in no race folder", sorted(stray))
    records: list[Record] = []
    loose = 0
    for race_dir in race_dirs:
        for image in _images_below(race_dir):
            parts = image.relative_to(race_dir).parts
            loose += len(parts) == 1
            # An image with no identity folder is its own identity (named by its file).
            identity = f"{race_dir.name}/{parts[0]}"
            records.append(Record(os.path.abspath(image), race_dir.name, identity))
    if not records:
        raise PrepareError(f"no images ({', '.join(sorted(IMAGE_EXTENSIONS))}) found in race folders under {root}; "
                           "expected root/<race>/<identity>/<image>")
    if loose:
        log.warning("%d image(s) lie directly in a race folder under %s, with no identity folder: "
                    "each is treated as its own identity", loose, root)
    return records


def _check_race_folders(race_dirs: list[Path], taxonomy: Taxonomy) -> None:
    for race_dir in race_dirs:
        try:
            taxonomy.index(race_dir.name)
        except UnknownLabelError:
            raise PrepareError(
                f"race folder {str(race_dir)!r}: {race_dir.name!r} is not a class of taxonomy {taxonomy.name!r} "
                f"({', '.join(taxonomy.classes)}) nor a known synonym of one; rename the folder, or name "
                "its taxonomy with --source_taxonomy (and map it with --label_map)") from None


def count_loose_images(records: list[Record]) -> int:
    """How many folder-tree records had no identity folder (their identity is their own file)."""
    return sum(r.identity.split("/", 1)[-1] == Path(r.path).name and Path(r.path).parent.name == r.label
               for r in records)


# ------------------------------------------------------------------------------------------ FairFace

def fix_spreadsheet_age(value: str) -> str | None:
    """The FairFace age range a spreadsheet turned into a date, or None if ``value`` is no such date.

    '9-Mar', '03-Sep', 'Mar-09' -> '3-9'; '19-Oct', 'Oct-19' -> '10-19'. The day/year and the month
    number are the two ends of the range, smaller first.
    """
    value = value.strip()
    match = _NUMBER_MONTH.match(value)
    number, month = (match.group(1), match.group(2)) if match else (None, None)
    if match is None and (match := _MONTH_NUMBER.match(value)):
        month, number = match.group(1), match.group(2)
    if match is None or month.lower() not in _MONTHS:
        return None
    low, high = sorted((int(number), _MONTHS[month.lower()]))
    fixed = f"{low}-{high}"
    return fixed if fixed in FAIRFACE_AGES else None


def resolve_fairface_source(source: str | Path, val_csv: str | Path | None = None) -> tuple[Path, Path | None]:
    """(train CSV, validation CSV or None) for a CSV path or a FairFace folder.

    A folder means its fairface_label_train.csv, and its fairface_label_val.csv (if present) as the
    validation set. An explicit ``val_csv`` always wins.
    """
    source = Path(source)
    if not source.exists():
        raise PrepareError(f"FairFace source not found: {source}")
    if source.is_dir():
        train_csv = source / FAIRFACE_TRAIN_CSV
        if not train_csv.is_file():
            raise PrepareError(f"{source} holds no {FAIRFACE_TRAIN_CSV}; give the label CSV itself as SOURCE")
        if val_csv is None and (source / FAIRFACE_VAL_CSV).is_file():
            val_csv = source / FAIRFACE_VAL_CSV
    else:
        train_csv = source
    if val_csv is not None and not Path(val_csv).is_file():
        raise PrepareError(f"validation CSV not found: {val_csv}")
    return train_csv, (Path(val_csv) if val_csv is not None else None)


def read_fairface_csv(csv_path: str | Path, taxonomy: Taxonomy | str = FAIRFACE_TAXONOMY) -> tuple[list[Record], dict]:
    """Records of a FairFace label CSV, and a report of what was repaired or skipped.

    ``file`` is relative to the CSV's folder. Each image is its own identity (FairFace has no
    identity labels). Spreadsheet-mangled ages are repaired and reported; an unrecognised age or an
    unknown race is an error naming file and line; missing images are reported and skipped.
    Report keys: ``csv``, ``rows``, ``missing`` (list of 'file:line: path'), ``fixed_ages``
    ({mangled: fixed}) and ``fixed_age_count`` (how many values were repaired).
    """
    csv_path = Path(csv_path)
    if not csv_path.is_file():
        raise PrepareError(f"FairFace CSV not found: {csv_path}")
    taxonomy = get_taxonomy(taxonomy)
    base = csv_path.resolve().parent
    records: list[Record] = []
    missing: list[str] = []
    fixed_ages: Counter = Counter()
    rows = 0
    # utf-8-sig: a CSV saved by a spreadsheet often starts with a byte-order mark.
    with open(csv_path, encoding="utf-8-sig", newline="") as f:
        reader = csv.reader(f)
        start = 1  # the line the row being read starts on (a quoted field may span lines)
        try:
            columns = _fairface_columns(csv_path, next(reader, None))
            start = reader.line_num + 1
            for row in reader:
                if not any(cell.strip() for cell in row):
                    start = reader.line_num + 1
                    continue
                rows += 1
                where = f"{csv_path}:{reader.line_num}"
                record, mangled = _fairface_record(row, columns, base, taxonomy, where)
                start = reader.line_num + 1
                if mangled:
                    fixed_ages[(mangled, record.age)] += 1
                if not os.path.isfile(record.path):
                    missing.append(f"{where}: {record.path}")
                    continue
                records.append(record)
        except UnicodeDecodeError as e:
            raise PrepareError(not_utf8_message(csv_path, e)) from None
        except csv.Error as e:
            # e.g. a quote left open, which makes the rest of the file one field, longer than csv allows
            raise PrepareError(f"{csv_path}:{start}: malformed CSV in the row starting on this line ({e}); "
                               "is a quote left open?") from None
    _report_fairface(csv_path, rows, records, missing, fixed_ages)
    return records, {"csv": str(csv_path), "rows": rows, "missing": missing,
                     "fixed_ages": {bad: good for bad, good in sorted(fixed_ages)},
                     "fixed_age_count": sum(fixed_ages.values())}


def _fairface_columns(csv_path: Path, header: list[str] | None) -> dict[str, int]:
    if header is None:
        raise PrepareError(f"{csv_path} is empty; expected a header line {','.join(FAIRFACE_COLUMNS)},service_test")
    columns = {name.strip().lower(): i for i, name in enumerate(header)}
    absent = [c for c in FAIRFACE_COLUMNS if c not in columns]
    if absent:
        raise PrepareError(f"{csv_path}:1: missing required column(s) {', '.join(absent)}; "
                           f"found {', '.join(h.strip() for h in header) or 'none'}")
    return columns


def _fairface_record(row: list[str], columns: dict[str, int], base: Path, taxonomy: Taxonomy,
                     where: str) -> tuple[Record, str]:
    """(record, the mangled age it repaired or '') of one CSV row."""
    if len(row) <= max(columns[c] for c in FAIRFACE_COLUMNS):
        raise PrepareError(f"{where}: expected {len(columns)} fields, found {len(row)}: {','.join(row)!r}")
    file, age, gender, race = (row[columns[c]].strip() for c in FAIRFACE_COLUMNS)
    if not file:
        raise PrepareError(f"{where}: empty 'file' field")
    try:
        taxonomy.index(race)
    except UnknownLabelError as e:
        raise PrepareError(f"{where}: race {race!r}: {e}") from None
    mangled = ""
    if age not in FAIRFACE_AGES:
        fixed = fix_spreadsheet_age(age)
        if fixed is None:
            raise PrepareError(f"{where}: unrecognised age {age!r}; FairFace's ages are {', '.join(FAIRFACE_AGES)}")
        mangled, age = age, fixed
    return Record(os.path.abspath(base / file), race, identity=file, gender=gender, age=age), mangled


def _report_fairface(csv_path: Path, rows: int, records: list[Record], missing: list[str],
                     fixed_ages: Counter) -> None:
    if rows == 0:
        raise PrepareError(f"{csv_path} lists no images")
    if fixed_ages:
        pairs = ", ".join(f"{bad!r} -> {good!r} ({n})" for (bad, good), n in sorted(fixed_ages.items()))
        log.warning("%s: fixed %d age value(s) that a spreadsheet had turned into dates: %s",
                    csv_path, sum(fixed_ages.values()), pairs)
    if missing:
        _warn_list(f"skipping {len(missing)} image(s) listed in {csv_path} that do not exist", missing)
    if not records:
        raise PrepareError(f"none of the {rows} images listed in {csv_path} exists; file paths are read "
                           f"relative to {csv_path.resolve().parent}")


# ------------------------------------------------------------------------------------------- UTKFace

def parse_utkface_name(name: str) -> tuple[str, str, str]:
    """(age, gender, race class) of a UTKFace file name; ValueError saying what is wrong with it."""
    fields = name.split(".", 1)[0].split("_")
    if len(fields) != 4:
        raise ValueError(f"expected AGE_GENDER_RACE_DATETIME, found {len(fields)} field(s)")
    age, gender, race, _datetime = fields
    for what, value in (("age", age), ("gender", gender), ("race", race)):
        if not _DIGITS.match(value):
            raise ValueError(f"{what} {value!r} is not a whole number")
    races = get_taxonomy(UTKFACE_TAXONOMY).classes
    if int(gender) >= len(UTKFACE_GENDERS):
        raise ValueError(f"gender {gender} is out of range (0 Male, 1 Female)")
    if int(race) >= len(races):
        raise ValueError(f"race {race} is out of range (" + ", ".join(f"{i} {r}" for i, r in enumerate(races)) + ")")
    return str(int(age)), UTKFACE_GENDERS[int(gender)], races[int(race)]


def scan_utkface(folder: str | Path) -> tuple[list[Record], list[str]]:
    """Records of the UTKFace images below ``folder``, and the malformed names ('path: reason') skipped.

    Each image is its own identity; the exact age is kept as a string and gender as Male/Female.
    """
    folder = _require_dir(folder, "UTKFace folder")
    images = _images_below(folder)
    if not images:
        raise PrepareError(f"no images ({', '.join(sorted(IMAGE_EXTENSIONS))}) found under {folder}")
    records: list[Record] = []
    problems: list[str] = []
    for image in images:
        relative = image.relative_to(folder).as_posix()
        try:
            age, gender, race = parse_utkface_name(image.name)
        except ValueError as e:
            problems.append(f"{relative}: {e}")
            continue
        records.append(Record(os.path.abspath(image), race, identity=relative, gender=gender, age=age))
    if problems:
        _warn_list(f"skipping {len(problems)} UTKFace file(s) under {folder} with malformed names", problems)
    if not records:
        raise PrepareError(f"no file under {folder} is named like UTKFace's AGE_GENDER_RACE_DATETIME.jpg")
    return records, problems


# ------------------------------------------------------------------------------------------ manifest

def read_manifest_records(manifest: str | Path, taxonomy: Taxonomy | str) -> list[Record]:
    """Records of an existing manifest, labels checked against ``taxonomy`` (not mapped). A manifest has no
    identities, so each image is its own; gender and age columns are kept; missing images are skipped."""
    manifest = Path(manifest)
    if not manifest.is_file():
        raise PrepareError(f"manifest not found: {manifest}")
    taxonomy = get_taxonomy(taxonomy)
    records: list[Record] = []
    missing: list[str] = []
    try:
        for lineno, path, label, extras in iter_manifest(manifest):
            try:
                taxonomy.index(label)
            except UnknownLabelError as e:
                raise PrepareError(f"{manifest}:{lineno}: {e}") from None
            path = os.path.abspath(path)
            if not os.path.isfile(path):
                missing.append(f"{manifest}:{lineno}: {path}")
                continue
            records.append(Record(path, label, identity=path, gender=extras.get("gender", ""),
                                  age=extras.get("age", "")))
    except ManifestError as e:
        raise PrepareError(str(e)) from None
    if missing:
        _warn_list(f"skipping {len(missing)} image(s) listed in {manifest} that do not exist", missing)
    if not records:
        raise PrepareError(f"manifest {manifest} lists no usable images")
    return records
