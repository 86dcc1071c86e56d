"""Several ONNX files that hold the same network store its weights once, in one external data file.

The bundled seed5 and fairface7 models are one trained network (seed5 sums fairface7's calibrated
probabilities in the graph), so their exported initializers are byte for byte the same. ONNX keeps large
tensors outside the graph file when asked (``external_data``: location, offset, length, read by ONNX Runtime
relative to the model file); here every distinct tensor is written once and each file points at it.
"""
from __future__ import annotations

import hashlib
from pathlib import Path

import onnx
from onnx import numpy_helper
from onnx.external_data_helper import set_external_data

from race_classifier.utils import atomic_write_bytes

# Smaller tensors stay inside the graph, as onnx's own converter does (size_threshold=1024).
MIN_EXTERNAL_BYTES = 1024
ALIGNMENT = 64  # bytes; aligned offsets let ONNX Runtime use the data in place


def store_weights_once(models: list[str | Path], data_name: str) -> dict:
    """Rewrite ``models`` (ONNX files in one folder) so that their initializers of at least MIN_EXTERNAL_BYTES
    live in ``data_name`` beside them, each distinct tensor once. Returns {"tensors", "shared", "bytes"}."""
    paths = [Path(p) for p in models]
    if len({p.parent.resolve() for p in paths}) != 1:
        raise ValueError("models sharing one external data file must be in one folder")
    data, offsets, tensors, shared = bytearray(), {}, 0, 0
    protos = [onnx.load(str(p)) for p in paths]
    for proto in protos:
        for tensor in proto.graph.initializer:
            raw = tensor.raw_data or numpy_helper.to_array(tensor).tobytes()
            if len(raw) < MIN_EXTERNAL_BYTES:
                continue
            key = (tensor.data_type, tuple(tensor.dims), hashlib.sha256(raw).hexdigest())
            tensors += 1
            if key in offsets:
                shared += 1
            else:
                data.extend(b"\0" * (-len(data) % ALIGNMENT))
                offsets[key] = len(data)
                data.extend(raw)
            # Typed fields (float_data, ...) would otherwise stay beside the external reference.
            for field in [f.name for f, _ in tensor.ListFields() if f.name not in ("dims", "data_type", "name")]:
                tensor.ClearField(field)
            tensor.raw_data = raw  # set_external_data requires it; the data itself is then left out
            set_external_data(tensor, data_name, offsets[key], len(raw))
            tensor.ClearField("raw_data")
    atomic_write_bytes(paths[0].parent / data_name, bytes(data))
    for path, proto in zip(paths, protos):
        atomic_write_bytes(path, proto.SerializeToString())
    return {"tensors": tensors, "shared": shared, "bytes": len(data)}
