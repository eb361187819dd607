"""The critical batch size and the train/test gap, as pure functions on a sweep's trials.

McCandlish, Kaplan, Amodei 2018 ("An Empirical Model of Large-Batch Training"): the steps S
and examples E = B*S needed to reach a fixed target trade off as

    (S/S_min - 1)(E/E_min - 1) = 1   <=>   S(B) = S_min (1 + B_crit / B),   B_crit = E_min / S_min,

and B_crit is predicted to be close to the gradient noise scale B_noise ~ B_simple measured near
the target. Shallue et al. 2018: the learning rate must be re-tuned at every batch size before
steps are compared, so each batch size contributes its best learning rate.

A trial here is a dict as written to trials.jsonl (see `bigbatch.study.sweep`): batch, lr,
seed, status, steps_to_target, examples_to_target, train/test loss and accuracy, gap,
b_simple_at_target, sharpness.
"""

from __future__ import annotations

import math
import statistics
from collections import defaultdict
from collections.abc import Iterable, Sequence
from typing import Any

import numpy as np


def fit_critical_batch(batch_sizes: Sequence[float], steps_to_target: Sequence[float]) -> dict[str, float]:
    """Fit S(B) = S_min (1 + B_crit / B) by least squares in x = 1/B.

    The model is linear in x: S = a + b x with a = S_min and b = S_min B_crit = E_min. Steps at
    small batches are tens of times those at large ones and their noise is proportional to them
    (seed-to-seed scatter is a fraction of S), so residuals are weighted by 1/S: relative
    least squares. An unweighted fit lets a few percent of noise at B = 8 swamp S_min.

    Returns {s_min, e_min, b_crit, r2, n}; r2 is the weighted coefficient of determination.
    When the data show no saturation (a <= 0: steps still halve with every doubling up to the
    largest batch) or steps do not fall with the batch (b <= 0), the fitted quantities are
    outside the model and b_crit is returned as inf or 0 accordingly, with s_min/e_min as fitted.
    """
    b = np.asarray(batch_sizes, dtype=float)
    s = np.asarray(steps_to_target, dtype=float)
    if b.shape != s.shape or b.ndim != 1:
        raise ValueError(f"batch_sizes and steps_to_target must be 1-D and the same length, got {b.shape} and {s.shape}")
    if len(np.unique(b)) < 2:
        raise ValueError("need at least two distinct batch sizes to fit S(B)")
    if np.any(b <= 0) or np.any(s <= 0) or not np.all(np.isfinite(s)):
        raise ValueError("batch sizes and steps to target must be positive and finite")
    x = 1.0 / b
    w = 1.0 / s  # relative residuals: (S - a - b x) / S
    design = np.stack([np.ones_like(x), x], axis=1)
    coef, *_ = np.linalg.lstsq(design * w[:, None], s * w, rcond=None)
    s_min, e_min = float(coef[0]), float(coef[1])
    fitted = design @ coef
    mean_w = np.sum(w**2 * s) / np.sum(w**2)
    ss_res = float(np.sum((w * (s - fitted)) ** 2))
    ss_tot = float(np.sum((w * (s - mean_w)) ** 2))
    r2 = 1.0 - ss_res / ss_tot if ss_tot > 0 else 1.0
    if s_min <= 0:
        b_crit = math.inf
    elif e_min <= 0:
        b_crit = 0.0
    else:
        b_crit = e_min / s_min
    return {"s_min": s_min, "e_min": e_min, "b_crit": b_crit, "r2": r2, "n": int(len(b))}


def predict_steps(fit: dict[str, float], batch: float) -> float:
    """S(B) from a fit: S_min + E_min / B."""
    return fit["s_min"] + fit["e_min"] / batch


def reached(trials: Iterable[dict[str, Any]]) -> list[dict[str, Any]]:
    """Trials that finished and reached the target."""
    return [t for t in trials if t.get("status") == "ok" and t.get("steps_to_target") is not None]


def best_per_batch(trials: Iterable[dict[str, Any]]) -> dict[int, dict[str, Any]]:
    """Per batch size, the learning rate with the fewest steps to target (median over seeds).

    Returns {batch: {"lr", "steps_to_target", "examples_to_target", "seeds", "trials"}}, the
    trials being that (batch, lr)'s reached trials. Batches where no lr reached the target are
    absent.
    """
    groups: dict[tuple[int, float], list[dict[str, Any]]] = defaultdict(list)
    for t in reached(trials):
        groups[(int(t["batch"]), float(t["lr"]))].append(t)
    best: dict[int, dict[str, Any]] = {}
    for (batch, lr), ts in sorted(groups.items()):
        steps = statistics.median(t["steps_to_target"] for t in ts)
        if batch not in best or steps < best[batch]["steps_to_target"]:
            best[batch] = {
                "lr": lr,
                "steps_to_target": steps,
                "examples_to_target": steps * batch,
                "seeds": sorted(t.get("seed", 0) for t in ts),
                "trials": ts,
            }
    return dict(sorted(best.items()))


