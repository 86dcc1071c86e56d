"""``race-classifier prepare``: train/val manifests and a class file from a labelled image source.

The source (a folder tree, FairFace's label CSV or UTKFace's files) is read by ``sources``. Labels
are read in the source's taxonomy and mapped to the target taxonomy (``get_mapping``); classes
the mapping drops are left out and counted. Validation images are split off by identity, so no person
is on both sides, stratified by source class and seeded, before mapping (so a seed holds out the same
images in every taxonomy). Outputs: ``train.txt``, ``val.txt`` (absolute path,
class name, gender, age) and ``classes.txt``; ``mix`` combines several sources (``mix.py``), and
``--shards`` also stores the images pre-resized for training (``shards.py``).

The labels are perceived, socially constructed categories, not facts about a person.
"""
from __future__ import annotations

import argparse
import logging
import os
from collections import Counter
from pathlib import Path

from race_classifier.data.manifest import write_manifest_set
from race_classifier.data.mix import (
    WEIGHTS_FILE,
    format_mix_summary,
    load_mix_config,
    prepare_mix,
)
from race_classifier.data.shards import (
    build_prepared_shards,
    format_shard_summary,
    parse_sizes,
)
from race_classifier.data.sources import (
    FAIRFACE_TAXONOMY,
    UTKFACE_TAXONOMY,
    PrepareError,
    Record,
    _warn_list,
    count_loose_images,
    read_fairface_csv,
    resolve_fairface_source,
    scan_folder_tree,
    scan_utkface,
)
from race_classifier.data.split import (
    check_val_fraction,
    map_records,
    require_images,
    split_then_map,
)
from race_classifier.labels import (
    DEFAULT_TAXONOMY,
    LabelMapping,
    Taxonomy,
    UnknownLabelError,
    get_mapping,
    get_taxonomy,
    load_label_map,
)

log = logging.getLogger(__name__)



# ------------------------------------------------------------------------------------------- prepare

def prepare(records: list[Record], out_dir: str | Path, source_taxonomy: Taxonomy | str,
            target_taxonomy: Taxonomy | str = DEFAULT_TAXONOMY, label_overrides: dict[str, str | None] | None = None,
            val_fraction: float = 0.1, seed: int = 0, val_records: list[Record] | None = None) -> dict:
    """Map ``records`` to the target taxonomy, split, and write train.txt, val.txt and classes.txt.

    With ``val_records`` (a given validation set, e.g. FairFace's) there is no random split and
    ``val_fraction`` is ignored. Returns a summary dict (see ``format_summary``).
    """
    source, target = get_taxonomy(source_taxonomy), get_taxonomy(target_taxonomy)
    check_val_fraction(val_fraction)
    mapping = get_mapping(source, target, label_overrides)
    if val_records is None:
        train, val, dropped = split_then_map(records, mapping, val_fraction, seed)
    else:
        train, dropped = map_records(records, mapping)
        val, val_dropped = map_records(val_records, mapping)
        require_images(train, dropped, "training ")
        require_images(val, val_dropped, "validation ")
        dropped += val_dropped
        _warn_shared_identities(train, val)
    _warn_classes_without_val(target, train, val)
    out_dir = Path(out_dir)
    # These manifests have no source column: a weights file left by an earlier `prepare mix` into this folder
    # would be read by training as its default --source_weights, and stop it.
    write_manifest_set(out_dir, [_row(r) for r in train], [_row(r) for r in val], target, also={WEIGHTS_FILE: None})
    return _summary(out_dir, source, target, mapping, train, val, dropped,
                    "split" if val_records is None else "given", val_fraction, seed)


def _row(record: Record) -> tuple[str, str, str, str, str]:
    return record.path, record.label, record.gender, record.age, record.source


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
    read_as = "" if summary["source_taxonomy"] == summary["target_taxonomy"] else f" (labels read as {summary['source_taxonomy']})"
    lines = [f"taxonomy {summary['target_taxonomy']}{read_as}",
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

def run(args: argparse.Namespace) -> int:
    """Carry out ``prepare`` for parsed arguments; prints the summary. Bad input raises PrepareError."""
    _check_kind_options(args)
    sizes = parse_sizes(args.shards) if args.shards else []  # before a long scan, so a bad value fails fast
    if args.images_per_shard < 1:
        raise PrepareError("--images_per_shard must be at least 1")
    if args.kind == "mix":
        config = load_mix_config(args.source, args.taxonomy, args.val_fraction, args.seed)
        print(format_mix_summary(prepare_mix(config, args.out)), flush=True)
    else:
        target = get_taxonomy(args.taxonomy)
        source = get_taxonomy(_source_taxonomy_spec(args))
        overrides = _load_overrides(args.label_map, source, target)  # before a long scan, so a bad map fails fast
        records, val_records, report = _read_source(args, source)
        summary = prepare(records, args.out, source, target, overrides, args.val_fraction, args.seed, val_records)
        summary["source"] = report
        print(format_summary(summary), flush=True)
    # Manifests first, shards after: a prepare killed while storing leaves usable manifests and no shard index.
    for shard_summary in build_prepared_shards(args.out, sizes, args.workers, args.images_per_shard):
        print("\n".join(format_shard_summary(shard_summary)), flush=True)
    return 0


def _check_kind_options(args: argparse.Namespace) -> None:
    if args.kind == "mix" and (args.source_taxonomy or args.label_map):
        raise PrepareError("mix: give each source's taxonomy and label_map in the mix config")
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
