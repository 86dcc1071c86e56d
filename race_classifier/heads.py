"""Output heads: race (the taxonomy), and optionally gender and age group, from one shared backbone.

A model's last Linear layer gives every head's logits side by side, race first: ``[race | gender | age]``.
One Linear with the heads' outputs concatenated is exactly a set of separate linear heads on the shared
features, and keeps every model file single-output (backbone factory, TorchScript and ONNX unchanged).
The layout (head names and classes, age bins) travels in every checkpoint and export.

Labels, like race, are perceived categories read off a face. Gender classes are the ones the training data
uses (FairFace and UTKFace: Male, Female); no public face dataset labels other genders, and none can be
read from a face, so a class such as Non-binary exists only where a dataset provides it.

Age groups come from exact ages (UTKFace: ``23``) or from ranges (FairFace: ``10-19``, ``more than 70``).
A range is put in the group holding most of its whole years; a tie, or an open range (``70+``) that
reaches past a group edge, leaves the age unlabelled (the sample then trains no age head). With the
default groups, FairFace's ``10-19`` becomes Teen (7 of its 10 years), so 10-12-year-olds are counted as
teens: a caveat every model card repeats.

A model whose age head has no bins names its classes by the ranges they cover (FairFace's release model:
``0-2`` ... ``70+``); ``class_map`` sums such classes into another model's age groups by the same rule, so
two models' age heads can be scored and compared in one set of groups.
"""
from __future__ import annotations

import re
from dataclasses import dataclass

import numpy as np

HEAD_NAMES = ("race", "gender", "age")
DEFAULT_AGE_BINS = "Child:0,Teen:13,Adult:20,Senior:60"
UNKNOWN_VALUES = {"", "-", "?", "unknown", "na", "n/a", "none", "null"}
# gender and age fields (here and in evaluation.metrics): "nan" too, as pandas writes a missing value
MISSING_VALUES = UNKNOWN_VALUES | {"nan"}
_GENDER_SYNONYMS = {"male": "Male", "m": "Male", "man": "Male", "female": "Female", "f": "Female",
                    "woman": "Female"}
FAIRFACE_GENDERS = ("Male", "Female")
FAIRFACE_AGE_RANGES = ("0-2", "3-9", "10-19", "20-29", "30-39", "40-49", "50-59", "60-69", "70+")
_RANGE = re.compile(r"^(\d+)\s*-\s*(\d+)$")
_OPEN = re.compile(r"^(?:more than\s*|over\s*|>\s*)?(\d+)\s*\+?$")


class HeadError(ValueError):
    pass


