"""``race-classifier export``: a checkpoint to a self-describing ONNX file, fp32 or int8, verified first.

    race-classifier export --model_path best.pt --output model.onnx [--opset 17]
        [--quantize int8 --calib_txt train.txt] [--val_txt val.txt] [--calib_images 256]

The file is written only if ONNX Runtime agrees with PyTorch (fp32: every probability, of every
head, within 1e-4)
and, for int8 with --val_txt, accuracy drops by at most --max_accuracy_drop points.
"""
from __future__ import annotations

import argparse
import json
import logging

from race_classifier.data.manifest import read_manifest
from race_classifier.export.exporter import ExportReport, export_checkpoint
from race_classifier.export.onnx import draw
from race_classifier.export.options import FP32_TOLERANCE
from race_classifier.labels import Taxonomy, get_taxonomy
from race_classifier.models.bundled import resolve_arguments
from race_classifier.models.checkpoint import load_checkpoint
from race_classifier.models.merged import label_mapping
from race_classifier.utils import atomic_write_text

log = logging.getLogger("race_classifier.export")


def _samples(manifest: str | None, taxonomy, limit: int | None = None, mapping=None, keep_unlabelled: bool = False):
    if not manifest:
        return None
    samples = read_manifest(manifest, taxonomy, mapping, keep_unlabelled=keep_unlabelled)
    return draw(samples, limit) if limit else samples


def print_report(report: ExportReport) -> None:
    print(f"compared on {report.n_images} {report.images}:")
    ok = "ok" if report.fp32.max_abs_diff <= FP32_TOLERANCE else "FAIL"
    print(f"  ONNX Runtime fp32 vs PyTorch: max |probability difference| {report.fp32.max_abs_diff:.2e} "
          f"(limit {FP32_TOLERANCE:g}: {ok}), top-1 agreement {100 * report.fp32.top1_agreement:.2f}%")
    if report.int8 is not None:
        print(f"  ONNX Runtime int8 ({report.quantization['mode']}) vs PyTorch: max |probability difference| "
              f"{report.int8.max_abs_diff:.3f}; int8 vs fp32 top-1 agreement {100 * report.int8_vs_fp32.top1_agreement:.2f}%")
    for head, agreement in (report.fp32_heads or {}).items():  # the lines above are the race head's
        ok = "ok" if agreement.max_abs_diff <= FP32_TOLERANCE else "FAIL"
        line = (f"  {head} head: fp32 vs PyTorch max |probability difference| {agreement.max_abs_diff:.2e} ({ok}), "
                f"top-1 agreement {100 * agreement.top1_agreement:.2f}%")
        if report.int8_heads:
            line += (f"; int8 vs PyTorch {report.int8_heads[head].max_abs_diff:.3f}, top-1 agreement "
                     f"{100 * report.int8_heads[head].top1_agreement:.2f}%")
        print(line)
    if report.accuracy:
        acc = report.accuracy
        line = f"  accuracy: PyTorch {100 * acc['torch']:.2f}%  ONNX fp32 {100 * acc['onnx_fp32']:.2f}%"
        if "onnx_int8" in acc:
            line += (f"  ONNX int8 {100 * acc['onnx_int8']:.2f}%  "
                     f"(int8 - fp32: {100 * (acc['onnx_int8'] - acc['onnx_fp32']):+.2f} points)")
        print(line)
    elif report.int8 is not None:
        print("  int8 accuracy not measured: give --val_txt")


def run(args: argparse.Namespace) -> int:
    # Manifests are read in the model's own classes (or mapped into them); an unknown label stops here, first.
    resolve_arguments(args, "model_path", checkpoint=True)
    ckpt = load_checkpoint(args.model_path)
    taxonomy = Taxonomy.from_dict(ckpt["taxonomy"])
    mapping = label_mapping(ckpt, get_taxonomy(args.source_taxonomy)) if args.source_taxonomy else None
    # A multi-task manifest keeps images without a race label (they train and check the other heads), as
    # evaluate reads it; their race label is -1 and race accuracy leaves them out.
    multitask = bool(ckpt.get("heads"))
    report = export_checkpoint(
        args.model_path, args.output, opset=args.opset, quantize=args.quantize,
        calib_samples=_samples(args.calib_txt, taxonomy, mapping=mapping, keep_unlabelled=multitask),
        val_samples=_samples(args.val_txt, taxonomy, args.max_val_images, mapping, keep_unlabelled=multitask),
        calib_images=args.calib_images, calib_method=args.calib_method, max_accuracy_drop=args.max_accuracy_drop,
        batch_size=args.batch_size, workers=args.workers, fp32_output=args.fp32_output)
    print_report(report)
    if args.report_json:
        atomic_write_text(args.report_json, json.dumps(report.to_dict(), indent=2))
    written = [args.output] + ([args.fp32_output] if args.fp32_output else [])
    print("wrote " + ", ".join(written))
    return 0
