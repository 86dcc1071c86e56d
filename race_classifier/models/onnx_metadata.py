"""The metadata that makes an exported ONNX file self-describing, as loaders read it (export/onnx.py writes it
and lists the keys): ``race_classifier.format``, ``format_version``, ``taxonomy``, ``preprocessing``, ``heads``,
``outputs``, ``calibration`` and the rest, JSON where structured."""
from __future__ import annotations

import json

from race_classifier.data.transforms import Preprocessing
from race_classifier.heads import HeadError, HeadLayout
from race_classifier.labels import Taxonomy

ONNX_FORMAT = "race-classifier-onnx"
ONNX_FORMAT_VERSION = 1
META_PREFIX = "race_classifier."


def read_metadata(props: dict[str, str]) -> dict | None:
    """Parsed race_classifier.* metadata of an ONNX file, or None when the file is not one of ours.

    Returns {"taxonomy": Taxonomy, "preprocessing": Preprocessing, "heads": HeadLayout, "outputs": {head:
    graph output name} or None (race-only: the first output), "info": dict of the rest}.
    Raises ValueError for a file of ours that is malformed or newer than this code understands.
    """
    if props.get(META_PREFIX + "format") != ONNX_FORMAT:
        return None
    version = int(props.get(META_PREFIX + "format_version", "0") or 0)
    if version > ONNX_FORMAT_VERSION:
        raise ValueError(f"ONNX metadata format {version} is newer than this version of race-classifier "
                         f"understands ({ONNX_FORMAT_VERSION})")
    try:
        taxonomy = Taxonomy.from_dict(json.loads(props[META_PREFIX + "taxonomy"]))
        preprocessing = Preprocessing.from_dict(json.loads(props[META_PREFIX + "preprocessing"]))
        info = {key[len(META_PREFIX):]: _maybe_json(value) for key, value in props.items()
                if key.startswith(META_PREFIX) and key not in (META_PREFIX + "taxonomy", META_PREFIX + "preprocessing")}
    except (KeyError, ValueError, TypeError) as e:
        raise ValueError(f"malformed race-classifier ONNX metadata ({e!r})") from None
    heads, outputs = _read_heads(info, taxonomy)
    return {"taxonomy": taxonomy, "preprocessing": preprocessing, "heads": heads, "outputs": outputs, "info": info}


def _read_heads(info: dict, taxonomy: Taxonomy) -> tuple[HeadLayout, dict[str, str] | None]:
    """The head layout and per-head output names; files without them (exported before heads existed, or
    race-only) have the race head alone, on the graph's first output."""
    try:
        heads = HeadLayout.from_dict(info.get("heads"), taxonomy.classes)
    except (KeyError, TypeError, ValueError, HeadError) as e:
        raise ValueError(f"malformed race_classifier.heads metadata ({e!r})") from None
    outputs = info.get("outputs")
    if not heads.extra and outputs is None:
        return heads, None
    if not (isinstance(outputs, dict) and set(outputs) == set(heads.names)
            and all(isinstance(v, str) and v for v in outputs.values())):
        raise ValueError(f"race_classifier.outputs metadata {outputs!r} does not name one graph output for each "
                         f"head ({', '.join(heads.names)})")
    return heads, {name: outputs[name] for name in heads.names}


def _maybe_json(value: str):
    try:
        return json.loads(value)
    except ValueError:
        return value
