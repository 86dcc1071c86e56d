#!/usr/bin/env python
"""Accuracy benchmark: train (or reuse) one model per balance mode of a recipe, evaluate each on the
recipe's validation manifest, print one table (and optionally write it as JSON).

    python bench/accuracy.py --config configs/fairface_seed5.yaml [--variants none,sampler,group] [--tta]
        [--json out.json] [--model_path [NAME=]existing.pt ...] [--last_layer none,sampler,group,recall]
        [--eval_taxonomy seed5] [--heads race,gender,age]
        [--max_train_images N --max_val_images M --num_epochs E --image_size S]   # a quick run

Variants are ``--balance`` modes (none, sampler, loss, group): the debiasing comparison of class- and
race x gender group-balanced sampling. Each trains with the config into ``<out_dir>/<variant>``; a run
that finished there (best.pt calibrated) is reused, an interrupted one resumed (``--retrain`` starts
afresh). ``--model_path`` (repeatable, ``NAME=PATH`` names the row) evaluates given checkpoints instead,
e.g. a race-only and a multi-task model trained on the same split. ``--heads`` trains the variants with
gender/age heads too.

``--last_layer``: for each model, also refit its race layer on frozen features with these balance modes
(``race-classifier rebalance``; one feature pass, minutes on a CPU) and evaluate each refit: the debiasing
comparison without a training run per mode. ``none`` is the unweighted refit, the control. ``recall``
keeps the layer and adds per-class logit offsets fitted on the validation set so that every class reaches
``--min_recall``; its rows are therefore in-sample, and a line under the table gives the 2-fold cross-fitted
accuracy and worst class (faces the offsets were not fitted on).

``--linear_probe``: for each model, also the frozen linear probe of its backbone as pretrained (before any
fine-tuning): the recipe's ``--pretrained`` weights, a new race layer fitted on their frozen features of the
training images by the same logistic regression (``--last_layer none``). What fine-tuning adds is the gap.

``--ensemble_with PATH``: for each model, also a row for the mean of its calibrated probabilities and those of
the model at PATH, each model preprocessing the image its own way (crop, size, normalisation), so models on
different backbones and inputs can be combined; the row's ECE is the averaged probabilities' own.
(``race-classifier ensemble`` makes one model file, for members that share their preprocessing.)

``--eval_taxonomy``: evaluate in another label set than the model's, labels and probabilities mapped by
the taxonomy tables (a fairface7 model scored as seed5: East/Southeast Asian -> Asian, Middle Eastern ->
White).

Columns: accuracy with its 95% bootstrap CI, balanced accuracy, worst class, worst race x gender group
(groups of >= 10 faces), ECE of the raw softmax -> after the checkpoint's temperature (as fitted at the
end of training), the ECE a perfectly calibrated model with the calibrated confidences would show from
sampling noise alone (mean, 95th percentile, p-value of the ECE after; ``ece_if_calibrated``), and accuracy
on the 95% most confident faces; for models with gender/age heads, each head's accuracy. ``--tta`` adds a
row per variant with horizontal-flip test-time augmentation (its ECE is the one measured here: the raw
softmax of averaged probabilities does not exist, so "before" is n/a).

The validation set also picks the best epoch and fits the temperature, so these figures are slightly
optimistic for new data; the comparison between variants is like for like.

Quick-run options (``--max_train_images`` etc.) change the run folder's name, so a smoke run never reuses
or overwrites the full recipe's checkpoints. Without manifests the exact ``prepare`` command is printed
and the exit status is 2 (preparing needs the FairFace folder, which the config does not name).
"""
from __future__ import annotations

import argparse
import json
import random
import sys
import time
from pathlib import Path

import numpy as np

from race_classifier.data.manifest import format_sample, parse_line
from race_classifier.evaluation.calibration import abstention_summary, choose_threshold
from race_classifier.evaluation.formatting import fmt_ci, fmt_ece_floor, fmt_num, fmt_pct
from race_classifier.evaluation.metrics import clean_predictions, evaluate_predictions, race_labelled
from race_classifier.evaluation.runner import load_eval_samples, predict_samples, predictions_table, scored_heads
from race_classifier.labels import get_mapping, get_taxonomy, load_label_map
from race_classifier.models.checkpoint import load_checkpoint
from race_classifier.models.factory import create_model
from race_classifier.models.loaders import load_predictor
from race_classifier.training import config
from race_classifier.post_training.model_card import describe_cross_fit
from race_classifier.training.train import main as train_main
from race_classifier.utils import atomic_torch_save, atomic_write_text

