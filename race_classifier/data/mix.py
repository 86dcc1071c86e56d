"""``race-classifier prepare mix CONFIG.yaml``: several datasets in one pair of manifests.

The config names a target taxonomy and a list of sources, each read by its own reader (``sources.py``),
mapped from its own taxonomy into the target (a class that has no counterpart, such as UTKFace's
Others, is dropped and counted) and split on its own (by identity, or by its given validation set),
so that every source has validation images and per-source validation accuracy means something::

    taxonomy: seed5            # target (default: --taxonomy)
    val_fraction: 0.1          # per source, where it has no given validation set (default: --val_fraction)
    seed: 0
    sources:
      - name: fairface         # letters, digits, _ or -; becomes the manifests' source column
        kind: fairface         # fairface | utkface | folder | manifest
        path: /data/fairface   # relative paths are read from the config's folder
        weight: 0.5            # share of each epoch's training draws (all sources or none)
      - name: utkface
        kind: utkface
        path: /data/UTKFace
        weight: 0.2
      - name: inhouse
        kind: folder
        path: /data/faces
        taxonomy: fairface7    # folder and manifest: the taxonomy its labels are in (default: target)
        label_map: {Middle Eastern: White}   # or a YAML file; overrides the built-in mapping
        weight: 0.3

``val`` (fairface: a validation CSV; manifest: a validation manifest) gives a source's validation set.
Outputs: train.txt and val.txt with a fifth ``source`` column, classes.txt, and (when weights are given)
``source_weights.yaml``, which training reads as its default ``--source_weights``.
"""
from __future__ import annotations

import re
from collections import Counter
from dataclasses import dataclass, replace
from pathlib import Path

import yaml

from race_classifier.data.manifest import write_manifest_set
from race_classifier.data.sources import (
    FAIRFACE_TAXONOMY,
    UTKFACE_TAXONOMY,
    PrepareError,
    Record,
    read_fairface_csv,
    read_manifest_records,
    resolve_fairface_source,
    scan_folder_tree,
    scan_utkface,
)
from race_classifier.data.split import map_records, split_then_map
from race_classifier.labels import (
    Taxonomy,
    UnknownLabelError,
    get_mapping,
    get_taxonomy,
    load_label_map,
)

SOURCE_KINDS = ("fairface", "utkface", "folder", "manifest")
WEIGHTS_FILE = "source_weights.yaml"
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_-]*$")
# val_<name>_accuracy must not be another column of the training log.
RESERVED_NAMES = frozenset({"balanced", "worst_class", "loss", "gender", "age", "race"})
_SOURCE_KEYS = {"name", "kind", "path", "weight", "taxonomy", "label_map", "val"}


@dataclass(frozen=True)
class MixSource:
    name: str
    kind: str
    path: Path
    taxonomy: Taxonomy  # the taxonomy its labels are read in
    weight: float | None = None
    label_map: dict[str, str | None] | None = None
    val: Path | None = None


@dataclass(frozen=True)
class MixConfig:
    taxonomy: Taxonomy
    val_fraction: float
    seed: int
    sources: tuple[MixSource, ...]

    @property
    def weights(self) -> dict[str, float] | None:
        if self.sources[0].weight is None:
            return None
        return {s.name: s.weight for s in self.sources}


def load_mix_config(path: str | Path, default_taxonomy: str, default_val_fraction: float,
                    default_seed: int) -> MixConfig:
    """Read and check a mix config; every problem is a PrepareError naming the file and the source."""
    path = Path(path)
    if not path.is_file():
        raise PrepareError(f"mix config not found: {path}")
    data = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    if not isinstance(data, dict) or not isinstance(data.get("sources"), list) or not data["sources"]:
        raise PrepareError(f"{path}: expected a mapping with a non-empty 'sources' list")
    unknown = set(data) - {"taxonomy", "val_fraction", "seed", "sources"}
    if unknown:
        raise PrepareError(f"{path}: unknown key(s) {', '.join(sorted(unknown))}")
    target = get_taxonomy(str(data.get("taxonomy", default_taxonomy)))
    sources = tuple(_mix_source(path, i, entry, target) for i, entry in enumerate(data["sources"], 1))
    names = Counter(s.name for s in sources)
    if dupes := [n for n, k in names.items() if k > 1]:
        raise PrepareError(f"{path}: source name(s) used twice: {', '.join(dupes)}")
    weighted = [s.weight is not None for s in sources]
    if any(weighted) and not all(weighted):
        raise PrepareError(f"{path}: give every source a weight, or none (sampling then follows their sizes); "
                           f"no weight: {', '.join(s.name for s in sources if s.weight is None)}")
    if all(weighted) and sum(s.weight for s in sources) <= 0:
        raise PrepareError(f"{path}: the source weights add up to 0")
    return MixConfig(target, float(data.get("val_fraction", default_val_fraction)),
                     int(data.get("seed", default_seed)), sources)


