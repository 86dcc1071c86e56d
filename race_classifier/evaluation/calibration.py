"""Temperature scaling and abstention, both fitted on validation data.

Temperature scaling (Guo et al. 2017) divides a model's logits by one number T > 0 chosen to minimise the
negative log-likelihood on held-out data: the predicted class never changes (argmax is unaffected), only
how confident the probabilities are. ``fit_temperature`` does the fit.

Two ways a fitted temperature misleads, both reported (``race-classifier calibrate`` and the end of training
warn, and the model card says so):

* too few images: below ``MIN_CALIBRATION_IMAGES`` (200) validation images the NLL minimum is noisy, and the
  abstention threshold (a quantile) rests on a handful of faces;
* a temperature on a bound of the search (``TEMPERATURE_BOUNDS``, ``at_search_bound``): the NLL kept falling
  towards the bound, so the fit found no minimum. At the upper bound (50) every face gets nearly uniform
  probabilities (a model no better than chance on these images); at the lower one (0.02) every face gets
  probability ~1 (validation images all right and separable). Either way the temperature is unreliable.

Abstention: a confidence threshold below which a face is answered ``uncertain``, chosen so that a target
share of validation faces (``coverage``, e.g. 0.95) is answered: the (1 - coverage) quantile of the
calibrated top-class probabilities. ``choose_threshold`` picks it, ``selective_accuracy`` reports coverage
and accuracy on the answered images.
"""
from __future__ import annotations

import math

import numpy as np
from scipy.optimize import minimize_scalar
from scipy.special import log_softmax, logsumexp

from race_classifier.evaluation.metrics import bootstrap_ci, bootstrap_weights, weighted_rate

# Search range of T: [0.02, 50] covers any model we have seen (T ~ 0.5-3 is usual); searched on log T.
TEMPERATURE_BOUNDS = (0.02, 50.0)
_LOG_T_BOUNDS = (math.log(TEMPERATURE_BOUNDS[0]), math.log(TEMPERATURE_BOUNDS[1]))
# Fewer validation images than this: calibration still runs, with a warning (output and model card). 200 faces
# give the NLL a usable minimum and the abstention threshold (a 5% quantile at coverage 0.95) ten faces below it.
MIN_CALIBRATION_IMAGES = 200
# How close (in log T) a fitted temperature may come to a bound and still count as on it: the bounded Brent
# search stops within ~1e-5 of a bound it runs into.
_BOUND_TOLERANCE = 1e-3


def _as_arrays(logits, labels) -> tuple[np.ndarray, np.ndarray]:
    if hasattr(logits, "detach"):  # a torch tensor
        logits = logits.detach().cpu().numpy()
    if hasattr(labels, "detach"):
        labels = labels.detach().cpu().numpy()
    logits = np.asarray(logits, dtype=np.float64)
    labels = np.asarray(labels, dtype=np.int64)
    if logits.ndim != 2 or len(logits) != len(labels):
        raise ValueError(f"expected (N, K) logits and N labels, got {logits.shape} and {labels.shape}")
    return logits, labels


def nll(logits, labels, temperature: float = 1.0) -> float:
    """Mean negative log-likelihood of ``labels`` under softmax(logits / temperature)."""
    logits, labels = _as_arrays(logits, labels)
    if len(labels) == 0:
        return float("nan")
    scaled = logits / temperature
    return float(np.mean(logsumexp(scaled, axis=1) - scaled[np.arange(len(labels)), labels]))


def fit_temperature(logits, labels) -> float:
    """The T > 0 minimising the NLL of softmax(logits / T) on (``logits``, ``labels``); 1.0 without data.

    A 1-d problem, solved on log T (so T stays positive) by bounded Brent search, in float64; a fit that finds
    no minimum inside ``TEMPERATURE_BOUNDS`` returns the bound (``at_search_bound``)."""
    logits, labels = _as_arrays(logits, labels)
    if len(labels) == 0:
        return 1.0
    rows = np.arange(len(labels))

    def objective(log_t: float) -> float:
        scaled = logits / math.exp(log_t)
        return float(np.mean(logsumexp(scaled, axis=1) - scaled[rows, labels]))

    result = minimize_scalar(objective, bounds=_LOG_T_BOUNDS, method="bounded", options={"xatol": 1e-6})
    best, value = result.x, objective(result.x)
    for bound in _LOG_T_BOUNDS:
        # No minimum inside: the NLL falls, or stays flat (it underflows to 0 when every image is right by a
        # wide margin), all the way to a bound. Return the bound itself, so that ``at_search_bound`` sees it.
        if objective(bound) <= value:
            best, value = bound, objective(bound)
    return float(math.exp(best))


