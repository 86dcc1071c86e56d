"""The metadata that makes an exported ONNX file self-describing: written by ``export`` (``build_metadata``,
``write_metadata``), read by every loader (``read_metadata``). An exported file holds, in its ``metadata_props`` (keys below, values JSON where structured):

  race_classifier.format          "race-classifier-onnx"
  race_classifier.format_version  "1"
  race_classifier.taxonomy        Taxonomy.to_dict(): name and class order
  race_classifier.preprocessing   Preprocessing.to_dict(): size, mean, std, interpolation, crop geometry
  race_classifier.arch            the architecture name
  race_classifier.source          source checkpoint: file name, epoch, dataset, metrics
  race_classifier.exporter        race-classifier / torch / onnx versions and opset
  race_classifier.quantization    the int8 recipe (quantized files only)
  race_classifier.calibration     temperature, ECE/NLL before and after, abstention threshold (checkpoints
                                  calibrated on validation data only), per-head temperatures under "heads";
                                  the loader divides each head's logits by its temperature
  race_classifier.heads           HeadLayout.to_dict(): head names, classes, age groups (models with
                                  gender/age heads only)
  race_classifier.outputs         {head: graph output name} (models with gender/age heads only)

Graph: input "input" (N, 3, H, W) float32 with a dynamic batch axis; a race-only model has one output "logits"
(N, K), a model with gender/age heads one output per head, "race_logits", "gender_logits", "age_logits"
(``output_names``), so a deployer never slices a concatenation and a reader that takes the first output still
gets race.
"""
from __future__ import annotations

import json
from pathlib import Path

import onnx
import torch

from race_classifier.data.transforms import Preprocessing
from race_classifier.heads import HeadError, HeadLayout
from race_classifier.labels import Taxonomy
from race_classifier.models.ensemble import describe_ensemble
from race_classifier.models.merged import merge_summary
from race_classifier.version import __version__

ONNX_FORMAT = "race-classifier-onnx"
ONNX_FORMAT_VERSION = 1
META_PREFIX = "race_classifier."
INPUT_NAME, OUTPUT_NAME = "input", "logits"


def output_names(heads: HeadLayout) -> dict[str, str]:
    """{head: graph output}: "logits" for a race-only model (as before heads existed), else "<head>_logits"."""
    if not heads.extra:
        return {"race": OUTPUT_NAME}
    return {name: f"{name}_logits" for name in heads.names}


def build_metadata(checkpoint: dict, taxonomy: Taxonomy, preprocessing: Preprocessing, source: Path,
                   opset: int, heads: HeadLayout | None = None) -> dict[str, str]:
    source_info = {"checkpoint": source.name, "epoch": checkpoint.get("epoch"),
                   "dataset": (checkpoint.get("train_args") or {}).get("dataset"),
                   "metrics": checkpoint.get("metrics") or {}}
    if checkpoint.get("ensemble"):  # the average is in the graph; say so beside the classes
        source_info["ensemble"] = describe_ensemble(checkpoint["ensemble"])
    if checkpoint.get("merged_classes"):  # the merge is in the graph; say so beside the classes
        source_info["merged_classes"] = merge_summary(checkpoint["merged_classes"])
    metadata = {
        "format": ONNX_FORMAT,
        "format_version": str(ONNX_FORMAT_VERSION),
        "taxonomy": json.dumps(taxonomy.to_dict()),
        "preprocessing": json.dumps(preprocessing.to_dict()),
        "arch": str(checkpoint.get("arch", "")),
        "source": json.dumps(source_info, default=str),
        "exporter": json.dumps({"race_classifier": __version__, "torch": torch.__version__,
                                "onnx": onnx.__version__, "opset": opset}),
    }
    if checkpoint.get("calibration"):
        # The graph outputs raw logits; the loader applies the temperature, as it does for the checkpoint.
        metadata["calibration"] = json.dumps(checkpoint["calibration"], default=str)
    if heads is not None and heads.extra:  # race-only files stay exactly as before heads existed
        metadata["heads"] = json.dumps(heads.to_dict())
        metadata["outputs"] = json.dumps(output_names(heads))
    return metadata


def write_metadata(path: str | Path, metadata: dict[str, str]) -> None:
    """Replace the file's race_classifier.* metadata_props with ``metadata`` (keys without the prefix)."""
    model = onnx.load(str(path))
    kept = [p for p in model.metadata_props if not p.key.startswith(META_PREFIX)]
    del model.metadata_props[:]
    model.metadata_props.extend(kept)
    for key, value in metadata.items():
        model.metadata_props.add(key=META_PREFIX + key, value=value)
    # A human-readable line for tools that show only doc_string (Netron, onnx.helper.printable_graph).
    classes = json.loads(metadata["taxonomy"])["classes"]
    model.doc_string = (f"race-classifier model: perceived, socially constructed race categories "
                        f"({', '.join(classes)}); see metadata_props race_classifier.*")
    onnx.save(model, str(path))


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
