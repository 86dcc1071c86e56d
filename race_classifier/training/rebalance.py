"""Last-layer rebalancing: refit only the race classifier of a trained model, on its frozen features, with
class- or race x gender group-balanced sample weights.

Kirichenko et al. 2022 ("Last Layer Re-Training is Sufficient for Robustness to Spurious Correlations",
DFR) show that reweighting the last layer recovers most of what reweighted full training buys for the worst
groups. Here it costs one pass over the images plus a logistic regression (minutes on a CPU) instead of a
training run per balance mode, so the debiasing comparison can be made on any trained model. Without
weights (``--balance none``) it is a control: the same refit, unweighted.

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

log = logging.getLogger("race_classifier.rebalance")
BALANCES = ("none", "sampler", "group")


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model_path", required=True, help="a race-classifier checkpoint (its backbone is kept)")
    p.add_argument("--train_txt", required=True, help="images the last layer is refitted on (labels in the "
                   "model's classes; the gender column defines the race x gender groups)")
    p.add_argument("--val_txt", required=True, help="validation manifest: calibration and the model card")
    p.add_argument("--out_dir", required=True, help="where the new best.pt and MODEL_CARD.md go")
    p.add_argument("--balance", choices=BALANCES, default="group",
                   help="sample weights: none, sampler (every class the same total weight), group (every "
                        "race x gender cell the same total weight)")
    p.add_argument("--C", type=float, default=1.0, help="inverse L2 strength of the logistic regression")
    p.add_argument("--batch_size", type=int, default=128)
    p.add_argument("--workers", type=int, default=2)


def last_linear(model):
    """(name, module) of the layer whose input is the shared features and whose output is the logits."""
    from torch import nn

    from race_classifier.models.factory import classifier_prefix
    name = classifier_prefix(model)
    module = model.get_submodule(name)
    if not isinstance(module, nn.Linear):
        raise ValueError(f"the model's classifier {name!r} is a {type(module).__name__}, not a Linear layer: "
                         "last-layer rebalancing needs a linear classifier")
    return name, module


def extract_features(model, samples, preprocessing, batch_size: int = 128, workers: int = 2,
                     desc: str = "features") -> tuple[np.ndarray, np.ndarray]:
    """(features (N, D) float32, readable mask (N,)): the last Linear's input for each image, no augmentation.
    Unreadable images are reported by the dataset and get a False mask entry."""
    import torch
    from torch.utils.data import DataLoader
    from tqdm import tqdm

    from race_classifier.data.dataset import FaceDataset, collate_skipping_failures
    from race_classifier.data.transforms import build_transform

    _, linear = last_linear(model)
    captured = []
    hook = linear.register_forward_hook(lambda _m, inputs, _out: captured.append(inputs[0].detach().float()))
    dataset = FaceDataset(samples, build_transform(preprocessing, train=False), draft_size=preprocessing.image_size)
    loader = DataLoader(dataset, batch_size=batch_size, num_workers=workers, collate_fn=collate_skipping_failures)
    features = np.zeros((len(samples), linear.in_features), np.float32)
    readable = np.zeros(len(samples), bool)
    model.eval()
    try:
        with torch.no_grad():
            for batch in tqdm(loader, desc=desc, disable=None, unit="batch"):
                for index, reason in batch["failures"]:
                    log.warning("skipping unreadable image %s: %s", samples[index].path, reason)
                if batch["images"] is None:
                    continue
                captured.clear()
                model(batch["images"].contiguous(memory_format=torch.channels_last))
                idx = batch["indices"].numpy()
                features[idx], readable[idx] = captured[0].numpy(), True
    finally:
        hook.remove()
    return features, readable


def balance_weights(labels: np.ndarray, genders: list[str], balance: str, num_classes: int) -> np.ndarray | None:
    """Per-sample weights of mean 1 (None for ``none``), as the training sampler's balance modes define them."""
    import torch

    from race_classifier.data.sampler import class_balanced_weights, group_balanced_weights
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
    from sklearn.linear_model import LogisticRegression
    from sklearn.preprocessing import StandardScaler

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


def rebalance(model_path: str | Path, train_samples, balance: str, C: float = 1.0, batch_size: int = 128,
              workers: int = 2, features=None) -> dict:
    """The checkpoint of ``model_path`` with its race rows refitted (a dict ready to save). ``features``:
    precomputed (features, readable) of ``train_samples``, to refit several balance modes from one pass."""
    import torch

    from race_classifier.models.checkpoint import load_model
    loaded = load_model(model_path)
    ckpt = loaded.checkpoint
    if features is None:
        features = extract_features(loaded.model, train_samples, loaded.preprocessing, batch_size, workers)
    feats, readable = features
    labels = np.array([s.label for s in train_samples])
    use = readable & (labels >= 0)
    weights = balance_weights(labels[use], [s.gender for s in np.asarray(train_samples, object)[use]], balance,
                              loaded.taxonomy.num_classes)
    weight, bias = fit_last_layer(feats[use], labels[use], loaded.taxonomy.num_classes, weights, C)
    name, _ = last_linear(loaded.model)
    k = loaded.taxonomy.num_classes
    state = dict(ckpt["state_dict"])
    state[f"{name}.weight"] = state[f"{name}.weight"].clone()
    state[f"{name}.bias"] = state[f"{name}.bias"].clone()
    state[f"{name}.weight"][:k] = torch.as_tensor(weight, dtype=state[f"{name}.weight"].dtype)
    state[f"{name}.bias"][:k] = torch.as_tensor(bias, dtype=state[f"{name}.bias"].dtype)
    out = {key: value for key, value in ckpt.items() if key not in ("calibration", "resume")}
    out["state_dict"] = state
    out["train_args"] = {**ckpt.get("train_args", {}), "last_layer_rebalance": balance, "last_layer_C": C,
                         "rebalanced_from": str(model_path)}
    return out


def run(args: argparse.Namespace) -> int:
    from race_classifier.data.manifest import read_manifest
    from race_classifier.models.checkpoint import load_checkpoint
    from race_classifier.labels import Taxonomy
    from race_classifier.training.finalize import finalize_run
    from race_classifier.utils import atomic_torch_save
    taxonomy = Taxonomy.from_dict(load_checkpoint(args.model_path)["taxonomy"])
    train_samples = read_manifest(args.train_txt, taxonomy)
    val_samples = read_manifest(args.val_txt, taxonomy)
    ckpt = rebalance(args.model_path, train_samples, args.balance, args.C, args.batch_size, args.workers)
    out = Path(args.out_dir) / "best.pt"
    out.parent.mkdir(parents=True, exist_ok=True)
    atomic_torch_save(ckpt, out)
    print(f"Refitted the race layer of {args.model_path} with --balance {args.balance}: {out}", flush=True)
    finalize_run(out, val_samples, val_txt=args.val_txt, train_samples=train_samples, train_txt=args.train_txt,
                 batch_size=args.batch_size, workers=args.workers)
    return 0
