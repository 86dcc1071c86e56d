"""``race-classifier evaluate`` / ``compare`` and the root ``evaluation.py``.

    evaluation.py --root_dir R --model_path M --output_csv O.csv --output_html O.html [--baseline_path B] [--tta]

Writes the per-image CSV, a JSON of every figure (``<output_csv>.metrics.json``), the HTML report and,
with a baseline, the baseline's per-image CSV and the side-by-side comparison with significance tests.
"""
from __future__ import annotations

import argparse
import json
import logging
from pathlib import Path

from race_classifier.evaluation.formatting import fmt_ci, fmt_num, fmt_pct, fmt_pp
from race_classifier.evaluation.runner import (load_eval_samples, predict_samples, predictions_from_csv,
                                               write_predictions_csv)
from race_classifier.labels import get_mapping, get_taxonomy, load_label_map
from race_classifier.models.loaders import load_predictor
from race_classifier.utils import atomic_write_text

log = logging.getLogger("race_classifier.evaluate")


def add_arguments(p: argparse.ArgumentParser, baseline_required: bool = False) -> argparse.ArgumentParser:
    p.add_argument("--model_path", required=True, help="the model to evaluate: a checkpoint, FairFace "
                   "ResNet-34, TorchScript or ONNX file")
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--root_dir", help="images as root/<race>/<identity>/<image>")
    src.add_argument("--val_txt", help="a manifest (gender/age columns used when present)")
    p.add_argument("--output_csv", required=True, help="per-image predictions")
    p.add_argument("--output_html", help="self-contained HTML report")
    p.add_argument("--taxonomy", help="evaluate in this taxonomy (default: the model's own classes)")
    p.add_argument("--source_taxonomy", help="taxonomy of the data's labels, when it differs (mapped)")
    p.add_argument("--label_map", help="YAML overriding the data-label mapping (class: class or null)")
    p.add_argument("--labels", help="class order of a model file without metadata (TorchScript/ONNX)")
    p.add_argument("--image_size", type=int, help="input size of a model file without metadata")
    p.add_argument("--mean", type=float, nargs=3, help="normalisation mean of a model file without metadata")
    p.add_argument("--std", type=float, nargs=3, help="normalisation std of a model file without metadata")
    g = p.add_argument_group("baseline (e.g. the production model), scored on the same images")
    base = g.add_mutually_exclusive_group(required=baseline_required)
    base.add_argument("--baseline_path", help="checkpoint, FairFace ResNet-34, TorchScript or ONNX file")
    base.add_argument("--baseline_predictions", help="CSV of the baseline's predictions: path, pred_label, "
                      "optional prob_<class> columns")
    g.add_argument("--baseline_labels", help="the baseline's class order/taxonomy (TorchScript, ONNX, CSV)")
    g.add_argument("--baseline_image_size", type=int)
    g.add_argument("--baseline_mean", type=float, nargs=3)
    g.add_argument("--baseline_std", type=float, nargs=3)
    p.add_argument("--tta", action="store_true", help="test-time augmentation of the evaluated model: average "
                   "each face's calibrated probabilities with its horizontal mirror's")
    g.add_argument("--baseline_tta", action="store_true", help="the same for the baseline model file")
    p.add_argument("--batch_size", type=int, default=64)
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--n_boot", type=int, default=1000, help="bootstrap resamples for confidence intervals")
    p.add_argument("--abstain", action="store_true", help="also report coverage and accuracy on the images the "
                   "model answers with its stored abstention threshold (calibrated checkpoints and their exports)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="auto")
    return p


def print_evaluation(name: str, ev: dict, classes) -> None:
    print(f"{name}: {ev['n']} images scored, {ev['n_errors']} unreadable")
    print(f"  accuracy           {fmt_ci(ev['accuracy'], 2)}  (95% bootstrap CI)")
    print(f"  balanced accuracy  {fmt_ci(ev['balanced_accuracy'], 2)}")
    print(f"  macro-F1 {fmt_num(ev['macro_f1'], 4)}   ECE {fmt_num(ev.get('ece'), 4)}")
    for row in ev["per_class"]:
        print(f"   - {row['class']:<18} {fmt_ci(row['accuracy'], 2)}  (n={row['support']})")
    for dim, gap in (ev.get("subgroup_gaps") or {}).items():
        if gap:
            print(f"  {dim}: largest gap {100 * gap['largest_gap']:.2f} points, worst group {gap['worst_group']}")
    cal = ev.get("calibration")
    if cal:
        print(f"  temperature {cal['temperature']:.3f}: ECE {fmt_num(cal['ece_before'], 4)} uncalibrated -> "
              f"{fmt_num(cal['ece_after'], 4)} calibrated")
    ab = ev.get("abstention")
    if ab:
        print(f"  abstention (confidence >= {ab['threshold']:.4f}): coverage {fmt_ci(ab['coverage_ci'], 2)}, "
              f"accuracy on answered {fmt_ci(ab['selective_accuracy'], 2)} ({ab['n_answered']} of {ab['n']} images; "
              f"{fmt_pct(ab['accuracy_all'], 2)} on all)")


def print_comparison(comparison: dict, name_a: str, name_b: str) -> None:
    print(f"\n{name_a} (A) vs {name_b} (B) on {comparison['n_common']} common images "
          f"(McNemar's exact test, paired bootstrap 95% CI of A - B):")
    print(f"  {'':<28}{'A':>8}{'B':>8}{'A-B':>10}  {'95% CI':<18}{'p':>8}")
    rows = comparison["overall"] + comparison["per_class"]
    for dim_rows in comparison["subgroups"].values():
        rows = rows + dim_rows
    for r in rows:
        p = fmt_num(r["p_mcnemar"], 4)
        mark = "  *" if r["significant"] else ""
        ci = "n/a" if r["ci_low"] is None else f"[{100 * r['ci_low']:+.2f}, {100 * r['ci_high']:+.2f}]"
        print(f"  {str(r['name'])[:27]:<28}{fmt_pct(r['a'], 2):>8}{fmt_pct(r['b'], 2):>8}{fmt_pp(r['diff'], 2):>10}  "
              f"{ci:<18}{p:>8}{mark}")
    print(f"  * significant at alpha {comparison['alpha']}")


def _device(spec: str) -> str:
    import torch
    return ("cuda" if torch.cuda.is_available() else "cpu") if spec == "auto" else spec


def _add_calibration(evaluation: dict, table, model, *, mapped: bool, abstain: bool, n_boot: int, seed: int) -> None:
    """A model with a stored temperature: its ``ece`` is the calibrated one; add ``calibration`` with the ECE
    the raw softmax would have had. ``abstain``: add ``abstention``, coverage and accuracy on answered images."""
    from race_classifier.evaluation.calibration import selective_accuracy, uncalibrated
    from race_classifier.evaluation.metrics import clean_predictions, expected_calibration_error

    valid, _ = clean_predictions(table, evaluation["classes"])
    correct = (valid["y_true"] == valid["y_pred"]).to_numpy(float)
    confidence = valid["confidence"].to_numpy(float)
    # Mapped probabilities are sums, and TTA's are means of two softmaxes: neither is softmax(z / T) any more,
    # so the raw softmax cannot be recovered from them.
    if model.temperature != 1.0 and not mapped and not model.tta:
        k = len(evaluation["classes"])
        probs = valid[[f"prob_{i}" for i in range(k)]].to_numpy(float)
        raw = uncalibrated(probs, model.temperature)
        evaluation["calibration"] = {"temperature": model.temperature,
                                     "ece_before": expected_calibration_error(raw.max(1), correct)[0],
                                     "ece_after": evaluation["ece"]}
    if abstain:
        threshold = model.abstention_threshold
        if threshold is None:
            raise ValueError(f"--abstain: {model.name} has no stored abstention threshold (calibrate a "
                             "checkpoint with `race-classifier calibrate`, then export it again)")
        evaluation["abstention"] = selective_accuracy(confidence, correct, threshold, n_boot=n_boot, seed=seed)


def run(args: argparse.Namespace) -> int:
    from race_classifier.evaluation.compare import compare_predictions
    from race_classifier.evaluation.metrics import evaluate_predictions

    if args.baseline_tta and not args.baseline_path:
        raise ValueError("--baseline_tta needs --baseline_path (a model file to run)")
    device = _device(args.device)
    model = load_predictor(args.model_path, labels=args.labels, image_size=args.image_size,
                           mean=args.mean, std=args.std, device=device, tta=args.tta)
    taxonomy = get_taxonomy(args.taxonomy) if args.taxonomy else model.taxonomy
    mapping = None
    if args.source_taxonomy or args.label_map:
        source = get_taxonomy(args.source_taxonomy) if args.source_taxonomy else taxonomy
        mapping = get_mapping(source, taxonomy, load_label_map(args.label_map) if args.label_map else None)
    samples = load_eval_samples(taxonomy, root_dir=args.root_dir, val_txt=args.val_txt, mapping=mapping)
    classes = list(taxonomy.classes)

    table = predict_samples(model, samples, taxonomy, args.batch_size, args.workers, desc=model.name)
    write_predictions_csv(table, classes, args.output_csv)
    evaluation = evaluate_predictions(table, classes, n_boot=args.n_boot, seed=args.seed)
    _add_calibration(evaluation, table, model, mapped=model.taxonomy.classes != taxonomy.classes,
                     abstain=args.abstain, n_boot=args.n_boot, seed=args.seed)
    print_evaluation(model.name + (" + flip TTA" if model.tta else ""), evaluation, classes)
    results = {"model": model.info, "tta": model.tta, "taxonomy": taxonomy.to_dict(), "evaluation": evaluation}

    comparison = None
    if args.baseline_path or args.baseline_predictions:
        out = Path(args.output_csv)
        if args.baseline_path:
            baseline = load_predictor(args.baseline_path, labels=args.baseline_labels,
                                      image_size=args.baseline_image_size, mean=args.baseline_mean,
                                      std=args.baseline_std, device=device, tta=args.baseline_tta)
            base_table = predict_samples(baseline, samples, taxonomy, args.batch_size, args.workers, desc=baseline.name)
            base_info, base_name = baseline.info, baseline.name
        else:
            labels = get_taxonomy(args.baseline_labels) if args.baseline_labels else None
            base_table = predictions_from_csv(args.baseline_predictions, samples, taxonomy, labels)
            base_name = Path(args.baseline_predictions).name
            base_info = {"path": args.baseline_predictions, "kind": "predictions CSV"}
        base_info = {**base_info, "name": base_name}
        write_predictions_csv(base_table, classes, out.with_name(out.stem + ".baseline.csv"))
        base_eval = evaluate_predictions(base_table, classes, n_boot=args.n_boot, seed=args.seed)
        print()
        print_evaluation(base_name, base_eval, classes)
        comparison = compare_predictions(table, base_table, classes, n_boot=args.n_boot, seed=args.seed)
        comparison["baseline_info"] = base_info
        comparison["baseline_evaluation"] = base_eval
        print_comparison(comparison, model.name, base_name)
        results["comparison"] = comparison

    metrics_path = Path(args.output_csv).with_suffix(".metrics.json")
    atomic_write_text(metrics_path, json.dumps(results, indent=2, default=str))
    written = [args.output_csv, str(metrics_path)]
    if args.output_html:
        from race_classifier.evaluation.report import render_report
        render_report(evaluation, table, classes, {**model.info, "name": model.name}, args.output_html,
                      comparison=comparison)
        written.append(args.output_html)
    print("\nwrote " + ", ".join(written))
    return 0


def main(argv: list[str] | None = None, baseline_required: bool = False, prog: str = "evaluation.py") -> int:
    from race_classifier.cli import run_command
    parser = add_arguments(argparse.ArgumentParser(prog=prog, description=__doc__,
                                                   formatter_class=argparse.RawDescriptionHelpFormatter),
                           baseline_required)
    return run_command(run, parser.parse_args(argv))
