"""Label taxonomies, label matching and mappings between taxonomies.

The built-in tables live in ``taxonomies.yaml`` beside this file; this module only interprets them.
A taxonomy travels inside every checkpoint (``Taxonomy.to_dict``), so a model file alone names its classes.
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path

import yaml

_TABLES_PATH = Path(__file__).with_name("taxonomies.yaml")
DEFAULT_TAXONOMY = "seed5"


class UnknownLabelError(ValueError):
    """A label that matches no class of the taxonomy (never silently turned into a new class)."""


def normalize_label(label: str) -> str:
    """'Latino_Hispanic', 'latino hispanic', 'Latino/Hispanic' -> 'latino hispanic'."""
    return " ".join(re.split(r"[\s_\-/]+", str(label).strip().lower())).strip()


@lru_cache(maxsize=1)
def _tables() -> dict:
    with open(_TABLES_PATH, encoding="utf-8") as f:
        return yaml.safe_load(f)


def builtin_taxonomies() -> dict[str, list[str]]:
    return {name: list(classes) for name, classes in _tables()["taxonomies"].items()}


@dataclass(frozen=True)
class Taxonomy:
    name: str
    classes: tuple[str, ...]
    _index: dict = field(init=False, repr=False, compare=False)

    def __post_init__(self):
        if not self.classes:
            raise ValueError(f"taxonomy {self.name!r} has no classes")
        index = {}
        for i, c in enumerate(self.classes):
            key = normalize_label(c)
            if not key:
                raise ValueError(f"taxonomy {self.name!r}: empty class name at position {i}")
            if key in index:
                raise ValueError(f"taxonomy {self.name!r}: classes {self.classes[index[key]]!r} and {c!r} "
                                 "are the same label once case and separators are ignored")
            index[key] = i
        for alias, canonical in _tables().get("synonyms", {}).items():
            target = index.get(normalize_label(canonical))
            if target is not None:
                index.setdefault(normalize_label(alias), target)
        object.__setattr__(self, "_index", index)

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    def index(self, label: str | int) -> int:
        """Class index of a label given as a class name, a synonym, or an index."""
        if isinstance(label, int) or (isinstance(label, str) and label.strip().isdigit()):
            i = int(label)
            if 0 <= i < self.num_classes:
                return i
            raise UnknownLabelError(f"label index {i} is out of range for taxonomy {self.name!r} "
                                    f"({self.num_classes} classes: {', '.join(self.classes)})")
        i = self._index.get(normalize_label(label))
        if i is None:
            raise UnknownLabelError(f"unknown label {label!r}: not a class of taxonomy {self.name!r} "
                                    f"({', '.join(self.classes)}) nor a known synonym of one")
        return i

    def canonical(self, label: str | int) -> str:
        return self.classes[self.index(label)]

    def to_dict(self) -> dict:
        return {"name": self.name, "classes": list(self.classes)}

    @classmethod
    def from_dict(cls, d: dict) -> "Taxonomy":
        return cls(d["name"], tuple(d["classes"]))


def get_taxonomy(spec: str | list[str] | Taxonomy) -> Taxonomy:
    """A taxonomy by built-in name, a file of class names (one a line), or a comma-separated list."""
    if isinstance(spec, Taxonomy):
        return spec
    if isinstance(spec, (list, tuple)):
        return Taxonomy("custom", tuple(str(c).strip() for c in spec))
    builtin = builtin_taxonomies()
    if spec in builtin:
        return Taxonomy(spec, tuple(builtin[spec]))
    path = Path(spec)
    if path.is_file():
        lines = [ln.strip() for ln in path.read_text(encoding="utf-8").splitlines()]
        # A class file written by `prepare` names its taxonomy in its first comment line.
        name = lines[0][len("# taxonomy:"):].strip() if lines and lines[0].startswith("# taxonomy:") else path.stem
        return Taxonomy(name, tuple(n for n in lines if n and not n.startswith("#")))
    if "," in spec:
        return Taxonomy("custom", tuple(c.strip() for c in spec.split(",") if c.strip()))
    raise ValueError(f"unknown taxonomy {spec!r}: use one of {', '.join(builtin)}, "
                     "a file of class names, or a comma-separated list")


def class_file_text(taxonomy: Taxonomy) -> str:
    return f"# taxonomy: {taxonomy.name}\n" + "".join(c + "\n" for c in taxonomy.classes)


@dataclass(frozen=True)
class LabelMapping:
    """Maps class indices of ``source`` to class indices of ``target``; None drops the class."""
    source: Taxonomy
    target: Taxonomy
    table: tuple[int | None, ...]

    def __call__(self, source_index: int) -> int | None:
        return self.table[source_index]

    def map_label(self, label: str | int) -> int | None:
        return self.table[self.source.index(label)]

    def describe(self) -> list[str]:
        return [f"{s} -> {self.target.classes[t] if t is not None else '(dropped)'}"
                for s, t in zip(self.source.classes, self.table) if t is None or s != self.target.classes[t]]


def get_mapping(source: Taxonomy, target: Taxonomy, overrides: dict[str, str | None] | None = None) -> LabelMapping:
    """The mapping source -> target: built-in table for the pair, then ``overrides``, then same names.

    ``overrides`` maps source class names to target class names, or to None to drop the class.
    """
    table_spec: dict[str, str | None] = {}
    builtin = _tables().get("mappings", {}).get(f"{source.name}->{target.name}") or {}
    for key, value in list(builtin.items()) + list((overrides or {}).items()):
        table_spec[source.canonical(key)] = None if value is None or str(value).lower() in ("null", "none", "drop") else value
    table: list[int | None] = []
    for cls in source.classes:
        if cls in table_spec:
            value = table_spec[cls]
            table.append(None if value is None else target.index(value))
            continue
        try:
            table.append(target.index(cls))
        except UnknownLabelError:
            raise UnknownLabelError(
                f"class {cls!r} of taxonomy {source.name!r} has no counterpart in {target.name!r} "
                f"({', '.join(target.classes)}); map it or drop it with a label map "
                f"(for example  {cls}: null)") from None
    return LabelMapping(source, target, tuple(table))


def load_label_map(path: str | Path) -> dict[str, str | None]:
    """A YAML file of ``source class: target class`` (null drops the class)."""
    with open(path, encoding="utf-8") as f:
        data = yaml.safe_load(f) or {}
    if not isinstance(data, dict):
        raise ValueError(f"{path}: a label map must be a YAML mapping of source class to target class (or null)")
    return {str(k): (None if v is None else str(v)) for k, v in data.items()}
