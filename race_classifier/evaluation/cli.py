"""``race-classifier evaluate`` / ``compare`` and the root ``evaluation.py``.

    evaluation.py --root_dir R --model_path M --output_csv O.csv --output_html O.html [--baseline_path B] [--tta]

Writes the per-image CSV, a JSON of every figure (``<output_csv>.metrics.json``), the HTML report and,
with a baseline, the baseline's per-image CSV and the side-by-side comparison with significance tests.
A model with gender/age heads has those heads scored too, where the data labels them (manifest columns), and
compared with the baseline's same heads.
"""
from __future__ import annotations

import argparse
import json
import logging
from pathlib import Path

from race_classifier.device import resolve_device
from race_classifier.evaluation.calibration import selective_accuracy, uncalibrated
from race_classifier.evaluation.compare import compare_predictions
from race_classifier.evaluation.formatting import (
    fmt_ci,
    fmt_ece_floor,
    fmt_num,
    fmt_pct,
    fmt_pp,
)
from race_classifier.evaluation.metrics import (
    clean_predictions,
    evaluate_predictions,
    expected_calibration_error,
    head_table,
    race_labelled,
)
from race_classifier.evaluation.options import add_arguments
from race_classifier.evaluation.report import render_report
from race_classifier.evaluation.runner import (
    load_eval_samples,
    predict_samples,
    predictions_from_csv,
    scored_heads,
    write_predictions_csv,
)
from race_classifier.heads import canonical_gender
from race_classifier.labels import get_mapping, get_taxonomy, load_label_map
from race_classifier.models.loaders import load_predictor
from race_classifier.utils import add_hidden_aliases, atomic_write_text, run_command

log = logging.getLogger("race_classifier.evaluate")


HEAD_TITLES = {"gender": "gender", "age": "age group"}


def fmt_ece(ev: dict) -> str:
    """'ECE 0.0440 (perfectly calibrated: 0.0181 expected, 95% <= 0.0252; p < 0.001)': how much of the ECE is
    sampling noise is the figure in brackets (metrics.ece_if_calibrated)."""
    floor = ev.get("ece_if_calibrated")
    return f"ECE {fmt_num(ev.get('ece'), 4)}" + (f" (perfectly calibrated: {fmt_ece_floor(floor)})" if floor else "")


def print_evaluation(name: str, ev: dict, classes) -> None:
    print(f"{name}: {ev['n']} images scored, {ev['n_errors']} unreadable")
    print(f"  accuracy           {fmt_ci(ev['accuracy'], 2)}  (95% Wilson score CI, as per class)")
    print(f"  balanced accuracy  {fmt_ci(ev['balanced_accuracy'], 2)}  (95% bootstrap CI)")
    print(f"  macro-F1 {fmt_num(ev['macro_f1'], 4)}   {fmt_ece(ev)}")
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
    for head, hev in (ev.get("heads") or {}).items():
        print(f"  {HEAD_TITLES.get(head, head)} head: {hev['n']} labelled images ({hev['n_unlabelled']} not labelled)")
        print(f"    accuracy           {fmt_ci(hev['accuracy'], 2)}")
        print(f"    balanced accuracy  {fmt_ci(hev['balanced_accuracy'], 2)}   {fmt_ece(hev)}")
        for row in hev["per_class"]:
            print(f"     - {row['class']:<16} {fmt_ci(row['accuracy'], 2)}  (n={row['support']})")
        cal = hev.get("calibration")
        if cal:
            print(f"    temperature {cal['temperature']:.3f}: ECE {fmt_num(cal['ece_before'], 4)} uncalibrated -> "
                  f"{fmt_num(cal['ece_after'], 4)} calibrated")


def print_comparison(comparison: dict, name_a: str, name_b: str) -> None:
    print(f"\n{name_a} (A) vs {name_b} (B) on {comparison['n_common']} common images "
          f"(McNemar's exact test, paired bootstrap 95% CI of A - B):")
    print(f"  {'':<28}{'A':>8}{'B':>8}{'A-B':>10}  {'95% CI':<18}{'p':>8}")
    rows = comparison["overall"] + comparison["per_class"]
    for dim_rows in comparison["subgroups"].values():
        rows = rows + dim_rows
    for head, head_cmp in (comparison.get("heads") or {}).items():  # named "<head>: <row>"
        rows = rows + [{**r, "name": f"{head}: {r['name']}"} for r in head_cmp["overall"] + head_cmp["per_class"]]
    for r in rows:
        p = fmt_num(r["p_mcnemar"], 4)
        mark = "  *" if r["significant"] else ""
        ci = "n/a" if r["ci_low"] is None else f"[{100 * r['ci_low']:+.2f}, {100 * r['ci_high']:+.2f}]"
        print(f"  {str(r['name'])[:27]:<28}{fmt_pct(r['a'], 2):>8}{fmt_pct(r['b'], 2):>8}{fmt_pp(r['diff'], 2):>10}  "
              f"{ci:<18}{p:>8}{mark}")
    print(f"  * significant at alpha {comparison['alpha']}")