COVERAGE = 0.95
COLUMNS = ("variant", "tta", "accuracy", "balanced_accuracy", "worst_class", "worst_group", "ece_before",
           "ece_after", "ece_after_if_calibrated", "accuracy_at_95_coverage")
DEFAULT_VARIANTS = ("none", "sampler", "group")
QUICK_OPTIONS = ("max_train_images", "max_val_images", "num_epochs", "image_size")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="bench/accuracy.py", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", required=True, help="a training recipe (configs/*.yaml) naming train_txt/val_txt")
    p.add_argument("--variants", help="comma-separated --balance modes to train and compare "
                   f"({', '.join(config.BALANCE_MODES)}; default {','.join(DEFAULT_VARIANTS)})")
    p.add_argument("--model_path", action="append", help="evaluate this checkpoint instead of training "
                   "(repeatable; NAME=PATH names its row, else --variants' single name or the checkpoint's --balance)")
    p.add_argument("--last_layer", help="comma-separated balance modes (none, sampler, group, recall) of "
                   "last-layer refits of each model, evaluated next to it")
    p.add_argument("--min_recall", type=float, default=0.6, help="--last_layer recall: the target per class")
    p.add_argument("--linear_probe", action="store_true", help="also the frozen linear probe of each model's "
                   "pretrained backbone (a logistic regression on its features, before fine-tuning)")
    p.add_argument("--ensemble_with", help="also each model averaged with this model file (each with its own "
                   "preprocessing)")
    p.add_argument("--eval_taxonomy", help="evaluate in this taxonomy (labels and predictions mapped)")
    p.add_argument("--heads", help="train the variants with these heads (e.g. race,gender,age)")
    p.add_argument("--tta", action="store_true", help="also evaluate with horizontal-flip test-time augmentation")
    p.add_argument("--json", help="write the table (and each variant's full evaluation) here")
    p.add_argument("--out_dir", help="run folders go to <out_dir>/<variant> (default runs/accuracy/<config name>"
                   "[-quick options])")
    p.add_argument("--retrain", action="store_true", help="train afresh even where a finished run exists")
    g = p.add_argument_group("quick run (smoke test of the benchmark, not the recipe's figures)")
    g.add_argument("--max_train_images", type=int, help="train on a random subset of this many images")
    g.add_argument("--max_val_images", type=int, help="validate and evaluate on a random subset")
    g.add_argument("--num_epochs", type=int)
    g.add_argument("--image_size", type=int)
    p.add_argument("--n_boot", type=int, default=1000, help="bootstrap resamples for the CIs")
    p.add_argument("--workers", type=int, help="DataLoader workers (default: the config's)")
    p.add_argument("--seed", type=int, default=0, help="seed of the subsets and the bootstrap")
    args = p.parse_args(argv)
    args.last_layer = [v.strip() for v in (args.last_layer or "").split(",") if v.strip()]
    from race_classifier.post_training.options import BALANCES
    if set(args.last_layer) - set(BALANCES):
        p.error(f"--last_layer: choose from {', '.join(BALANCES)}")
    if args.model_path:
        if args.variants and "," in args.variants:
            p.error("--model_path evaluates given checkpoints: give at most one --variants name (its label)")
        return args
    args.variants = [v.strip() for v in (args.variants or ",".join(DEFAULT_VARIANTS)).split(",") if v.strip()]
    bad = sorted(set(args.variants) - set(config.BALANCE_MODES))
    if bad or not args.variants:
        p.error(f"--variants: unknown balance mode(s) {', '.join(bad) or '(none given)'}; "
                f"choose from {', '.join(config.BALANCE_MODES)}")
    return args


# --- data ----------------------------------------------------------------------------------------------------

def prepare_command(train_txt: str, taxonomy: str) -> str:
    return (f"race-classifier prepare fairface ../shared/data/fairface --out {Path(train_txt).parent} "
            f"--taxonomy {taxonomy}")


def subset_manifest(src: str, n: int, out: Path, seed: int) -> Path:
    """A random ``n``-line subset of a manifest, paths made absolute so that it works from any folder."""
    base = Path(src).resolve().parent
    rows = [parsed for parsed in map(parse_line, Path(src).read_text(encoding="utf-8").splitlines()) if parsed]
    keep = sorted(random.Random(seed).sample(range(len(rows)), min(n, len(rows))))
    lines = []
    for i in keep:
        path, label, extras = rows[i]
        lines.append(format_sample(str(base / path), label, extras.get("gender", ""), extras.get("age", "")))
    out.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(out, "# path\tlabel\tgender\tage\n" + "".join(lines))
    return out


def quick_suffix(args) -> str:
    short = {"max_train_images": "n", "max_val_images": "v", "num_epochs": "e", "image_size": "s"}
    heads = f"-{args.heads.replace(',', '+')}" if args.heads and args.heads != "race" else ""
    return heads + "".join(f"-{short[k]}{getattr(args, k)}" for k in QUICK_OPTIONS if getattr(args, k) is not None)


def evaluation_manifest(args, recipe: argparse.Namespace, out_dir: Path) -> str:
    """The config's val_txt, or its random subset for a quick run (validation and evaluation alike)."""
    if not args.max_val_images:
        return recipe.val_txt
    return str(subset_manifest(recipe.val_txt, args.max_val_images, out_dir / "val_subset.txt", args.seed))


def training_options(args, recipe: argparse.Namespace, out_dir: Path, val_txt: str) -> list[str]:
    """Training flags that replace the config's for a quick run (subsets, epochs, size)."""
    # The taxonomy as resolved for the full manifests: a subset has no classes.txt beside it.
    opts = ["--taxonomy", recipe.taxonomy, "--val_txt", val_txt]
    if args.max_train_images:
        opts += ["--train_txt", str(subset_manifest(recipe.train_txt, args.max_train_images,
                                                    out_dir / "train_subset.txt", args.seed))]
    for name in ("num_epochs", "image_size", "workers", "heads"):
        if getattr(args, name) is not None:
            opts += [f"--{name}", str(getattr(args, name))]
    return opts


# --- training --------------------------------------------------------------------------------------------------

def train_variant(config_path: str, variant: str, run_dir: Path, options: list[str], retrain: bool) -> Path:
    """best.pt of the recipe trained with ``--balance variant`` in ``run_dir``: reused when finished
    (calibrated), resumed when interrupted, otherwise trained."""
    best, last = run_dir / "best.pt", run_dir / "last.pt"
    finished = load_checkpoint(best) if (best.is_file() and not retrain) else {}
    if "calibration" in finished:  # written after the last epoch: the run completed
        balance = (finished.get("train_args") or {}).get("balance")
        if balance != variant:
            raise ValueError(f"{best} was trained with --balance {balance}, not {variant}: use another --out_dir")
        print(f"[{variant}] reusing the finished run {best}", flush=True)
        return best
    mode = ["--resume"] if (last.is_file() and not retrain) else ["--overwrite"]
    argv = ["-c", config_path, "--balance", variant, "--checkpoint_dir", str(run_dir),
            "--log_file", str(run_dir / "log.csv"), *options, *mode]
    print(f"[{variant}] train.py {' '.join(argv)}", flush=True)
    started = time.time()
    if train_main(argv) != 0:
        raise RuntimeError(f"training variant {variant} failed (see the messages above)")
    print(f"[{variant}] trained in {time.time() - started:.0f} s", flush=True)
    return best


# --- evaluation ------------------------------------------------------------------------------------------------

def _worst_group(evaluation: dict) -> dict | None:
    """The race x gender cell of lowest accuracy among those with >= 10 faces (the gap's worst group)."""
    gap = (evaluation.get("subgroup_gaps") or {}).get("race_x_gender")
    if not gap:
        return None
    group = next(g for g in evaluation["subgroups"]["race_x_gender"] if g["group"] == gap["worst_group"])
    return {"name": group["group"], "accuracy": group["accuracy"]["value"], "n": group["n"]}


def _accuracy_at_coverage(table, classes, coverage: float = COVERAGE) -> float | None:
    valid, _ = clean_predictions(race_labelled(table), classes)
    confidence = valid["confidence"].to_numpy(float)
    correct = (valid["y_true"] == valid["y_pred"]).to_numpy(float)
    return abstention_summary(confidence, correct, choose_threshold(confidence, coverage))["accuracy_at_coverage"]


def benchmark_row(variant: str, tta: bool, evaluation: dict, table, calibration: dict | None) -> dict:
    worst = evaluation["worst_class"]
    return {
        "variant": variant,
        "tta": tta,
        "accuracy": evaluation["accuracy"],
        "balanced_accuracy": evaluation["balanced_accuracy"],
        "worst_class": {"name": worst["class"], "accuracy": worst["accuracy"]} if worst else None,
        "worst_group": _worst_group(evaluation),
        # The temperature's effect as fitted after training (on this validation set); with TTA only the
        # ECE measured here exists.
        "ece_before": None if tta else (calibration or {}).get("ece_before"),
        "ece_after": evaluation["ece"] if (tta or not calibration) else calibration.get("ece_after"),
        # ece_after's noise floor, from the same place (None for runs calibrated before it was recorded).
        "ece_after_if_calibrated": (evaluation if (tta or not calibration) else calibration).get("ece_if_calibrated"),
        "accuracy_at_95_coverage": _accuracy_at_coverage(table, evaluation["classes"]),
    }


def mean_table(tables: list, samples, num_classes: int, source: str):
    """The predictions table of the mean of several models' probabilities (an image any of them could not read
    has no prediction, with the first reason)."""
    columns = [f"prob_{k}" for k in range(num_classes)]
    probs = np.mean([t[columns].to_numpy(float) for t in tables], axis=0)  # NaN where any model failed
    errors = {}
    for table in tables:
        for i, error in enumerate(table["error"]):
            if error:
                errors.setdefault(i, error)
    return predictions_table(samples, probs, errors, num_classes, source=source)


def evaluate_variant(variant: str, checkpoints: list[Path], recipe, val_txt: str, args) -> tuple[list[dict], dict]:
    """Rows (plain, and with TTA if asked) and the full evaluations, keyed 'plain' / 'tta'. Several
    ``checkpoints``: their mean calibrated probabilities, each model preprocessing the image its own way."""
    predictors = [load_predictor(c) for c in checkpoints]
    predictor = predictors[0]
    if len(predictors) > 1 and any(p.heads.extra for p in predictors):
        raise ValueError(f"{variant}: an averaged row takes race-only models")
    model_taxonomy = predictor.taxonomy
    taxonomy = get_taxonomy(args.eval_taxonomy) if args.eval_taxonomy else model_taxonomy
    # The manifests' labels are in the recipe's classes (or its --source_taxonomy), whatever the model answers
    # in: a merged model (fairface7 -> seed5) is scored on the recipe's fairface7 labels mapped into seed5.
    source = get_taxonomy(recipe.source_taxonomy or recipe.taxonomy)
    mapping = None
    if recipe.label_map or source.classes != taxonomy.classes:
        mapping = get_mapping(source, taxonomy, load_label_map(recipe.label_map) if recipe.label_map else None)
    heads = scored_heads(predictor.heads, taxonomy.classes)
    head_classes = {h.name: list(h.classes) for h in heads.extra}
    samples = load_eval_samples(taxonomy, val_txt=val_txt, mapping=mapping, keep_unlabelled=bool(heads.extra))
    classes = list(taxonomy.classes)
    workers = recipe.workers if args.workers is None else args.workers
    rows, evaluations = [], {}
    for tta in ([False, True] if args.tta else [False]):
        tables = []
        for model in predictors:
            model.set_tta(tta)
            tables.append(predict_samples(model, samples, taxonomy, recipe.batch_size, workers,
                                          desc=f"{variant}{' +TTA' if tta else ''}", heads=heads, source=val_txt))
        table = tables[0] if len(tables) == 1 else mean_table(tables, samples, len(classes), val_txt)
        evaluation = evaluate_predictions(table, classes, n_boot=args.n_boot, seed=args.seed, heads=head_classes)
        row = benchmark_row(variant, tta, evaluation, table, predictor.calibration if len(predictors) == 1 else None)
        if head_classes:
            row["heads"] = {name: h["accuracy"]["value"] for name, h in evaluation["heads"].items()}
        rows.append(row)
        evaluations["tta" if tta else "plain"] = evaluation
    return rows, evaluations


def probe_start(checkpoint: Path, recipe) -> Path:
    """A checkpoint like ``checkpoint`` (classes, preprocessing, heads) holding the recipe's pretrained weights
    as they are, before fine-tuning, for the linear probe (its race layer is refitted on their features)."""
    path = checkpoint.parent / "linear_probe" / "pretrained.pt"
    if not path.is_file():
        ckpt = load_checkpoint(checkpoint)
        if ckpt.get("heads") or ckpt.get("merged_classes") or ckpt.get("ensemble"):
            raise ValueError(f"--linear_probe: {checkpoint} is not a race-only trained model")
        model = create_model(ckpt["arch"], ckpt["num_classes"], pretrained=recipe.pretrained)
        probe = {k: v for k, v in ckpt.items() if k not in ("calibration", "resume", "history", "metrics")}
        probe.update(state_dict={k: v.detach().cpu() for k, v in model.state_dict().items()}, epoch=0, metrics={},
                     history=[], train_args={**ckpt.get("train_args", {}), "num_epochs": 0,
                                             "initialised_from": f"{recipe.pretrained} (frozen: linear probe)"})
        path.parent.mkdir(parents=True, exist_ok=True)
        atomic_torch_save(probe, path)
    return path


def last_layer_refits(variant: str, checkpoint: Path, recipe, balances: list[str], workers: int,
                      min_recall: float, name: str | None = None) -> list[tuple[str, Path]]:
    """(row name, checkpoint) of each last-layer refit of ``checkpoint``, made beside it (reused if there)."""
    from race_classifier.data.manifest import read_manifest
    from race_classifier.models.checkpoint import load_model
    from race_classifier.post_training.calibrate import finalize_run
    from race_classifier.post_training.rebalance import extract_features, raise_low_recalls, rebalance
    from race_classifier.utils import atomic_torch_save
    loaded = load_model(checkpoint)
    train = read_manifest(recipe.train_txt, loaded.taxonomy)
    val = read_manifest(recipe.val_txt, loaded.taxonomy)
    features, out = None, []
    for balance in balances:
        path = checkpoint.parent / f"last_layer_{balance}" / "best.pt"
        if not (path.is_file() and "calibration" in load_checkpoint(path)):
            path.parent.mkdir(parents=True, exist_ok=True)
            if balance == "recall":  # offsets on the trained layer, fitted on the validation set
                ckpt, _ = raise_low_recalls(checkpoint, val, min_recall, recipe.batch_size, workers)
            else:
                if features is None:
                    features = extract_features(loaded.model, train, loaded.preprocessing, recipe.batch_size, workers)
                ckpt = rebalance(checkpoint, train, balance, features=features)
            atomic_torch_save(ckpt, path)
            finalize_run(path, val, val_txt=recipe.val_txt, train_samples=train, train_txt=recipe.train_txt,
                         batch_size=recipe.batch_size, workers=workers)
        out.append((name or f"{variant}+last-layer {balance}", path))
    return out


# --- output ----------------------------------------------------------------------------------------------------

def _named(entry: dict | None) -> str:
    return "n/a" if not entry else f"{entry['name']} {fmt_pct(entry['accuracy'], 1)}"


def format_table(rows: list[dict]) -> str:
    heads = list(dict.fromkeys(h for r in rows for h in r.get("heads") or {}))
    header = ["variant", "TTA", "accuracy [95% CI]", "bal. acc.", "worst class", "worst race × gender",
              "ECE raw -> cal", "cal. ECE if perfectly calibrated", "acc@95% cov.", *[f"{h} acc." for h in heads]]
    body = [[r["variant"], "flip" if r["tta"] else "-", fmt_ci(r["accuracy"], 2),
             fmt_pct(r["balanced_accuracy"]["value"], 2), _named(r["worst_class"]), _named(r["worst_group"]),
             f"{fmt_num(r['ece_before'], 4)} -> {fmt_num(r['ece_after'], 4)}",
             fmt_ece_floor(r["ece_after_if_calibrated"]),
             fmt_pct(r["accuracy_at_95_coverage"], 2),
             *[fmt_pct((r.get("heads") or {}).get(h), 2) for h in heads]] for r in rows]
    widths = [max(len(str(line[i])) for line in [header, *body]) for i in range(len(header))]
    fmt = lambda line: "  ".join(str(c).ljust(w) for c, w in zip(line, widths)).rstrip()  # noqa: E731
    return "\n".join([fmt(header), fmt(["-" * w for w in widths]), *map(fmt, body)])


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    recipe = config.parse_args(["-c", args.config], prog="bench/accuracy.py")
    needed = [recipe.val_txt] if args.model_path else [recipe.train_txt, recipe.val_txt]
    missing = [m for m in needed if not Path(m).is_file()]
    if missing:
        print(f"{missing[0]} not found: prepare the manifests first, with\n  "
              f"{prepare_command(recipe.train_txt, recipe.taxonomy)}", file=sys.stderr)
        return 2
    out_dir = Path(args.out_dir or Path("runs") / "accuracy" / (Path(args.config).stem + quick_suffix(args)))
    val_txt = evaluation_manifest(args, recipe, out_dir)

    rows, details = [], {}
    if args.model_path:
        plan = []
        for given in args.model_path:
            name, sep, path = given.rpartition("=")
            checkpoint = Path(path)
            label = name if sep else (args.variants or (load_checkpoint(checkpoint).get("train_args") or {})
                                      .get("balance") or "model")
            plan.append((label, checkpoint))
    else:
        options = training_options(args, recipe, out_dir, val_txt)
        plan = [(v, None) for v in args.variants]
    workers = recipe.workers if args.workers is None else args.workers
    for variant, checkpoint in plan:
        if checkpoint is None:
            checkpoint = train_variant(args.config, variant, out_dir / variant, options, args.retrain)
        runs = [(variant, [checkpoint])]
        if args.linear_probe:
            runs += [(name, [path]) for name, path in last_layer_refits(
                variant, probe_start(checkpoint, recipe), recipe, ["none"], workers, args.min_recall,
                name=f"{variant}: linear probe of the pretrained backbone")]
        if args.last_layer:
            runs += [(name, [path]) for name, path in
                     last_layer_refits(variant, checkpoint, recipe, args.last_layer, workers, args.min_recall)]
        if args.ensemble_with:
            runs.append((f"{variant} + {Path(args.ensemble_with).parent.name or args.ensemble_with} (mean)",
                         [checkpoint, Path(args.ensemble_with)]))
        for name, paths in runs:
            variant_rows, evaluations = evaluate_variant(name, paths, recipe, val_txt, args)
            rows += variant_rows
            details[name] = {"checkpoint": ", ".join(map(str, paths)), "evaluation": evaluations}

    quick = {k: getattr(args, k) for k in QUICK_OPTIONS if getattr(args, k) is not None}
    title = f"Accuracy benchmark: {args.config} on {val_txt}" + (
        f" as {args.eval_taxonomy}" if args.eval_taxonomy else "") + (f" (QUICK RUN {quick}: not the recipe's figures)"
                                                                  if quick else "")
    print(f"\n{title}\n{format_table(rows)}")
    for name, detail in details.items():
        cross_fit = None if ", " in detail["checkpoint"] else (
            (load_checkpoint(detail["checkpoint"]).get("train_args") or {}).get("recall_offsets_cross_fit"))
        if cross_fit:
            detail["recall_offsets_cross_fit"] = cross_fit
            print(f"{name}: offsets fitted on the validation set; {describe_cross_fit(cross_fit)} "
                  f"(in the model's own classes)")
    if args.json:
        result = {"config": args.config, "val_txt": val_txt, "eval_taxonomy": args.eval_taxonomy,
                  "quick": quick, "n_boot": args.n_boot,
                  "columns": list(COLUMNS), "rows": rows, "variants": details}
        atomic_write_text(args.json, json.dumps(result, indent=1, default=_json_default) + "\n")
        print(f"wrote {args.json}")
    return 0


def _json_default(value):
    return value.item() if isinstance(value, np.generic) else str(value)


if __name__ == "__main__":
    sys.exit(main())
