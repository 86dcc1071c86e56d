"""Last-layer rebalancing: refit only the race classifier of a trained model, on its frozen features, with
class- or race x gender group-balanced sample weights.

Kirichenko et al. 2022 ("Last Layer Re-Training is Sufficient for Robustness to Spurious Correlations",
DFR) show that reweighting the last layer recovers most of what reweighted full training buys for the worst
groups. Here it costs one pass over the images plus a logistic regression (minutes on a CPU) instead of a
training run per balance mode, so the debiasing comparison can be made on any trained model. Without
weights (``--balance none``) it is a control: the same refit, unweighted.

``--balance recall --min_recall 0.6`` changes the trained layer's biases only: per-class logit offsets,
fitted on the validation set, that lift every class's recall to at least the target while moving the fewest
faces (post-processing for equal opportunity, as Hardt et al. 2016 do with per-group thresholds; logit
adjustment in Menon et al. 2021). It trades overall accuracy for the worst class's; the command prints a
2-fold cross-fitted estimate of both, since the offsets' own validation figures are optimistic.

    race-classifier rebalance --model_path runs/x/best.pt --train_txt train.txt --val_txt val.txt \\
        --balance group --out_dir runs/x/last_layer_group

The new checkpoint (``<out_dir>/best.pt``) keeps the backbone and any gender/age heads, gets the refitted
race rows of the last layer, and is calibrated with a model card beside it like a trained one.
"""
from __future__ import annotations

import argparse
import logging
from pathlib import Path

import numpy as np
import torch
from sklearn.linear_model import LogisticRegression
from sklearn.preprocessing import StandardScaler
from torch import nn

from race_classifier.data.dataset import eval_loader
from race_classifier.data.manifest import read_manifest
from race_classifier.data.sampler import class_balanced_weights, group_balanced_weights
from race_classifier.evaluation.runner import predict_logits
from race_classifier.labels import Taxonomy, get_taxonomy
from race_classifier.models.bundled import resolve_arguments
from race_classifier.models.checkpoint import load_checkpoint, load_model
from race_classifier.models.factory import classifier_prefix
from race_classifier.models.loaders import load_predictor
from race_classifier.models.merged import label_mapping
from race_classifier.post_training.calibrate import finalize_run, output_path
from race_classifier.post_training.model_card import (
    describe_cross_fit,
    describe_offsets,
)
from race_classifier.utils import atomic_torch_save, progress_bar

log = logging.getLogger("race_classifier.rebalance")


def last_linear(model):
    """(name, module) of the layer whose input is the shared features and whose output is the logits."""
    name = classifier_prefix(model)
    module = model.get_submodule(name)
    if not isinstance(module, nn.Linear):
        raise ValueError(f"the model's classifier {name!r} is a {type(module).__name__}, not a Linear layer: "
                         "last-layer rebalancing needs a linear classifier")
    return name, module


def extract_features(model, samples, preprocessing, batch_size: int = 128, workers: int = 2,
                     desc: str = "features") -> tuple[np.ndarray, np.ndarray]:
    """(features (N, D) float32, readable mask (N,)): the last Linear's input for each image, no augmentation.
    Unreadable images are reported by the dataset and get a False mask entry. Runs where the model is."""
    _, linear = last_linear(model)
    device = next(model.parameters()).device
    captured = []
    hook = linear.register_forward_hook(lambda _m, inputs, _out: captured.append(inputs[0].detach().float()))
    loader = eval_loader(samples, preprocessing, batch_size, workers)
    features = np.zeros((len(samples), linear.in_features), np.float32)
    readable = np.zeros(len(samples), bool)
    model.eval()
    try:
        with torch.no_grad():
            for batch in progress_bar(loader, desc):
                for index, reason in batch["failures"]:
                    log.warning("skipping unreadable image %s: %s", samples[index].path, reason)
                if batch["images"] is None:
                    continue
                captured.clear()
                model(batch["images"].to(device).contiguous(memory_format=torch.channels_last))
                idx = batch["indices"].numpy()
                features[idx], readable[idx] = captured[0].cpu().numpy(), True
    finally:
        hook.remove()
    return features, readable