def _add_calibration(evaluation: dict, table, model, *, mapped: bool, abstain: bool, n_boot: int, seed: int) -> None:
    """A model with a stored temperature: its ``ece`` is the calibrated one; add ``calibration`` with the ECE
    the raw softmax would have had (each extra head likewise, with its own temperature). ``abstain``: add
    ``abstention``, coverage and accuracy on answered images (race only)."""
    valid, _ = clean_predictions(race_labelled(table), evaluation["classes"])
    correct = (valid["y_true"] == valid["y_pred"]).to_numpy(float)
    confidence = valid["confidence"].to_numpy(float)
    # Mapped probabilities are sums, and TTA's are means of two softmaxes: neither is softmax(z / T) any more,
    # so the raw softmax cannot be recovered from them.
    if not mapped and not model.tta:
        _ece_before_after(evaluation, valid, model.temperature)
        for name, head_eval in evaluation.get("heads", {}).items():
            head_valid, _ = clean_predictions(head_table(table, name), head_eval["classes"])
            _ece_before_after(head_eval, head_valid, model.head_temperature(name))
    if abstain:
        threshold = model.abstention_threshold
        if threshold is None:
            raise ValueError(f"--abstain: {model.name} has no stored abstention threshold (calibrate a "
                             "checkpoint with `race-classifier calibrate`, then export it again)")
        evaluation["abstention"] = selective_accuracy(confidence, correct, threshold, n_boot=n_boot, seed=seed)


def _ece_before_after(evaluation: dict, valid, temperature: float) -> None:
    if temperature == 1.0 or not len(valid):
        return
    k = len(evaluation["classes"])
    probs = valid[[f"prob_{i}" for i in range(k)]].to_numpy(float)
    correct = (valid["y_true"] == valid["y_pred"]).to_numpy(float)
    evaluation["calibration"] = {"temperature": temperature,
                                 "ece_before": expected_calibration_error(uncalibrated(probs, temperature).max(1),
                                                                          correct)[0],
                                 "ece_after": evaluation["ece"]}


def _warn_about_head_labels(samples, heads, source: str) -> None:
    """Gender values the model has no class for cannot be scored: say so rather than drop them silently."""
    gender = heads.get("gender")
    if gender is None:
        return
    other = sorted({g for g in map(canonical_gender, (s.gender for s in samples)) if g and g not in gender.classes})
    if other:
        n = sum(canonical_gender(s.gender) in other for s in samples)
        log.warning("%s: %d image(s) labelled with gender %s, which the model has no class for (it has %s): "
                    "left out of the gender head's figures", source, n, ", ".join(other), ", ".join(gender.classes))


def run(args: argparse.Namespace) -> int:
    if args.baseline_tta and not args.baseline_path:
        raise ValueError("--baseline_tta needs --baseline_path (a model file to run)")
    device = resolve_device(args.device)
    model = load_predictor(args.model_path, labels=args.labels, image_size=args.image_size,
                           mean=args.mean, std=args.std, device=device, tta=args.tta, amp=args.amp)
    taxonomy = get_taxonomy(args.taxonomy) if args.taxonomy else model.taxonomy
    mapping = None
    if args.source_taxonomy or args.label_map:
        source = get_taxonomy(args.source_taxonomy) if args.source_taxonomy else taxonomy
        mapping = get_mapping(source, taxonomy, load_label_map(args.label_map) if args.label_map else None)
    classes = list(taxonomy.classes)
    # The model's gender/age heads, scored in its own classes; a baseline's are summed into them.
    heads = scored_heads(model.heads, classes)
    head_classes = {h.name: list(h.classes) for h in heads.extra}
    source = args.val_txt or args.root_dir
    samples = load_eval_samples(taxonomy, root_dir=args.root_dir, val_txt=args.val_txt, mapping=mapping,
                                keep_unlabelled=bool(heads.extra))
    _warn_about_head_labels(samples, heads, source)

    table = predict_samples(model, samples, taxonomy, args.batch_size, args.workers, desc=model.name,
                            heads=heads, source=source)
    write_predictions_csv(table, classes, args.output_csv, heads)
    evaluation = evaluate_predictions(table, classes, n_boot=args.n_boot, seed=args.seed, heads=head_classes)
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
                                      std=args.baseline_std, device=device, tta=args.baseline_tta, amp=args.amp)
            base_table = predict_samples(baseline, samples, taxonomy, args.batch_size, args.workers,
                                         desc=baseline.name, heads=heads, source=source)
            base_info, base_name = baseline.info, baseline.name
        else:
            labels = get_taxonomy(args.baseline_labels) if args.baseline_labels else None
            base_table = predictions_from_csv(args.baseline_predictions, samples, taxonomy, labels)
            base_name = Path(args.baseline_predictions).name
            base_info = {"path": args.baseline_predictions, "kind": "predictions CSV"}
        base_info = {**base_info, "name": base_name}
        write_predictions_csv(base_table, classes, out.with_name(out.stem + ".baseline.csv"), heads)
        base_eval = evaluate_predictions(base_table, classes, n_boot=args.n_boot, seed=args.seed, heads=head_classes)
        print()
        print_evaluation(base_name, base_eval, classes)
        comparison = compare_predictions(table, base_table, classes, n_boot=args.n_boot, seed=args.seed,
                                         heads=head_classes)
        comparison["baseline_info"] = base_info
        comparison["baseline_evaluation"] = base_eval
        print_comparison(comparison, model.name, base_name)
        results["comparison"] = comparison

    metrics_path = Path(args.output_csv).with_suffix(".metrics.json")
    atomic_write_text(metrics_path, json.dumps(results, indent=2, default=str))
    written = [args.output_csv, str(metrics_path)]
    if args.output_html:
        render_report(evaluation, race_labelled(table), classes, {**model.info, "name": model.name},
                      args.output_html, comparison=comparison, data_source=args.val_txt or args.root_dir)
        written.append(args.output_html)
    print("\nwrote " + ", ".join(written))
    return 0


def main(argv: list[str] | None = None, baseline_required: bool = False, prog: str = "evaluation.py") -> int:
    parser = add_arguments(argparse.ArgumentParser(prog=prog, description=__doc__,
                                                   formatter_class=argparse.RawDescriptionHelpFormatter),
                           baseline_required)
    add_hidden_aliases(parser)
    return run_command(run, parser.parse_args(argv))
