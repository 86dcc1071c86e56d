"""``race-classifier prepare``: train/val manifests and a class file from a labelled image source.

Three kinds of source are read:

* ``folder``   a tree ``root/<race>/<identity>/<image>``; folder names are matched to classes
               through the taxonomy's synonyms (``Caucasian`` -> White, ``Latino Hispanic`` -> ...).
* ``fairface`` FairFace's label CSV (``file,age,gender,race,service_test``), including copies whose
               age ranges a spreadsheet turned into dates (``3-9`` -> ``9-Mar``): those are repaired, loudly.
* ``utkface``  UTKFace's file names ``AGE_GENDER_RACE_DATETIME.jpg.chip.jpg``.

Labels are read in the source's taxonomy and mapped to the target taxonomy (``get_mapping``); classes
the mapping drops are left out and counted. Validation images are split off by identity, so no person
is on both sides, stratified by class and seeded. Outputs: ``train.txt``, ``val.txt`` (absolute path,
class name, gender, age) and ``classes.txt``.

The labels are perceived, socially constructed categories, not facts about a person.
"""
from __future__ import annotations

import argparse
import csv
import logging
import os
import re
import warnings
from collections import Counter
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np

from race_classifier.labels import (DEFAULT_TAXONOMY, LabelMapping, Taxonomy, UnknownLabelError, get_mapping,
                                    get_taxonomy, load_label_map, write_class_file)
from race_classifier.data.manifest import write_manifest

log = logging.getLogger(__name__)

IMAGE_EXTENSIONS = frozenset({".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff"})
KINDS = ("folder", "fairface", "utkface")

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
        columns = _fairface_columns(csv_path, next(reader, None))
        for row in reader:
            if not any(cell.strip() for cell in row):
                continue
            rows += 1
            where = f"{csv_path}:{reader.line_num}"
            record, mangled = _fairface_record(row, columns, base, taxonomy, where)
            if mangled:
                fixed_ages[(mangled, record.age)] += 1
            if not os.path.isfile(record.path):
                missing.append(f"{where}: {record.path}")
                continue
            records.append(record)
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


# --------------------------------------------------------------------------------------------- split

def _check_val_fraction(val_fraction: float) -> int:
    """The number of folds for ``val_fraction`` (validation is one fold)."""
    if not 0 < val_fraction <= 0.5:
        raise PrepareError(f"val_fraction must be in (0, 0.5], got {val_fraction}")
    return round(1 / val_fraction)


def split_by_identity(records: list[Record], val_fraction: float = 0.1, seed: int = 0) -> tuple[list[Record], list[Record]]:
    """(train, val): no identity on both sides, stratified by ``label``, the same for the same seed.

    Validation is fold 0 of ``round(1 / val_fraction)`` stratified group folds.
    """
    n_splits = _check_val_fraction(val_fraction)
    if not records:
        raise PrepareError("no images to split")
    groups = np.array([r.identity for r in records])
    labels = np.array([r.label for r in records])
    n_groups = len(np.unique(groups))
    if n_groups < n_splits:
        raise PrepareError(f"only {n_groups} identities: val_fraction {val_fraction} needs at least {n_splits} "
                           "(one fold of identities becomes validation)")
    folds = _fold_splitter(n_splits, seed, singletons=n_groups == len(records))
    with warnings.catch_warnings():
        # Sparse classes draw sklearn's generic warning; we name the classes left out of val instead.
        warnings.simplefilter("ignore", UserWarning)
        try:
            train_idx, val_idx = next(folds.split(np.zeros(len(records)), labels, groups))
        except ValueError as e:
            raise PrepareError(f"cannot split {len(records)} images into {n_splits} folds "
                               f"(val_fraction {val_fraction}): {e}") from None
    return [records[i] for i in train_idx], [records[i] for i in val_idx]


def _fold_splitter(n_splits: int, seed: int, singletons: bool):
    from sklearn.model_selection import StratifiedGroupKFold, StratifiedKFold
    if singletons:
        # Every identity has one image (FairFace, UTKFace), so plain stratified folds keep identities
        # apart just as well; StratifiedGroupKFold's per-group loop takes ~10 s on 35,000 images.
        return StratifiedKFold(n_splits=n_splits, shuffle=True, random_state=seed)
    return StratifiedGroupKFold(n_splits=n_splits, shuffle=True, random_state=seed)


# ------------------------------------------------------------------------------------------- prepare

def map_records(records: list[Record], mapping: LabelMapping) -> tuple[list[Record], Counter]:
    """Records relabelled with target class names, and a count of dropped images per source class."""
    mapped: list[Record] = []
    dropped: Counter = Counter()
    for record in records:
        try:
            source_index = mapping.source.index(record.label)
        except UnknownLabelError as e:
            raise PrepareError(f"{record.path}: {e}") from None
        target_index = mapping(source_index)
        if target_index is None:
            dropped[mapping.source.classes[source_index]] += 1
        else:
            mapped.append(replace(record, label=mapping.target.classes[target_index]))
    return mapped, dropped


