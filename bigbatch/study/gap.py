"""The gap phase (Keskar et al. 2016): train/test gap, sharpness and Hessian outliers per batch,
trends per doubling.

Pure functions on the gap phase's trial records (phase = "gap"): each seed trained at its batch's
best lr until a training criterion (training accuracy >= a stated level), so the rows compare
batches at the same training accuracy and test accuracy is free to differ.
"""

from __future__ import annotations

import math
import statistics
from collections import defaultdict
from collections.abc import Iterable, Sequence
from typing import Any

import numpy as np


def trend_per_doubling(points: Sequence[tuple[float, float]], level: float = 0.95) -> dict[str, Any] | None:
    """Slope of value against log2(batch), with a t interval: the change per doubling of the batch.

    Ordinary least squares on every (batch, value) point (one per seed, so the seed spread enters
    the residuals); the interval is slope +- t_{n-2} x its standard error. None with fewer than
    two distinct batches; the interval is None with fewer than three points.
    """
    pts = [(math.log2(b), float(v)) for b, v in points if v is not None and math.isfinite(float(v))]
    if len({x for x, _ in pts}) < 2:
        return None
    x, y = np.array(pts).T
    slope, icept = np.polyfit(x, y, 1)
    out: dict[str, Any] = {"slope": float(slope), "ci": None, "n": len(pts)}
    if len(pts) >= 3:
        from scipy import stats

        resid = y - (slope * x + icept)
        se = math.sqrt(float(resid @ resid) / (len(pts) - 2) / float(((x - x.mean()) ** 2).sum()))
        half = float(stats.t.ppf((1 + level) / 2, len(pts) - 2)) * se
        out["ci"] = [float(slope) - half, float(slope) + half]
    return out


GAP_KEYS = ("train_acc", "test_acc", "train_loss", "test_loss", "gap", "loss_gap", "sharpness", "sharpness_own_b",
            "epochs", "steps", "outliers", "grad_fraction_top_k", "grad_fraction_classes")


def gap_rows(trials: Iterable[dict[str, Any]]) -> list[dict[str, Any]]:
    """The train/test gap per batch size from the gap phase's trials, mean and spread over seeds.

    Gap-phase trials train at their batch's best lr until the training criterion (e.g. training
    accuracy >= 99 % on the fixed training subset) or their budget cap; only seeds that met the
    criterion enter a row (so every row's train accuracy is at the criterion and test accuracy is
    free to differ); `n_not_met` counts the others. gap = train_acc - test_acc, loss_gap =
    test_loss - train_loss, sharpness = top Hessian eigenvalue of the training loss (train-mode
    BatchNorm at one micro-batch for every batch size) at the end, sharpness_own_b the same at
    each trial's own micro-batch; outliers (the gap rule on the top-k eigenvalues at that micro-batch)
    and grad_fraction_top_k / _classes (|P g|^2 / |g|^2 in the top-k / top-C eigenspace), see
    `outlier_rows`. Rows: batch, lr, n_seeds, n_not_met, <key> (mean), <key>_sd.
    """
    by_batch: dict[int, list[dict[str, Any]]] = defaultdict(list)
    for t in trials:
        by_batch[int(t["batch"])].append(t)
    rows = []
    for batch, ts in sorted(by_batch.items()):
        met = [t for t in ts if t.get("status") == "ok"]
        row: dict[str, Any] = {"batch": batch, "lr": ts[0].get("lr"), "n_seeds": len(met),
                               "n_not_met": len(ts) - len(met), "seeds": sorted(t.get("seed", 0) for t in met)}
        for key in GAP_KEYS:
            vals = [float(t[key]) for t in met if t.get(key) is not None]
            row[key] = statistics.fmean(vals) if vals else None
            row[f"{key}_sd"] = statistics.stdev(vals) if len(vals) >= 2 else None
        rows.append(row)
    return rows


def gap_trends(trials: Iterable[dict[str, Any]]) -> dict[str, Any]:
    """Per doubling of the batch: accuracy gap, loss gap (slopes), sharpness = the top eigenvalue and
    the C-th eigenvalue (log2 slopes: 2^slope is the factor per doubling), the number of outliers
    and the gradient's share of the top-k space (slopes)."""
    met = [t for t in trials if t.get("status") == "ok"]
    out = {key: trend_per_doubling([(t["batch"], t.get(key)) for t in met])
           for key in ("gap", "loss_gap", "outliers", "grad_fraction_top_k")}
    out["log2_sharpness"] = _log2_trend([(t["batch"], t.get("sharpness")) for t in met])
    out["log2_class_eigenvalue"] = _log2_trend([(t["batch"], class_eigenvalue(t)) for t in met])
    return out


def _log2_trend(points: Iterable[tuple[int, float | None]]) -> dict[str, Any] | None:
    return trend_per_doubling([(b, math.log2(v)) for b, v in points if v is not None and v > 0])


def class_eigenvalue(trial: dict[str, Any]) -> float | None:
    """lambda_C, the C-th largest eigenvalue (C = classes): where Sagun et al.'s ~C outliers end.
    None when the trial recorded fewer than C."""
    values, c = trial.get("top_eigenvalues") or [], trial.get("num_classes")
    return values[c - 1] if c and len(values) >= c else None


OUTLIER_KEYS = {
    "lambda_1": lambda t: (t.get("top_eigenvalues") or [None])[0],
    "lambda_c": class_eigenvalue,
    "lambda_k": lambda t: (t.get("top_eigenvalues") or [None])[-1],
    "outliers": lambda t: t.get("outliers") if t.get("top_eigenvalues") else None,
    "grad_fraction_top_k": lambda t: t.get("grad_fraction_top_k"),
}


def outlier_rows(trials: Iterable[dict[str, Any]]) -> list[dict[str, Any]]:
    """The Hessian's top-k per batch from the gap phase's trials that met the criterion and
    recorded it (`top_eigenvalues`): the median over seeds and the seed range [min, max] of
    lambda_1, lambda_C (C = classes), lambda_k, the number of outliers (the gap rule) and the
    gradient's share of the top-k space. Medians and ranges, not means: two or three seeds per
    batch, and a range says what was seen without claiming a coverage."""
    by_batch: dict[int, list[dict[str, Any]]] = defaultdict(list)
    for t in trials:
        if t.get("status") == "ok" and t.get("top_eigenvalues"):
            by_batch[int(t["batch"])].append(t)
    rows = []
    for batch, ts in sorted(by_batch.items()):
        row: dict[str, Any] = {"batch": batch, "n_seeds": len(ts), "k": max(len(t["top_eigenvalues"]) for t in ts),
                               "num_classes": ts[0].get("num_classes"),
                               "saturated": sum(bool(t.get("outliers_saturated")) for t in ts)}
        for key, read in OUTLIER_KEYS.items():
            vals = [float(v) for v in map(read, ts) if v is not None]
            row[key] = statistics.median(vals) if vals else None
            row[f"{key}_range"] = [min(vals), max(vals)] if vals else None
        rows.append(row)
    return rows