def at_search_bound(temperature: float) -> bool:
    """Whether a temperature from ``fit_temperature`` sits on a bound of its search (``TEMPERATURE_BOUNDS``):
    the fit found no minimum inside it, and the temperature is unreliable (module docstring)."""
    log_t = math.log(temperature)
    return any(abs(log_t - bound) < _BOUND_TOLERANCE for bound in _LOG_T_BOUNDS)


def softmax(logits, temperature: float = 1.0) -> np.ndarray:
    logits = np.asarray(logits, dtype=np.float64)
    return np.exp(log_softmax(logits / temperature, axis=1))


def uncalibrated(probs: np.ndarray, temperature: float) -> np.ndarray:
    """softmax(z) from softmax(z / T): log p = z / T + c per row, so softmax(T log p) = softmax(z).
    Exact up to float precision (probabilities that underflowed to 0 are clipped at 1e-300)."""
    log_p = np.log(np.clip(np.asarray(probs, dtype=np.float64), 1e-300, None))
    return softmax(log_p * temperature)


def choose_threshold(confidence, coverage: float) -> float | None:
    """The confidence threshold answering ``coverage`` of these faces (confidence >= threshold): the
    (1 - coverage) quantile, taken at an observed value so that at least that share is answered, then moved
    halfway down to the next lower observed value. A threshold equal to a face's own confidence would leave
    that face to rounding: the same model in float32 (ONNX, another batch size) may fall just below it."""
    if not 0 < coverage <= 1:
        raise ValueError(f"coverage must be in (0, 1], got {coverage}")
    confidence = np.asarray(confidence, dtype=np.float64)
    if confidence.size == 0:
        return None
    cut = float(np.quantile(confidence, 1 - coverage, method="lower"))
    below = confidence[confidence < cut]
    return (float(below.max()) + cut) / 2 if below.size else max(cut - 1e-6, 0.0)


def abstention_summary(confidence, correct, threshold: float | None, target_coverage: float | None = None) -> dict:
    """{"threshold", "target_coverage", "coverage", "n", "n_answered", "accuracy_at_coverage", "accuracy_all"}."""
    confidence = np.asarray(confidence, dtype=np.float64)
    correct = np.asarray(correct, dtype=np.float64)
    answered = confidence >= threshold if threshold is not None else np.zeros(len(confidence), bool)
    return {
        "threshold": threshold,
        "target_coverage": target_coverage,
        "coverage": float(answered.mean()) if len(confidence) else None,
        "n": int(len(confidence)),
        "n_answered": int(answered.sum()),
        "accuracy_at_coverage": float(correct[answered].mean()) if answered.any() else None,
        "accuracy_all": float(correct.mean()) if len(correct) else None,
    }


def selective_accuracy(confidence, correct, threshold: float, n_boot: int = 1000, seed: int = 0,
                       ci: float = 0.95) -> dict:
    """Coverage and accuracy on the answered images (confidence >= threshold), with bootstrap CIs."""
    confidence = np.asarray(confidence, dtype=np.float64)
    correct = np.asarray(correct, dtype=np.float64)
    answered = (confidence >= threshold).astype(float)
    weights = bootstrap_weights(len(correct), n_boot, seed)
    summary = abstention_summary(confidence, correct, threshold)
    summary.pop("target_coverage")
    summary["coverage_ci"] = bootstrap_ci(lambda w: weighted_rate(w, answered), weights, ci)
    summary["selective_accuracy"] = bootstrap_ci(lambda w: weighted_rate(w, correct, answered), weights, ci)
    return summary