def prepare(records: list[Record], out_dir: str | Path, source_taxonomy: Taxonomy | str,
            target_taxonomy: Taxonomy | str = DEFAULT_TAXONOMY, label_overrides: dict[str, str | None] | None = None,
            val_fraction: float = 0.1, seed: int = 0, val_records: list[Record] | None = None) -> dict:
    """Map ``records`` to the target taxonomy, split, and write train.txt, val.txt and classes.txt.

    With ``val_records`` (a given validation set, e.g. FairFace's) there is no random split and
    ``val_fraction`` is ignored. Returns a summary dict (see ``format_summary``).
    """
    source, target = get_taxonomy(source_taxonomy), get_taxonomy(target_taxonomy)
    _check_val_fraction(val_fraction)
    mapping = get_mapping(source, target, label_overrides)
    train, dropped = map_records(records, mapping)
    if val_records is None:
        _require_images(train, dropped, "")
        train, val = split_by_identity(train, val_fraction, seed)
    else:
        val, val_dropped = map_records(val_records, mapping)
        _require_images(train, dropped, "training ")
        _require_images(val, val_dropped, "validation ")
        dropped += val_dropped
        _warn_shared_identities(train, val)
    _warn_classes_without_val(target, train, val)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    write_manifest(out_dir / "train.txt", [_row(r) for r in train])
    write_manifest(out_dir / "val.txt", [_row(r) for r in val])
    write_class_file(target, out_dir / "classes.txt")
    return _summary(out_dir, source, target, mapping, train, val, dropped,
                    "split" if val_records is None else "given", val_fraction, seed)


def _row(record: Record) -> tuple[str, str, str, str]:
    return record.path, record.label, record.gender, record.age


def _require_images(records: list[Record], dropped: Counter, what: str) -> None:
    if not records:
        dropped_text = f" ({sum(dropped.values())} dropped by the label mapping)" if dropped else ""
        raise PrepareError(f"no {what}images left to write{dropped_text}")


def _warn_shared_identities(train: list[Record], val: list[Record]) -> None:
    shared = {r.identity for r in train} & {r.identity for r in val}
    if shared:
        _warn_list(f"{len(shared)} identities are in both the training and the given validation set",
                   sorted(shared))


def _warn_classes_without_val(target: Taxonomy, train: list[Record], val: list[Record]) -> None:
    in_train, in_val = Counter(r.label for r in train), Counter(r.label for r in val)
    for cls in target.classes:
        if not in_train[cls] and not in_val[cls]:
            log.warning("class %r has no images at all", cls)
        elif not in_val[cls]:
            log.warning("class %r has no validation images (%d training images)", cls, in_train[cls])


def _summary(out_dir: Path, source: Taxonomy, target: Taxonomy, mapping: LabelMapping, train: list[Record],
             val: list[Record], dropped: Counter, validation: str, val_fraction: float, seed: int) -> dict:
    in_train, in_val = Counter(r.label for r in train), Counter(r.label for r in val)
    total = len(train) + len(val)
    return {
        "out_dir": str(out_dir),
        "train_manifest": str(out_dir / "train.txt"),
        "val_manifest": str(out_dir / "val.txt"),
        "class_file": str(out_dir / "classes.txt"),
        "source_taxonomy": source.name,
        "target_taxonomy": target.name,
        "mapping": mapping.describe(),
        "counts": {cls: {"train": in_train[cls], "val": in_val[cls]} for cls in target.classes},
        "dropped": dict(sorted(dropped.items())),
        "train": len(train),
        "val": len(val),
        "val_share": len(val) / total if total else 0.0,
        "identities": {"train": len({r.identity for r in train}), "val": len({r.identity for r in val})},
        "validation": validation,  # 'split' (random, by identity) or 'given' (a separate validation set)
        "val_fraction": val_fraction if validation == "split" else None,
        "seed": seed if validation == "split" else None,
    }


def format_summary(summary: dict) -> str:
    """A plain-text table of a summary: per class train/val counts, then what was dropped or fixed."""
    width = max([len("total")] + [len(c) for c in summary["counts"]])
    lines = [f"taxonomy {summary['target_taxonomy']} (labels read as {summary['source_taxonomy']})",
             f"{'class':<{width}}  {'train':>7}  {'val':>7}"]
    lines += [f"{cls:<{width}}  {n['train']:>7}  {n['val']:>7}" for cls, n in summary["counts"].items()]
    validation = ("given validation set" if summary["validation"] == "given"
                  else f"split by identity, seed {summary['seed']}")
    lines.append(f"{'total':<{width}}  {summary['train']:>7}  {summary['val']:>7}"
                 f"   (val {summary['val_share']:.1%}, {validation})")
    if summary["mapping"]:
        lines.append("mapping: " + "; ".join(summary["mapping"]))
    if summary["dropped"]:
        lines.append("dropped: " + ", ".join(f"{cls} {n}" for cls, n in summary["dropped"].items()))
    lines += _source_lines(summary.get("source", {}))
    lines.append(f"wrote {summary['train_manifest']}, {summary['val_manifest']}, {summary['class_file']}")
    return "\n".join(lines)


