"""How figures are written for people: percentages, confidence intervals, p-values, "n/a" for undefined.

One place, so the console, the HTML report and the model card say the same number the same way.
"""
from __future__ import annotations

import json

import pandas as pd


def _missing(value) -> bool:
    if value is None:
        return True
    try:
        return bool(pd.isna(value))
    except (TypeError, ValueError):  # lists and the like are not "missing"
        return False


def fmt_pct(value, digits: int = 1) -> str:
    """0.8765 -> '87.7%'; None or NaN -> 'n/a'."""
    return "n/a" if _missing(value) else f"{100 * float(value):.{digits}f}%"


def fmt_pp(value, digits: int = 1) -> str:
    """A difference of two fractions in signed percentage points: 0.031 -> '+3.1 pp'."""
    return "n/a" if _missing(value) else f"{100 * float(value):+.{digits}f} pp"


def fmt_points(value, digits: int = 1) -> str:
    """An unsigned gap between two fractions: 0.123 -> '12.3 percentage points'."""
    return "n/a" if _missing(value) else f"{100 * float(value):.{digits}f} percentage points"


def fmt_interval(estimate, digits: int = 1) -> str:
    """The confidence interval of {"value", "ci_low", "ci_high"} alone: '[85.1, 90.0]'; 'n/a' without one."""
    low, high = (estimate.get("ci_low"), estimate.get("ci_high")) if isinstance(estimate, dict) else (None, None)
    if _missing(low) or _missing(high):
        return "n/a"
    return f"[{100 * float(low):.{digits}f}, {100 * float(high):.{digits}f}]"


def fmt_ci(estimate, digits: int = 1) -> str:
    """{"value", "ci_low", "ci_high"} -> '87.7% [85.1, 90.0]' (the bracket is the CI)."""
    if not isinstance(estimate, dict):
        return fmt_pct(estimate, digits)
    text = fmt_pct(estimate.get("value"), digits)
    interval = fmt_interval(estimate, digits)
    return text if _missing(estimate.get("value")) or interval == "n/a" else f"{text} {interval}"


def fmt_pp_ci(low, high, digits: int = 1) -> str:
    if _missing(low) or _missing(high):
        return "n/a"
    return f"[{100 * float(low):+.{digits}f}, {100 * float(high):+.{digits}f}] pp"


def fmt_num(value, digits: int = 3) -> str:
    return "n/a" if _missing(value) else f"{float(value):.{digits}f}"


def fmt_count(value) -> str:
    return "n/a" if _missing(value) else f"{int(value):,}"


def fmt_p(value) -> str:
    if _missing(value):
        return "n/a"
    return "<0.001" if float(value) < 0.001 else f"{float(value):.3f}"


def fmt_ece_floor(floor, percent: bool = False) -> str:
    """metrics.ece_if_calibrated's figures, in the ECE's own units (a fraction to 4 decimals, or percent):
    '0.0181 expected, 95% <= 0.0252; p < 0.001'; 'n/a' without them."""
    if not isinstance(floor, dict) or _missing(floor.get("mean")):
        return "n/a"
    value = (lambda v: fmt_pct(v, 2)) if percent else (lambda v: fmt_num(v, 4))
    # p counts draws in n_draws: none reaching the observed ECE means p < 1 / n_draws, not p = 0.
    resolution = max(1 / floor["n_draws"], 0.001)
    p = float(floor["p_value"])
    p_text = f"p < {resolution:g}" if p < resolution else f"p = {p:.3f}"
    return f"{value(floor['mean'])} expected, 95% <= {value(floor['p95'])}; {p_text}"


def ci_label(level) -> str:
    """0.95 -> '95%'; a missing level is the default 95%."""
    return "95%" if _missing(level) else f"{100 * float(level):g}%"


def fmt_value(value) -> str:
    """Model metadata values: short floats, lists joined, anything else as text."""
    if _missing(value):
        return "n/a"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, float):
        return f"{value:.4g}"
    if isinstance(value, (list, tuple)):
        if all(isinstance(v, (str, int, float, bool)) or v is None for v in value):
            return ", ".join(fmt_value(v) for v in value)
        return json.dumps(value, default=str)
    return str(value)
