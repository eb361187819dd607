"""Over-parametrisation: test and training error against the number of parameters N.

Geiger, Spigler, Sagun et al. (2019, "jamming transition", arXiv:1809.09349 / 1810.09665) and
Belkin et al. (2019, "double descent", PNAS) train networks of growing size to (near) zero training
error: the test error peaks near N*, the smallest N that fits the training set, and falls beyond
it; averaging the outputs of several networks past N* (an ensemble) lowers it further (Geiger et
al. 2019, "Scaling description of generalization with number of parameters", arXiv:1901.01608:
past N* the test error falls as the fluctuations of the output function shrink, and an ensemble
average removes them). This module reads a width sweep's records (`bigbatch.study.axes`: one axis,
e.g. model.hidden, with trial.test_outputs = true) into those curves. Pure functions on records
and the trials' saved test-set softmax outputs (numpy); no torch and no Ray.

N is the trained parameter count, P the number of training examples (Geiger/Spigler et al.'s P:
with a cross-entropy or hinge loss every example is one constraint to satisfy); Belkin et al.'s
threshold for K outputs, N = P x K, is given beside it.
"""

from __future__ import annotations

import statistics
from pathlib import Path
from typing import Any

import numpy as np

FIT_TOLERANCE = 0.005
"""Training error at or below which a width counts as fitting the training set (the median over
its seeds): 5 of 1,000 examples, so a network that leaves a few noisy labels unfitted at the end
of its budget still counts; N* is the smallest N that does."""


def _spread(values: list[float]) -> dict[str, float | None]:
    if not values:
        return {"median": None, "min": None, "max": None}
    return {"median": statistics.median(values), "min": min(values), "max": max(values)}


def _outputs(trial: dict[str, Any]) -> tuple[np.ndarray, np.ndarray] | None:
    path = trial.get("test_outputs")
    if not path or not Path(path).is_file():
        return None
    with np.load(path) as z:
        return z["probs"], z["labels"]


def ensemble_error(outputs: list[tuple[np.ndarray, np.ndarray]]) -> float:
    """Test error of the ensemble that averages the networks' softmax outputs (Geiger et al. 2019)."""
    labels = outputs[0][1]
    mean = np.mean([p for p, _ in outputs], axis=0)
    return float(np.mean(mean.argmax(axis=1) != labels))


def rows(trials: list[dict[str, Any]], key: str) -> list[dict[str, Any]]:
    """One row per value of the axis `key`, by N: errors over seeds (median, min, max) and the
    ensemble of all its seeds' networks. Single-network test errors come from the saved outputs
    when there are any (the same numbers the ensemble averages), else from the records."""
    groups: dict[Any, list[dict[str, Any]]] = {}
    for t in trials:
        if t.get("status") not in ("failed", "diverged") and t.get("n_params") is not None:
            groups.setdefault((t.get("axes") or {}).get(key), []).append(t)
    out = []
    for value, ts in groups.items():
        outputs = [o for o in (_outputs(t) for t in ts) if o is not None]
        if len(outputs) == len(ts):
            test = [float(np.mean(p.argmax(axis=1) != y)) for p, y in outputs]
        else:
            test = [1 - t["test_acc"] for t in ts if t.get("test_acc") is not None]
        n_params, n_train = ts[0]["n_params"], ts[0]["n_train"]
        out.append({
            "value": value, "n_params": n_params, "n_train": n_train, "num_classes": ts[0].get("num_classes"),
            "n_over_p": n_params / n_train, "seeds": sorted(t["seed"] for t in ts),
            "test_error": _spread(test),
            "train_error": _spread([1 - t["train_acc"] for t in ts if t.get("train_acc") is not None]),
            "train_loss": _spread([t["train_loss"] for t in ts if t.get("train_loss") is not None]),
            "steps_to_fit": _spread([t["steps_to_target"] for t in ts if t.get("steps_to_target") is not None]),
            "n_fitted": sum(1 for t in ts if t.get("steps_to_target") is not None),
            "ensemble_k": len(outputs) if len(outputs) >= 2 else 0,
            "ensemble_test_error": ensemble_error(outputs) if len(outputs) >= 2 else None,
        })
    return sorted(out, key=lambda r: r["n_params"])


def peak_near_n_star(table: list[dict[str, Any]], n_star: int | None) -> dict[str, Any] | None:
    """Is there a test-error peak near N*? The highest median test error among widths with N in
    [N*/2, 2 N*] against the lowest among the narrower widths (N < N*/2, the bottom of the first
    descent): `rise` in error, and whether it exceeds the seed range (max - min) of both widths,
    i.e. whether the peak is resolved by the seeds. None without N* or without both groups."""
    if not n_star:
        return None
    near = [r for r in table if n_star / 2 <= r["n_params"] <= 2 * n_star and r["test_error"]["median"] is not None]
    below = [r for r in table if r["n_params"] < n_star / 2 and r["test_error"]["median"] is not None]
    if not near or not below:
        return None
    top = max(near, key=lambda r: r["test_error"]["median"])
    bottom = min(below, key=lambda r: r["test_error"]["median"])
    rise = top["test_error"]["median"] - bottom["test_error"]["median"]
    spread = max(r["test_error"]["max"] - r["test_error"]["min"] for r in (top, bottom))
    return {"value": top["value"], "n_params": top["n_params"], "test_error": top["test_error"]["median"],
            "below_value": bottom["value"], "below_test_error": bottom["test_error"]["median"],
            "rise": rise, "seed_range": spread, "resolved": rise > spread}


