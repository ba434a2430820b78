"""Scores of one model on one set, the same code for every model.

Forecasts come as `point` [N, K, H] (series, origin, step; origin 0 is the last) with optional
95 % bounds `lo`, `hi` of the same shape. MASE is per (series, origin): the MAE over the horizon
divided by the in-sample MAE of the seasonal naive forecast on that origin's history (as in the
M4 competition), then averaged; MAE and bias (mean of forecast - actual) are in the data's units,
pooled over every forecast step.
"""

from __future__ import annotations

import math

import numpy as np

from dist_gru.bench.accuracy.datasets import ForecastSet


def naive_scale(history: np.ndarray, season: int) -> float:
    """The in-sample seasonal naive MAE of `history` (lag 1 when the history is too short for a season)."""
    lag = season if len(history) > season else 1
    return float(np.mean(np.abs(history[lag:] - history[:-lag]))) if len(history) > lag else math.nan


def actuals(fset: ForecastSet) -> np.ndarray:
    """The values each origin forecasts: [N, K, H]."""
    out = np.empty((len(fset.series), fset.origins, fset.horizon))
    for i, y in enumerate(fset.series):
        for k in range(fset.origins):
            cut = fset.cut(i, k)
            out[i, k] = y[cut : cut + fset.horizon]
    return out


def forecast_scores(fset: ForecastSet, point: np.ndarray, lo: np.ndarray | None = None, hi: np.ndarray | None = None) -> dict:
    """mase, mae, bias and (with bounds) coverage of the 95 % interval."""
    truth = actuals(fset)
    error = point - truth
    scale = np.array(
        [[naive_scale(y[: fset.cut(i, k)], fset.season) for k in range(fset.origins)] for i, y in enumerate(fset.series)]
    )
    scale[scale == 0] = math.nan  # a flat history has no scale: left out of MASE, not infinite
    scores = {
        "mase": float(np.nanmean(np.abs(error).mean(-1) / scale)),
        "mae": float(np.abs(error).mean()),
        "bias": float(error.mean()),
    }
    if lo is not None and hi is not None:
        scores["coverage95"] = float(((truth >= lo) & (truth <= hi)).mean())
    return scores


def accuracy(labels: list[np.ndarray] | np.ndarray, predicted: np.ndarray) -> dict:
    """Accuracy over sequences (labels [N]) or over every step (a [T_i] array per sequence)."""
    truth = np.concatenate([np.ravel(y) for y in labels]) if isinstance(labels, list) else np.asarray(labels)
    return {"accuracy": float((np.ravel(predicted) == truth).mean())}


def summarise(runs: list[dict]) -> dict:
    """Per key over seeds: the mean and the range [min, max] (finite runs only)."""
    summary = {}
    for key in runs[0]:
        values = [r[key] for r in runs if isinstance(r.get(key), int | float)]
        if values:
            summary[key] = {"mean": float(np.mean(values)), "min": float(np.min(values)), "max": float(np.max(values))}
    return summary