def _source_lines(source: dict) -> list[str]:
    lines = []
    if source.get("missing_images"):
        lines.append(f"skipped: {source['missing_images']} missing image(s)")
    if source.get("malformed_names"):
        lines.append(f"skipped: {source['malformed_names']} malformed UTKFace file name(s)")
    if source.get("fixed_age_count"):
        lines.append(f"fixed: {source['fixed_age_count']} age(s) a spreadsheet had turned into dates: "
                     + ", ".join(f"{bad!r} -> {good!r}" for bad, good in source["fixed_ages"].items()))
    if source.get("loose_images"):
        lines.append(f"note: {source['loose_images']} image(s) had no identity folder; each is its own identity")
    return lines


# ----------------------------------------------------------------------------------------------- CLI

def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("kind", choices=KINDS, help="folder: root/<race>/<identity>/<image>; "
                        "fairface: FairFace's label CSV or its folder; utkface: a folder of UTKFace images")
    parser.add_argument("source", metavar="SOURCE", help="the folder tree, CSV or folder to read")
    parser.add_argument("--out", required=True, help="folder to write train.txt, val.txt and classes.txt to")
    parser.add_argument("--taxonomy", default=DEFAULT_TAXONOMY,
                        help="target taxonomy: a built-in name, a class file, or a comma-separated list "
                        f"(default {DEFAULT_TAXONOMY})")
    parser.add_argument("--source_taxonomy", default=None,
                        help="folder only: the taxonomy the folder names are in (default: the target taxonomy)")
    parser.add_argument("--label_map", default=None,
                        help="YAML of source class: target class (null drops the class)")
    parser.add_argument("--val_fraction", type=float, default=0.1,
                        help="share of identities held out for validation, in (0, 0.5] (default 0.1)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the train/val split (default 0)")
    parser.add_argument("--val_csv", default=None,
                        help="fairface only: a label CSV to use as the validation set instead of a random "
                        f"split (default: {FAIRFACE_VAL_CSV} when SOURCE is a folder holding one)")


def run(args: argparse.Namespace) -> int:
    """Carry out ``prepare`` for parsed arguments; prints the summary. Bad input raises PrepareError."""
    _check_kind_options(args)
    target = get_taxonomy(args.taxonomy)
    source = get_taxonomy(_source_taxonomy_spec(args))
    overrides = _load_overrides(args.label_map, source, target)  # before a long scan, so a bad map fails fast
    records, val_records, report = _read_source(args, source)
    summary = prepare(records, args.out, source, target, overrides, args.val_fraction, args.seed, val_records)
    summary["source"] = report
    print(format_summary(summary))
    return 0


def _check_kind_options(args: argparse.Namespace) -> None:
    if args.source_taxonomy is not None and args.kind != "folder":
        raise PrepareError(f"--source_taxonomy applies to folder trees only; {args.kind} labels are read as "
                           f"{FAIRFACE_TAXONOMY if args.kind == 'fairface' else UTKFACE_TAXONOMY}")
    if args.val_csv is not None and args.kind != "fairface":
        raise PrepareError("--val_csv applies to fairface only")


def _source_taxonomy_spec(args: argparse.Namespace) -> str:
    if args.kind == "fairface":
        return FAIRFACE_TAXONOMY
    if args.kind == "utkface":
        return UTKFACE_TAXONOMY
    return args.source_taxonomy or args.taxonomy


def _load_overrides(label_map: str | None, source: Taxonomy, target: Taxonomy) -> dict[str, str | None] | None:
    if label_map is None:
        return None
    if not Path(label_map).is_file():
        raise PrepareError(f"label map not found: {label_map}")
    overrides = load_label_map(label_map)
    try:
        get_mapping(source, target, overrides)
    except UnknownLabelError as e:
        raise PrepareError(f"{label_map}: {e}") from None
    return overrides


def _read_source(args: argparse.Namespace, source: Taxonomy) -> tuple[list[Record], list[Record] | None, dict]:
    """(records, given validation records or None, report on what was skipped or fixed)."""
    if not Path(args.source).exists():
        raise PrepareError(f"SOURCE not found: {args.source}")
    report: dict = {"kind": args.kind, "path": os.path.abspath(args.source)}
    if args.kind == "folder":
        records = scan_folder_tree(args.source, source)
        report["loose_images"] = count_loose_images(records)
        return records, None, report
    if args.kind == "utkface":
        records, problems = scan_utkface(args.source)
        report["malformed_names"] = len(problems)
        return records, None, report
    train_csv, val_csv = resolve_fairface_source(args.source, args.val_csv)
    records, train_report = read_fairface_csv(train_csv, source)
    reports = [train_report]
    val_records = None
    if val_csv is not None:
        val_records, val_report = read_fairface_csv(val_csv, source)
        reports.append(val_report)
    report["csv"] = [r["csv"] for r in reports]
    report["missing_images"] = sum(len(r["missing"]) for r in reports)
    report["fixed_ages"] = {bad: good for r in reports for bad, good in r["fixed_ages"].items()}
    report["fixed_age_count"] = sum(r["fixed_age_count"] for r in reports)
    return records, val_records, report
