"""int8 quantization of an exported fp32 ONNX model with onnxruntime.quantization.

* static (default when calibration images are given): QDQ format, weights int8 per output channel,
  activations uint8 (the u8s8 kernels ONNX Runtime's CPU provider is fastest with), ranges calibrated
  on preprocessed images from a manifest;
* dynamic (no calibration images): ``quantize_dynamic``, weights int8, activation ranges computed at
  run time, for the matrix products only (MatMul, attention, LSTM, Gather). Convolutions stay fp32:
  ONNX Runtime runs a dynamically quantized Conv (ConvInteger) far slower than the fp32 Conv, and it
  cost accuracy (docs/deployment.md, "int8"). So dynamic
  int8 needs no data but speeds up only matmul-heavy models (transformers); CNNs need static.

Both run ``quant_pre_process`` first: shape inference plus graph optimisation, so that BatchNorm is
folded into the convolutions before they are quantized (otherwise each BN would be quantized apart).
Graph outputs keep their names (one per head for a model with gender/age heads); the race_classifier.*
metadata (classes, heads, calibration) is written onto the int8 file afterwards by ``export_checkpoint``.
"""
from __future__ import annotations

import contextlib
import io
import logging
import tempfile
from pathlib import Path

import numpy as np
from onnxruntime.quantization import (
    CalibrationDataReader,
    CalibrationMethod,
    QuantFormat,
    QuantType,
    quantize_dynamic,
    quantize_static,
)
from onnxruntime.quantization.shape_inference import quant_pre_process

from race_classifier.data.dataset import preprocessed_batches
from race_classifier.data.manifest import Sample
from race_classifier.data.transforms import Preprocessing
from race_classifier.export.onnx import ExportError, draw
from race_classifier.export.options import CALIBRATION_METHODS, DEFAULT_CALIBRATION
from race_classifier.models.onnx_metadata import INPUT_NAME

log = logging.getLogger(__name__)

CALIBRATION_BATCH = 16
DYNAMIC_OPS = ("MatMul", "Attention", "LSTM", "Gather")


def calibration_batches(samples: list[Sample], preprocessing: Preprocessing, n_images: int, seed: int = 0,
                        workers: int = 0) -> list[np.ndarray]:
    """A seeded random ``n_images`` of ``samples``, preprocessed exactly as at inference, in batches."""
    chosen = draw(samples, n_images, seed)
    batches = [images.numpy() for images, _ in preprocessed_batches(chosen, preprocessing, CALIBRATION_BATCH, workers)]
    if not batches:
        raise ExportError("no readable calibration image")
    return batches


def _reader(batches: list[np.ndarray]):
    class ImageCalibrationReader(CalibrationDataReader):
        """Feeds the preprocessed batches; ``set_range`` lets ORT calibrate one batch at a time
        (CalibStridedMinMax), so only one batch's intermediate tensors are held in memory."""

        def __init__(self):
            self.start, self.end, self.position = 0, len(batches), 0

        def __len__(self):
            return len(batches)

        def set_range(self, start_index: int, end_index: int):
            self.start, self.end, self.position = start_index, min(end_index, len(batches)), start_index

        def get_next(self):
            if self.position >= self.end:
                return None
            self.position += 1
            return {INPUT_NAME: batches[self.position - 1]}

    return ImageCalibrationReader()


def quantize_int8(fp32_path: str | Path, output_path: str | Path, calibration: list[np.ndarray] | None,
                  method: str = DEFAULT_CALIBRATION) -> dict:
    """Write the int8 model of ``fp32_path`` to ``output_path``; returns the recipe (for the metadata)."""
    if method not in CALIBRATION_METHODS:
        raise ValueError(f"unknown calibration method {method!r}: use one of {', '.join(CALIBRATION_METHODS)}")
    with tempfile.TemporaryDirectory(prefix="race-classifier-quant-") as tmp:
        prepared = Path(tmp) / "prepared.onnx"
        quant_pre_process(str(fp32_path), str(prepared))
        if calibration is None:
            quantize_dynamic(str(prepared), str(output_path), per_channel=True, weight_type=QuantType.QInt8,
                             op_types_to_quantize=list(DYNAMIC_OPS))
            return {"mode": "dynamic", "ops": list(DYNAMIC_OPS), "weights": "int8 per channel",
                    "activations": "uint8, ranges at run time", "convolutions": "fp32"}
        calibrate_method = {"minmax": CalibrationMethod.MinMax, "percentile": CalibrationMethod.Percentile,
                            "entropy": CalibrationMethod.Entropy}[method]
        progress = io.StringIO()  # the calibrator prints progress lines on stdout; keep the CLI's output clean
        with contextlib.redirect_stdout(progress):
            quantize_static(str(prepared), str(output_path), _reader(calibration), quant_format=QuantFormat.QDQ,
                            per_channel=True, activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8,
                            calibrate_method=calibrate_method,
                            extra_options={"CalibStridedMinMax": 1},  # one batch at a time (memory)
                            calibration_providers=["CPUExecutionProvider"])
        log.debug("calibration: %s", progress.getvalue())
    return {"mode": "static", "format": "QDQ", "weights": "int8 per channel", "activations": "uint8",
            "calibration": method, "calibration_images": int(sum(len(b) for b in calibration))}