def fit_points(best: dict[int, dict[str, Any]], drop_rising: bool = True) -> tuple[list[int], list[float], list[int]]:
    """(batches, steps, excluded batches) to fit from `best_per_batch`.

    S(B) falls monotonically in the model. Past the largest useful batch, measured steps often
    rise again (Shallue et al.'s maximal-data-parallelism regime, or an lr grid that no longer
    reaches the optimum there); with drop_rising those batches, beyond the batch with the fewest
    steps, are left out of the fit and reported as excluded.
    """
    batches = sorted(best)
    steps = [best[b]["steps_to_target"] for b in batches]
    excluded: list[int] = []
    if drop_rising and batches:
        i_min = int(np.argmin(steps))
        excluded = [b for b in batches[i_min + 1 :] if best[b]["steps_to_target"] > steps[i_min]]
    keep = [(b, s) for b, s in zip(batches, steps) if b not in excluded]
    return [b for b, _ in keep], [s for _, s in keep], excluded


def _median_of(values: Iterable[Any]) -> float | None:
    vals = [float(v) for v in values if v is not None and math.isfinite(float(v))]
    return statistics.median(vals) if vals else None


def gap_table(best: dict[int, dict[str, Any]]) -> list[dict[str, Any]]:
    """The train/test gap per batch size, at the best lr (medians over seeds).

    Each trial records the gap at the sweep's fixed epoch budget (`gap_epochs`, the same number
    of epochs for every batch size, Keskar et al. 2016) and at its end (at the target when
    trials stop there). Rows: batch, lr, epochs, train_acc, test_acc, gap (train_acc - test_acc),
    loss_gap (test_loss - train_loss), and the same at the epoch budget (`*_at_budget`).
    """
    rows = []
    for batch, entry in best.items():
        ts = entry["trials"]
        row: dict[str, Any] = {"batch": batch, "lr": entry["lr"]}
        for key in ("epochs", "train_acc", "test_acc", "train_loss", "test_loss", "gap", "loss_gap",
                    "train_acc_at_budget", "test_acc_at_budget", "gap_at_budget", "loss_gap_at_budget",
                    "sharpness"):
            row[key] = _median_of(t.get(key) for t in ts)
        rows.append(row)
    return rows


def gap_trend(rows: Sequence[dict[str, Any]], key: str = "gap") -> float | None:
    """Slope of `key` against log2(batch): the change in gap per doubling of the batch."""
    pts = [(math.log2(r["batch"]), r[key]) for r in rows if r.get(key) is not None]
    if len(pts) < 2 or len({x for x, _ in pts}) < 2:
        return None
    x, y = np.array(pts).T
    return float(np.polyfit(x, y, 1)[0])


def b_simple_at_target(best: dict[int, dict[str, Any]]) -> float | None:
    """B_simple measured at the target, median over the best trials of every batch size.

    The noise scale depends on where the optimizer is in the landscape, not on the batch used
    to get there (McCandlish et al. 2018, section 2.2), so all batches contribute.
    """
    return _median_of(t.get("b_simple_at_target") for e in best.values() for t in e["trials"])


def analyse(trials: Sequence[dict[str, Any]], drop_rising: bool = True) -> dict[str, Any]:
    """Everything critical.json holds: per-batch best lr, the fit, the gap table, B_simple."""
    best = best_per_batch(trials)
    batches, steps, excluded = fit_points(best, drop_rising)
    fit = None
    note = None
    if len(batches) >= 2:
        fit = fit_critical_batch(batches, steps)
        if math.isinf(fit["b_crit"]):
            note = "no saturation: steps keep falling as 1/B up to the largest batch; B_crit is beyond it"
    else:
        note = f"only {len(batches)} batch size(s) reached the target: no fit"
    gaps = gap_table(best)
    b_simple = b_simple_at_target(best)
    counts: dict[str, int] = defaultdict(int)
    for t in trials:
        counts[t.get("status", "unknown")] += 1
    return {
        "fit": {**fit, "b_crit": _finite_or_none(fit["b_crit"])} if fit else None,
        "s_min": fit["s_min"] if fit else None,
        "e_min": fit["e_min"] if fit else None,
        "b_crit": _finite_or_none(fit["b_crit"]) if fit else None,
        "r2": fit["r2"] if fit else None,
        "note": note,
        "fit_batches": batches,
        "excluded_batches": excluded,
        "b_simple_at_target": b_simple,
        "b_simple_online_at_target": _median_of(t.get("b_simple_online_at_target") for e in best.values() for t in e["trials"]),
        "b_crit_over_b_simple": (fit["b_crit"] / b_simple) if fit and b_simple and math.isfinite(fit["b_crit"]) else None,
        "best": [
            {"batch": b, "lr": e["lr"], "steps_to_target": e["steps_to_target"],
             "examples_to_target": e["examples_to_target"], "seeds": e["seeds"],
             "b_simple_at_target": _median_of(t.get("b_simple_at_target") for t in e["trials"])}
            for b, e in best.items()
        ],
        "gap": gaps,
        "gap_trend_per_doubling": gap_trend(gaps, "gap"),
        "gap_at_budget_trend_per_doubling": gap_trend(gaps, "gap_at_budget"),
        "trials": dict(counts),
    }


def _finite_or_none(v: float) -> float | None:
    return v if math.isfinite(v) else None