def _mix_source(config: Path, number: int, entry, target: Taxonomy) -> MixSource:
    where = f"{config}: source {number}"
    if not isinstance(entry, dict):
        raise PrepareError(f"{where}: expected a mapping (name, kind, path, ...)")
    if unknown := set(entry) - _SOURCE_KEYS:
        raise PrepareError(f"{where}: unknown key(s) {', '.join(sorted(unknown))}")
    name = str(entry.get("name", ""))
    if not _NAME.match(name) or name.lower() in RESERVED_NAMES:
        raise PrepareError(f"{where}: name {name!r} must be letters, digits, _ or - (it names log columns "
                           f"val_<name>_accuracy) and none of {', '.join(sorted(RESERVED_NAMES))}")
    where = f"{config}: source {name!r}"
    kind = entry.get("kind")
    if kind not in SOURCE_KINDS:
        raise PrepareError(f"{where}: kind {kind!r} is not one of {', '.join(SOURCE_KINDS)}")
    if "path" not in entry:
        raise PrepareError(f"{where}: no path")
    fixed = {"fairface": FAIRFACE_TAXONOMY, "utkface": UTKFACE_TAXONOMY}.get(kind)
    if fixed and "taxonomy" in entry:
        raise PrepareError(f"{where}: {kind} labels are always read as {fixed}; use label_map to change the mapping")
    if "val" in entry and kind not in ("fairface", "manifest"):
        raise PrepareError(f"{where}: 'val' applies to fairface and manifest sources only")
    weight = entry.get("weight")
    if weight is not None and (not isinstance(weight, (int, float)) or weight < 0):
        raise PrepareError(f"{where}: weight must be a number >= 0, not {weight!r}")
    spec = fixed or entry.get("taxonomy")
    label_map = entry.get("label_map")
    if isinstance(label_map, str):
        label_map = load_label_map(_resolve(config, label_map))
    elif label_map is not None and not isinstance(label_map, dict):
        raise PrepareError(f"{where}: label_map must be a mapping or a YAML file")
    if isinstance(label_map, dict):
        label_map = {str(k): (None if v is None else str(v)) for k, v in label_map.items()}
    try:
        source_taxonomy = get_taxonomy(str(spec)) if spec else target
        get_mapping(source_taxonomy, target, label_map)
    except (UnknownLabelError, ValueError) as e:
        raise PrepareError(f"{where}: {e}") from None
    return MixSource(name, kind, _resolve(config, entry["path"]), source_taxonomy,
                     None if weight is None else float(weight), label_map,
                     _resolve(config, entry["val"]) if "val" in entry else None)


def _resolve(config: Path, value) -> Path:
    p = Path(str(value)).expanduser()
    return p if p.is_absolute() else (config.resolve().parent / p)


def read_mix_source(source: MixSource) -> tuple[list[Record], list[Record] | None]:
    """(records, given validation records or None), labels in the source's own taxonomy."""
    if not source.path.exists():
        raise PrepareError(f"source {source.name!r}: {source.path} not found")
    if source.kind == "folder":
        return scan_folder_tree(source.path, source.taxonomy), None
    if source.kind == "utkface":
        return scan_utkface(source.path)[0], None
    if source.kind == "manifest":
        val = read_manifest_records(source.val, source.taxonomy) if source.val else None
        return read_manifest_records(source.path, source.taxonomy), val
    train_csv, val_csv = resolve_fairface_source(source.path, source.val)
    val = read_fairface_csv(val_csv, source.taxonomy)[0] if val_csv else None
    return read_fairface_csv(train_csv, source.taxonomy)[0], val