@dataclass(frozen=True)
class AgeBins:
    """Named age groups by lower bound in years: ``Child:0,Teen:13,Adult:20,Senior:60``."""
    names: tuple[str, ...]
    lower: tuple[int, ...]

    @classmethod
    def parse(cls, spec: str = DEFAULT_AGE_BINS) -> "AgeBins":
        names, lower = [], []
        for part in spec.split(","):
            name, sep, edge = part.strip().rpartition(":")
            if not sep or not name.strip() or not edge.strip().isdigit():
                raise HeadError(f"age bins {spec!r}: expected 'Name:lower_age,...' (e.g. {DEFAULT_AGE_BINS})")
            names.append(name.strip())
            lower.append(int(edge))
        if lower[0] != 0 or any(b <= a for a, b in zip(lower, lower[1:])):
            raise HeadError(f"age bins {spec!r}: lower ages must start at 0 and increase")
        if len(set(names)) != len(names):
            raise HeadError(f"age bins {spec!r}: repeated group name")
        return cls(tuple(names), tuple(lower))

    def spec(self) -> str:
        return ",".join(f"{n}:{a}" for n, a in zip(self.names, self.lower))

    def describe(self) -> list[str]:
        """['Child (0-12)', ..., 'Senior (60+)']"""
        ends = [b - 1 for b in self.lower[1:]] + [None]
        return [f"{n} ({a}+)" if e is None else f"{n} ({a}-{e})" for n, a, e in zip(self.names, self.lower, ends)]

    def spans(self) -> list[str]:
        """The years each group covers, as ``index`` reads them: ['0-12', '13-19', '20-59', '60+']."""
        ends = [b - 1 for b in self.lower[1:]] + [None]
        return [f"{a}+" if e is None else f"{a}-{e}" for a, e in zip(self.lower, ends)]

    def of_age(self, years: float) -> int:
        return int(np.searchsorted(self.lower, years, side="right") - 1)

    def of_range(self, first: int, last: int) -> int | None:
        """The group holding most of the whole years first..last; None on a tie."""
        counts = np.bincount([self.of_age(y) for y in range(first, last + 1)], minlength=len(self.names))
        best = np.flatnonzero(counts == counts.max())
        return int(best[0]) if len(best) == 1 else None

    def index(self, age: str) -> int | None:
        """The group of a manifest's age field (``23``, ``10-19``, ``more than 70``, ``70+``, a group name),
        or None when unknown or ambiguous. Raises HeadError for text that is none of these."""
        text = str(age).strip().lower()
        if text in MISSING_VALUES:
            return None
        for i, name in enumerate(self.names):
            if text == name.lower():
                return i
        if m := _RANGE.match(text):
            first, last = int(m[1]), int(m[2])
            if last < first:
                raise HeadError(f"age range {age!r} ends before it starts")
            return self.of_range(first, last)
        if m := _OPEN.match(text):
            years = int(m[1])
            if "+" in text or "more" in text or "over" in text or ">" in text:
                return self.of_age(years) if years >= self.lower[-1] else None
            return self.of_age(years)
        try:
            years = float(text)
        except ValueError:
            raise HeadError(f"age {age!r} is not a number, a range such as 10-19, 'more than 70' or a group "
                            f"name ({', '.join(self.names)})") from None
        # A negative code (-1) or an infinite age is unknown, as evaluation.metrics.age_group reads it: binned,
        # it would land in no group (index -1) or in the last one.
        return self.of_age(years) if 0 <= years < float("inf") else None


def canonical_gender(value: str) -> str | None:
    """'male', 'M', 'Man' -> 'Male'; unknown -> None; any other value is kept as the dataset spells it."""
    text = str(value).strip()
    if text.lower() in MISSING_VALUES:
        return None
    return _GENDER_SYNONYMS.get(text.lower(), text)


def gender_classes(values) -> tuple[str, ...]:
    """The gender classes a dataset uses: Male, Female first (FairFace's order), then others sorted."""
    found = {g for g in map(canonical_gender, values) if g is not None}
    known = [g for g in ("Male", "Female") if g in found]
    return tuple(known + sorted(found - set(known)))


@dataclass(frozen=True)
class Head:
    name: str
    classes: tuple[str, ...]