def analyse(trials: list[dict[str, Any]], key: str, tolerance: float = FIT_TOLERANCE) -> dict[str, Any] | None:
    """The width section's numbers: rows by N, N* (the smallest N whose median training error is
    <= `tolerance`), the test-error peak and where it lies against N*, and the ensemble's gain past
    N*. None when the trials carry no parameter counts (a sweep without trial.test_outputs)."""
    table = rows(trials, key)
    if not table:
        return None
    fitted = [r for r in table if r["train_error"]["median"] is not None and r["train_error"]["median"] <= tolerance]
    n_star = fitted[0]["n_params"] if fitted else None
    peak = max((r for r in table if r["test_error"]["median"] is not None), key=lambda r: r["test_error"]["median"])
    past = [r for r in table if n_star is not None and r["n_params"] >= n_star and r["ensemble_test_error"] is not None]
    gains = [r["test_error"]["median"] - r["ensemble_test_error"] for r in past]
    n_train, classes = table[0]["n_train"], table[0]["num_classes"]
    return {
        "axis": key, "rows": table, "fit_tolerance": tolerance,
        "p": n_train, "p_times_classes": n_train * classes if classes else None,
        "n_star": n_star, "n_star_over_p": n_star / n_train if n_star else None,
        "n_star_value": fitted[0]["value"] if fitted else None,
        "peak": {"value": peak["value"], "n_params": peak["n_params"], "n_over_p": peak["n_over_p"],
                 "test_error": peak["test_error"]["median"]},
        "peak_over_n_star": peak["n_params"] / n_star if n_star else None,
        "peak_near_n_star": peak_near_n_star(table, n_star),
        "after_peak_largest": {"value": table[-1]["value"], "n_params": table[-1]["n_params"],
                               "test_error": table[-1]["test_error"]["median"]},
        "ensemble_k": max((r["ensemble_k"] for r in table), default=0),
        "ensemble_gain_past_n_star": {"mean": statistics.mean(gains), "max": max(gains),
                                      "widths": [r["value"] for r in past]} if gains else None,
    }


def headline(w: dict[str, Any]) -> list[str]:
    """The width sweep's answer, one claim a line, with its numbers."""
    lines = []
    spread = ", ".join(f"{r['value']}: {100 * r['test_error']['median']:.1f} "
                       f"[{100 * r['test_error']['min']:.1f}-{100 * r['test_error']['max']:.1f}]"
                       for r in w["rows"] if r["test_error"]["median"] is not None)
    lines.append(f"test error % by {w['axis']} (median [min-max] over seeds): {spread}")
    if w["n_star"] is None:
        lines.append(f"N*: no width fits the training set (median training error <= {100 * w['fit_tolerance']:g} %) "
                     f"within the budget: widen the sweep or the budget")
    else:
        lines.append(f"N* = {w['n_star']:,} parameters ({w['axis']} = {w['n_star_value']}), N*/P = {w['n_star_over_p']:.2f} "
                     f"(P = {w['p']:,} training examples; P x K = {w['p_times_classes']:,}): the smallest N whose median "
                     f"training error is <= {100 * w['fit_tolerance']:g} %")
    p = w["peak"]
    where = (f"{p['n_params'] / w['n_star']:.2f} x N*" if w["n_star"] else "no N*")
    lines.append(f"highest test error at {w['axis']} = {p['value']} (N = {p['n_params']:,}, N/P = {p['n_over_p']:.2f}, "
                 f"{where}): {100 * p['test_error']:.1f} %; at the largest width {w['after_peak_largest']['value']}: "
                 f"{100 * w['after_peak_largest']['test_error']:.1f} %")
    near = w.get("peak_near_n_star")
    if near:
        lines.append(f"peak near N*: the highest error within [N*/2, 2 N*] ({w['axis']} = {near['value']}, "
                     f"{100 * near['test_error']:.1f} %) is {100 * near['rise']:+.1f} points from the lowest below N*/2 "
                     f"({w['axis']} = {near['below_value']}, {100 * near['below_test_error']:.1f} %); seed range "
                     f"{100 * near['seed_range']:.1f} points: " + ("a peak resolved by the seeds" if near["resolved"]
                                                                 else "no peak resolved by the seeds"))
    g = w["ensemble_gain_past_n_star"]
    if g:
        lines.append(f"ensemble of k = {w['ensemble_k']} networks (softmax averaged, one per seed) past N*: test error "
                     f"{100 * g['mean']:.1f} points below the single networks' median on average (at most {100 * g['max']:.1f})")
    return lines