def prepare_mix(config: MixConfig, out_dir: str | Path) -> dict:
    """Read, map and split every source; write train.txt, val.txt (with a source column), classes.txt and,
    with weights, source_weights.yaml. Returns a summary (``format_mix_summary``)."""
    train: list[Record] = []
    val: list[Record] = []
    per_source = {}
    for source in config.sources:
        mapping = get_mapping(source.taxonomy, config.taxonomy, source.label_map)
        records, given_val = read_mix_source(source)
        if given_val is not None:
            source_train, dropped = map_records(records, mapping)
            source_val, val_dropped = map_records(given_val, mapping)
            dropped += val_dropped
        else:
            try:
                source_train, source_val, dropped = split_then_map(records, mapping, config.val_fraction,
                                                                   config.seed)
            except PrepareError as e:
                raise PrepareError(f"source {source.name!r}: {e}") from None
        if not source_train or not source_val:
            raise PrepareError(f"source {source.name!r}: no {'training' if not source_train else 'validation'} "
                               "images left after mapping")
        train += [replace(r, source=source.name) for r in source_train]
        val += [replace(r, source=source.name) for r in source_val]
        per_source[source.name] = {
            "kind": source.kind, "path": str(source.path), "taxonomy": source.taxonomy.name,
            "weight": source.weight, "mapping": mapping.describe(), "dropped": dict(sorted(dropped.items())),
            "train": len(source_train), "val": len(source_val),
            "validation": "given" if given_val is not None else "split"}
    out_dir = Path(out_dir)
    rows = lambda records: [(r.path, r.label, r.gender, r.age, r.source) for r in records]  # noqa: E731
    weights = None  # no weights: a previous mix's file is removed, it must not apply to this one
    if config.weights is not None:
        weights = ("# share of each epoch's training draws per source (prepare mix)\n"
                   + yaml.safe_dump(config.weights, sort_keys=False))
    write_manifest_set(out_dir, rows(train), rows(val), config.taxonomy, also={WEIGHTS_FILE: weights})
    in_train, in_val = Counter(r.label for r in train), Counter(r.label for r in val)
    return {"out_dir": str(out_dir), "target_taxonomy": config.taxonomy.name, "sources": per_source,
            "counts": {c: {"train": in_train[c], "val": in_val[c]} for c in config.taxonomy.classes},
            "train": len(train), "val": len(val), "weights": config.weights,
            "files": [str(out_dir / n) for n in ("train.txt", "val.txt", "classes.txt")]
            + ([str(out_dir / WEIGHTS_FILE)] if config.weights else [])}


def format_mix_summary(summary: dict) -> str:
    width = max(len(n) for n in list(summary["sources"]) + list(summary["counts"]) + ["total"])
    lines = [f"taxonomy {summary['target_taxonomy']}, {len(summary['sources'])} sources",
             f"{'source':<{width}}  {'train':>7}  {'val':>7}  {'weight':>6}"]
    for name, s in summary["sources"].items():
        weight = "-" if s["weight"] is None else f"{s['weight']:g}"
        lines.append(f"{name:<{width}}  {s['train']:>7}  {s['val']:>7}  {weight:>6}   {s['kind']} {s['path']}"
                     + (" (given validation set)" if s["validation"] == "given" else ""))
        if s["mapping"]:
            lines.append(f"{'':<{width}}  mapping ({s['taxonomy']}): " + "; ".join(s["mapping"]))
        if s["dropped"]:
            lines.append(f"{'':<{width}}  dropped: " + ", ".join(f"{c} {n}" for c, n in s["dropped"].items()))
    lines.append(f"{'class':<{width}}  {'train':>7}  {'val':>7}")
    lines += [f"{c:<{width}}  {n['train']:>7}  {n['val']:>7}" for c, n in summary["counts"].items()]
    lines.append(f"{'total':<{width}}  {summary['train']:>7}  {summary['val']:>7}")
    lines.append("wrote " + ", ".join(summary["files"]))
    return "\n".join(lines)


def read_source_weights(spec: str) -> dict[str, float]:
    """``--source_weights``: a YAML file of ``source: weight`` (``source_weights.yaml``, as ``prepare mix``
    writes) or an inline list ``fairface=0.5,utkface=0.5``."""
    if Path(spec).is_file():
        data = yaml.safe_load(Path(spec).read_text(encoding="utf-8")) or {}
        where = spec
    else:
        try:
            data = dict(part.split("=", 1) for part in spec.split(",") if part.strip())
        except ValueError:
            raise ValueError(f"--source_weights {spec!r}: give a YAML file or name=weight,name=weight") from None
        where = "--source_weights"
    if not isinstance(data, dict) or not data:
        raise ValueError(f"{where}: expected source names with weights")
    weights = {}
    for name, value in data.items():
        try:
            weights[str(name).strip()] = float(value)
        except (TypeError, ValueError):
            raise ValueError(f"{where}: weight of {name!r} is not a number: {value!r}") from None
        if weights[str(name).strip()] < 0:
            raise ValueError(f"{where}: weight of {name!r} is negative")
    return weights