@dataclass(frozen=True)
class HeadLayout:
    """Which heads a model has, in output order (race first), and what their classes are."""
    heads: tuple[Head, ...]
    age_bins: AgeBins | None = None

    @classmethod
    def race_only(cls, race_classes) -> "HeadLayout":
        return cls((Head("race", tuple(race_classes)),))

    @classmethod
    def build(cls, race_classes, names=("race",), genders=(), age_bins: AgeBins | None = None) -> "HeadLayout":
        unknown = [n for n in names if n not in HEAD_NAMES]
        if unknown:
            raise HeadError(f"unknown head(s) {', '.join(unknown)}: choose from {', '.join(HEAD_NAMES)}")
        if "race" not in names:
            raise HeadError("the race head cannot be turned off: it is what this toolkit classifies")
        heads = [Head("race", tuple(race_classes))]
        if "gender" in names:
            if len(genders) < 2:
                raise HeadError(f"the gender head needs at least two gender classes in the training data "
                                f"(found: {', '.join(genders) or 'none'}); is the manifest's gender column filled?")
            heads.append(Head("gender", tuple(genders)))
        if "age" in names:
            age_bins = age_bins or AgeBins.parse()
            heads.append(Head("age", age_bins.names))
        return cls(tuple(heads), age_bins if "age" in names else None)

    @property
    def names(self) -> tuple[str, ...]:
        return tuple(h.name for h in self.heads)

    @property
    def extra(self) -> tuple[Head, ...]:
        """The heads besides race."""
        return self.heads[1:]

    @property
    def num_outputs(self) -> int:
        return sum(len(h.classes) for h in self.heads)

    def get(self, name: str) -> Head | None:
        return next((h for h in self.heads if h.name == name), None)

    def slices(self) -> dict[str, slice]:
        out, start = {}, 0
        for h in self.heads:
            out[h.name] = slice(start, start + len(h.classes))
            start += len(h.classes)
        return out

    def split(self, logits):
        """{head name: its logits} of a (N, num_outputs) tensor or array."""
        return {name: logits[:, s] for name, s in self.slices().items()}

    def targets(self, race: int, gender: str, age: str) -> list[int]:
        """One sample's class index per head, -1 where its label is unknown (that head is not trained)."""
        out = [race]
        for h in self.extra:
            if h.name == "gender":
                g = canonical_gender(gender)
                out.append(h.classes.index(g) if g in h.classes else -1)
            else:
                index = self.age_bins.index(age)
                out.append(-1 if index is None else index)
        return out

    def to_dict(self) -> dict:
        return {"heads": [{"name": h.name, "classes": list(h.classes)} for h in self.heads],
                "age_bins": self.age_bins.spec() if self.age_bins else None}

    @classmethod
    def from_dict(cls, d: dict | None, race_classes) -> "HeadLayout":
        """The layout stored in a checkpoint or export; files from before heads existed are race-only."""
        if not d:
            return cls.race_only(race_classes)
        heads = tuple(Head(h["name"], tuple(h["classes"])) for h in d["heads"])
        if not heads or heads[0].name != "race" or list(heads[0].classes) != list(race_classes):
            raise HeadError("head layout does not start with the race head of the model's taxonomy")
        return cls(heads, AgeBins.parse(d["age_bins"]) if d.get("age_bins") else None)


def age_spans(layout: HeadLayout) -> list[str]:
    """The ages each class of ``layout``'s age head covers: its bins' spans, or (a head without bins, such as
    FairFace's) the class names, which are then ranges."""
    head = layout.get("age")
    return layout.age_bins.spans() if layout.age_bins else list(head.classes)


def class_map(source: HeadLayout, target: HeadLayout, name: str) -> np.ndarray | None:
    """(source classes, target classes) 0/1 matrix: ``probs @ M`` puts ``source``'s ``name`` head into
    ``target``'s classes. Gender: by class name. Age: each source class's span goes to the target group
    ``AgeBins.index`` gives it (a span with no single group, such as ``10-19`` against ``Young:0,Old:15``, or
    an open ``70+`` reaching past a group edge, maps nowhere: its probability is dropped). None when the two
    heads share no class (nothing to compare)."""
    s_head, t_head = source.get(name), target.get(name)
    if s_head is None or t_head is None:
        return None
    matrix = np.zeros((len(s_head.classes), len(t_head.classes)))
    if name == "age":
        if target.age_bins is None:
            raise HeadError("the target layout's age head needs age bins")
        for i, span in enumerate(age_spans(source)):
            try:
                j = target.age_bins.index(span)
            except HeadError:
                j = None
            if j is not None:
                matrix[i, j] = 1.0
    else:
        for i, c in enumerate(s_head.classes):
            if c in t_head.classes:
                matrix[i, t_head.classes.index(c)] = 1.0
    return matrix if matrix.any() else None


def head_targets(layout: HeadLayout, samples, source: str = "manifest") -> np.ndarray:
    """(N, heads) int64 class indices of manifest samples, -1 where a label is unknown."""
    rows = []
    for s in samples:
        try:
            rows.append(layout.targets(s.label, s.gender, s.age))
        except HeadError as e:
            raise HeadError(f"{source}:{s.line}: {e} ({s.path})") from None
    return np.array(rows, dtype=np.int64).reshape(len(rows), len(layout.heads))