def balance_weights(labels: np.ndarray, genders: list[str], balance: str, num_classes: int) -> np.ndarray | None:
    """Per-sample weights of mean 1 (None for ``none``), as the training sampler's balance modes define them."""
    if balance == "none":
        return None
    if balance == "sampler":
        w = class_balanced_weights(torch.as_tensor(labels), num_classes)
    else:
        w = group_balanced_weights(labels.tolist(), genders)
    w = w.numpy().astype(np.float64)
    return w * (len(w) / w.sum())


def fit_last_layer(features: np.ndarray, labels: np.ndarray, num_classes: int, weights: np.ndarray | None = None,
                   C: float = 1.0, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """(weight (K, D), bias (K,)) of a multinomial logistic regression on standardised features, folded back
    so that it applies to the raw features. A class absent from ``labels`` gets a very low bias."""
    scaler = StandardScaler().fit(features)
    clf = LogisticRegression(C=C, max_iter=2000, random_state=seed)
    clf.fit(scaler.transform(features), labels, sample_weight=weights)
    scale = np.where(scaler.scale_ > 0, scaler.scale_, 1.0)
    coef = clf.coef_ / scale
    intercept = clf.intercept_ - coef @ scaler.mean_
    if len(clf.classes_) == 2:  # sklearn gives one row for two classes: logit of the second
        coef, intercept = np.vstack([-coef / 2, coef / 2]), np.array([-intercept[0] / 2, intercept[0] / 2])
    weight = np.zeros((num_classes, features.shape[1]))
    bias = np.full(num_classes, -1e4)
    weight[clf.classes_], bias[clf.classes_] = coef, intercept
    return weight, bias


def class_recalls(logits: np.ndarray, labels: np.ndarray, num_classes: int) -> np.ndarray:
    """Recall of each class (NaN for a class with no faces)."""
    predicted = logits.argmax(1)
    return np.array([(predicted[labels == k] == k).mean() if (labels == k).any() else np.nan
                     for k in range(num_classes)])


def fit_recall_offsets(logits: np.ndarray, labels: np.ndarray, min_recall: float, step: float = 0.05,
                       max_steps: int = 2000) -> np.ndarray:
    """Per-class logit offsets (>= 0) after which every class present in ``labels`` has a recall of at least
    ``min_recall``: the class furthest below is raised a ``step`` at a time, or at once by as much as its
    nearest wrong face needs when that is more (logits far apart, such as an ensemble's log-probabilities,
    would otherwise take thousands of steps), so offsets stay as small as the target allows. If the target
    cannot be met, the offsets with the highest worst-class recall seen."""
    num_classes = logits.shape[1]
    offsets = np.zeros(num_classes)
    best, best_worst = offsets.copy(), -1.0
    for _ in range(max_steps):
        recalls = class_recalls(logits + offsets, labels, num_classes)
        low = int(np.nanargmin(recalls))
        if recalls[low] > best_worst:
            best, best_worst = offsets.copy(), recalls[low]
        if recalls[low] >= min_recall:
            return offsets
        scores = (logits + offsets)[labels == low]
        gaps = np.delete(scores, low, axis=1).max(axis=1) - scores[:, low]  # >= 0 for its wrong faces
        offsets[low] += max(step, gaps[gaps >= 0].min() + 1e-6)
    return best


def cross_fitted_offsets_estimate(logits: np.ndarray, labels: np.ndarray, min_recall: float,
                                  seed: int = 0) -> tuple[float, np.ndarray]:
    """(accuracy, per-class recalls) of the offsets on faces they were not fitted on: fit on one half of
    the validation set, score the other, and the other way round."""
    halves = np.array_split(np.random.default_rng(seed).permutation(len(labels)), 2)
    predicted = np.zeros(len(labels), int)
    for fit_on, score_on in ((halves[0], halves[1]), (halves[1], halves[0])):
        offsets = fit_recall_offsets(logits[fit_on], labels[fit_on], min_recall)
        predicted[score_on] = (logits[score_on] + offsets).argmax(1)
    num_classes = logits.shape[1]
    recalls = class_recalls(np.eye(num_classes)[predicted], labels, num_classes)
    return float((predicted == labels).mean()), recalls


def _with_race_layer(ckpt: dict, name: str, num_classes: int, weight=None, bias=None) -> dict:
    """A copy of ``ckpt`` whose race rows of the last layer are replaced (calibration dropped: refit it)."""
    state = dict(ckpt["state_dict"])
    for key, value in ((f"{name}.weight", weight), (f"{name}.bias", bias)):
        if value is not None:
            state[key] = state[key].clone()
            state[key][:num_classes] = torch.as_tensor(value, dtype=state[key].dtype)
    out = {key: value for key, value in ckpt.items() if key not in ("calibration", "resume")}
    out["state_dict"] = state
    return out


def raise_low_recalls(model_path: str | Path, val_samples, min_recall: float, batch_size: int = 128,
                      workers: int = 2, features=None) -> tuple[dict, dict]:
    """(checkpoint with the offsets added to its race biases, or to a merge-classes model's merged logits or an
    ensemble's averaged ones, report): ``--balance recall``."""
    loaded = load_model(model_path)
    merge, ensemble = loaded.checkpoint.get("merged_classes"), loaded.checkpoint.get("ensemble")
    labels = np.array([s.label for s in val_samples])
    k = loaded.taxonomy.num_classes
    if merge or ensemble:  # no one race layer answers: the offsets go on the model's output logits
        all_logits, _ = predict_logits(load_predictor(model_path), val_samples, batch_size, workers,
                                       desc="validation logits")
        use = ~np.isnan(all_logits).any(axis=1) & (labels >= 0)
        logits = all_logits[use]
    else:
        if features is None:
            features = extract_features(loaded.model, val_samples, loaded.preprocessing, batch_size, workers,
                                        desc="validation features")
        feats, readable = features
        use = readable & (labels >= 0)
        name, linear = last_linear(loaded.model)
        weight = linear.weight.detach().double().numpy()[:k]
        bias = linear.bias.detach().double().numpy()[:k]
        logits = feats[use] @ weight.T + bias
    offsets = fit_recall_offsets(logits, labels[use], min_recall)
    accuracy, recalls = cross_fitted_offsets_estimate(logits, labels[use], min_recall)
    report = {"offsets": dict(zip(loaded.taxonomy.classes, offsets.round(3).tolist())), "min_recall": min_recall,
              "cross_fit": {"accuracy": accuracy, "recalls": dict(zip(loaded.taxonomy.classes, recalls.tolist()))},
              "accuracy_before": float((logits.argmax(1) == labels[use]).mean()),
              "accuracy_after": float(((logits + offsets).argmax(1) == labels[use]).mean()),
              "worst_recall_after": float(np.nanmin(class_recalls(logits + offsets, labels[use], k)))}
    if merge or ensemble:  # recorded with the merge (applied last) or else the ensemble, on top of earlier ones
        key, spec = ("merged_classes", merge) if merge else ("ensemble", ensemble)
        out = {name: value for name, value in loaded.checkpoint.items() if name not in ("calibration", "resume")}
        out[key] = {**spec, "offsets": (np.array(spec.get("offsets") or np.zeros(k)) + offsets).tolist()}
    else:
        out = _with_race_layer(loaded.checkpoint, name, k, bias=bias + offsets)
    out["train_args"] = {**loaded.checkpoint.get("train_args", {}), "last_layer_rebalance": "recall",
                         "min_recall": min_recall, "recall_offsets": report["offsets"],
                         "recall_offsets_cross_fit": report["cross_fit"],
                         "rebalanced_from": str(model_path)}
    return out, report


def _race_labelled(features: tuple[np.ndarray, np.ndarray], samples) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(features, labels, mask into ``samples``) of the readable faces with a race label."""
    feats, readable = features
    labels = np.array([s.label for s in samples])
    use = readable & (labels >= 0)
    return feats[use], labels[use], use


def fit_race_layer(features: tuple[np.ndarray, np.ndarray], samples, balance: str, num_classes: int,
                   C: float = 1.0) -> tuple[np.ndarray, np.ndarray]:
    """(weight, bias) of the race layer fitted on the (features, readable) of ``samples`` with ``balance``'s
    weights; faces without a race label are left out."""
    feats, labels, use = _race_labelled(features, samples)
    weights = balance_weights(labels, [s.gender for s in np.asarray(samples, object)[use]], balance, num_classes)
    return fit_last_layer(feats, labels, num_classes, weights, C)


def fit_linear_probe(model: nn.Module, samples, preprocessing, num_classes: int, balance: str = "none",
                     batch_size: int = 128, workers: int = 2) -> float:
    """LP-FT's first step (Kumar et al. 2022, "Fine-Tuning can Distort Pretrained Features"): set the race rows
    of ``model``'s last layer, in place, to a logistic regression on its frozen features of ``samples``, so
    that fine-tuning starts from a fitted layer instead of a random one whose large early gradients distort
    the pretrained features. Returns the probe's accuracy on ``samples``."""
    features = extract_features(model, samples, preprocessing, batch_size, workers, desc="linear probe features")
    weight, bias = fit_race_layer(features, samples, balance, num_classes)
    _, linear = last_linear(model)
    with torch.no_grad():
        linear.weight[:num_classes] = torch.as_tensor(weight, dtype=linear.weight.dtype)
        linear.bias[:num_classes] = torch.as_tensor(bias, dtype=linear.bias.dtype)
    feats, labels, _ = _race_labelled(features, samples)
    return float(((feats @ weight.T + bias).argmax(1) == labels).mean())


def rebalance(model_path: str | Path, train_samples, balance: str, C: float = 1.0, batch_size: int = 128,
              workers: int = 2, features=None) -> dict:
    """The checkpoint of ``model_path`` with its race rows refitted (a dict ready to save). ``features``:
    precomputed (features, readable) of ``train_samples``, to refit several balance modes from one pass."""
    loaded = load_model(model_path)
    ckpt = loaded.checkpoint
    if features is None:
        features = extract_features(loaded.model, train_samples, loaded.preprocessing, batch_size, workers)
    weight, bias = fit_race_layer(features, train_samples, balance, loaded.taxonomy.num_classes, C)
    name, _ = last_linear(loaded.model)
    out = _with_race_layer(ckpt, name, loaded.taxonomy.num_classes, weight, bias)
    out["train_args"] = {**ckpt.get("train_args", {}), "last_layer_rebalance": balance, "last_layer_C": C,
                         "rebalanced_from": str(model_path)}
    return out


def format_recall_report(report: dict, model_path, out: Path) -> str:
    return (f"Added per-class logit offsets to {model_path} ({describe_offsets(report['offsets'])}): {out}\n"
            f"  validation accuracy {100 * report['accuracy_before']:.2f}% -> {100 * report['accuracy_after']:.2f}% "
            f"(fitted on it); {describe_cross_fit(report['cross_fit'])} (target {100 * report['min_recall']:.0f}%)"
            + ("" if report["worst_recall_after"] >= report["min_recall"] else
               f"\n  the target was not reached even on the validation set: its worst class is at "
               f"{100 * report['worst_recall_after']:.1f}% with these offsets (the best found)"))


def run(args: argparse.Namespace) -> int:
    resolve_arguments(args, "model_path", checkpoint=True)
    ckpt = load_checkpoint(args.model_path)
    if ckpt.get("ensemble") and args.balance != "recall":
        raise ValueError(f"{args.model_path} is an ensemble: refit the last layers of its members "
                         "(--balance recall works on an ensemble: its offsets go on the averaged logits)")
    if ckpt.get("merged_classes") and args.balance != "recall":  # its last layer scores the trained classes
        raise ValueError(f"{args.model_path} answers in merged classes: refit the last layer of the model it was "
                         f"made from ({ckpt['merged_classes'].get('source')}), then merge that (--balance recall "
                         "works on a merged model: its offsets go on the merged classes)")
    taxonomy = Taxonomy.from_dict(ckpt["taxonomy"])
    mapping = label_mapping(ckpt, get_taxonomy(args.source_taxonomy)) if args.source_taxonomy else None
    train_samples = read_manifest(args.train_txt, taxonomy, mapping)
    val_samples = read_manifest(args.val_txt, taxonomy, mapping)
    out = output_path(args.out_dir, args.model_path)
    out.parent.mkdir(parents=True, exist_ok=True)
    if args.balance == "recall":
        ckpt, report = raise_low_recalls(args.model_path, val_samples, args.min_recall, args.batch_size, args.workers)
        atomic_torch_save(ckpt, out)
        print(format_recall_report(report, args.model_path, out), flush=True)
    else:
        ckpt = rebalance(args.model_path, train_samples, args.balance, args.C, args.batch_size, args.workers)
        atomic_torch_save(ckpt, out)
        print(f"Refitted the race layer of {args.model_path} with --balance {args.balance}: {out}", flush=True)
    finalize_run(out, val_samples, val_txt=args.val_txt, train_samples=train_samples, train_txt=args.train_txt,
                 batch_size=args.batch_size, workers=args.workers)
    return 0
