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

from bigbatch.study import intervals
from bigbatch.study.gap import gap_rows, gap_trends, outlier_rows


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


# Outcomes of a seed (everything but a crash): the denominator of the majority rule.
OUTCOMES = ("ok", "not_reached", "diverged", "slower")


def _lr_key(t: dict[str, Any]) -> float | None:
    """A trial's lr within its batch: the multiplier (known even when the run left no summary, as
    for a diverged or raced trial), else the lr itself. At one batch both order the lrs alike."""
    v = t.get("lr_multiplier") if t.get("lr_multiplier") is not None else t.get("lr")
    return None if v is None else float(v)


def censored_median(reached_steps: Sequence[float], n: int) -> float | None:
    """The median steps over `n` seeds of which those in `reached_steps` reached the target and
    the other n - len(reached_steps) did not (diverged, not reached, raced): each of those is
    +inf steps, the least it is known to be. None when the median is infinite (no majority reached).
    """
    m = statistics.median(sorted(float(v) for v in reached_steps) + [math.inf] * (n - len(reached_steps))) if n else math.inf
    return m if math.isfinite(m) else None


def unsuperseded(trials: Iterable[dict[str, Any]]) -> list[dict[str, Any]]:
    """The trials without a raced (`slower`) one that a later run of the same batch, lr and seed
    to its end replaced (`adaptive.unsettled_races`: a race that could have changed the answer is
    rerun unraced, and the rerun's outcome is the seed's)."""
    trials = list(trials)
    full = {(t.get("batch"), _lr_key(t), t.get("seed", 0)) for t in trials
            if t.get("status") in OUTCOMES and t.get("status") != "slower"}
    return [t for t in trials if not (t.get("status") == "slower" and (t.get("batch"), _lr_key(t), t.get("seed", 0)) in full)]


def lr_groups(trials: Iterable[dict[str, Any]]) -> dict[int, dict[float, dict[str, Any]]]:
    """Per batch and lr: the seeds that ran (any outcome but a crash), those that reached, the median.

    {batch: {lr multiplier: {"n", "reached" (trials), "all" (trials), "steps_to_target" (censored median, or None),
    "counts" (majority), "lr"}}}. A seed stopped by racing (`slower`), diverged or that did not
    reach the target counts in n, not in reached, and is +inf steps in the median (`censored_median`):
    80, 90 and a diverged seed give 90, not the 85 of the two that reached. The median is finite
    exactly when a majority reached (`counts`); otherwise steps_to_target is None.
    """
    groups: dict[int, dict[float, dict[str, Any]]] = defaultdict(dict)
    for t in unsuperseded(trials):
        key = _lr_key(t)
        if t.get("status") not in OUTCOMES or key is None:
            continue
        g = groups[int(t["batch"])].setdefault(key, {"n": 0, "reached": [], "all": [], "lr": None})
        g["n"] += 1
        g["all"].append(t)
        g["lr"] = g["lr"] if g["lr"] is not None else t.get("lr")
        if t.get("status") == "ok" and t.get("steps_to_target") is not None:
            g["reached"].append(t)
    for by_lr in groups.values():
        for g in by_lr.values():
            g["counts"] = len(g["reached"]) > g["n"] / 2
            g["steps_to_target"] = censored_median([t["steps_to_target"] for t in g["reached"]], g["n"])
    return {b: dict(sorted(v.items())) for b, v in sorted(groups.items())}


def best_per_batch(trials: Iterable[dict[str, Any]]) -> dict[int, dict[str, Any]]:
    """Per batch size, the learning rate with the fewest steps to target, by the majority rule.

    An lr counts for a batch only if it reached the target on more than half of the seeds it ran
    (a crashed trial is no seed; a seed stopped as `slower` by racing, diverged or not reached is
    one that did not reach); its steps are the censored median over all its seeds, a seed that did
    not reach being +inf (`censored_median`). So one lucky seed out of three cannot make an lr the
    best, and failures count against the lr instead of leaving only its fast seeds.

    Returns {batch: {"lr", "lr_multiplier", "steps_to_target", "examples_to_target", "seeds",
    "n_seeds", "n_reached", "trials", "edge"}}, the trials being that (batch, lr)'s reached
    trials; `edge` is "low"/"high" when the best lr is the smallest/largest lr that batch ran
    (whatever its outcome there), so the optimum may lie outside the grid, else None. Batches
    where no lr counts are absent.
    """
    best: dict[int, dict[str, Any]] = {}
    for batch, by_lr in lr_groups(trials).items():
        counted = [(g["steps_to_target"], key) for key, g in by_lr.items() if g["counts"]]
        if not counted:
            continue
        steps, key = min(counted)
        g = by_lr[key]
        keys = sorted(by_lr)
        best[batch] = {
            "lr": g["reached"][0].get("lr", key),
            "lr_multiplier": g["reached"][0].get("lr_multiplier"),
            "steps_to_target": steps,
            "examples_to_target": steps * batch,
            "seeds": sorted(t.get("seed", 0) for t in g["reached"]),
            "n_seeds": g["n"],
            "n_reached": len(g["reached"]),
            "trials": g["reached"],
            "edge": "low" if len(keys) > 1 and key == keys[0] else "high" if len(keys) > 1 and key == keys[-1] else None,
        }
    return best


def crossing(evals: Sequence[tuple[float, float]], target: float, higher_is_better: bool = True) -> dict[str, float] | None:
    """Steps at which an evaluated metric first reaches `target`, interpolated between evaluations.

    `evals` are (step, value) in step order. With the first evaluation at or past the target at
    index k > 0, the crossing is the linear interpolation between evaluations k-1 (short of the
    target) and k, so steps-to-target is not a multiple of the evaluation interval. `resolution`
    is the bracket width relative to the crossing ((s_k - s_{k-1}) / crossing): the crossing is
    known to that fraction. Returns {"steps", "resolution", "steps_at_eval"} or None when no
    evaluation reached the target; when the first evaluation already did, steps = its step and
    resolution = 1 (the crossing lies anywhere in (0, s_0]).
    """
    sign = 1.0 if higher_is_better else -1.0
    prev = None
    for step, value in evals:
        if value is not None and math.isfinite(value) and sign * (value - target) >= 0:
            if prev is None:
                return {"steps": float(step), "resolution": 1.0, "steps_at_eval": float(step)}
            s0, v0 = prev
            frac = (target - v0) / (value - v0)  # in (0, 1]: v0 is short of the target, value is not
            steps = s0 + frac * (step - s0)
            return {"steps": float(steps), "resolution": float((step - s0) / steps), "steps_at_eval": float(step)}
        if value is not None and math.isfinite(value):
            prev = (step, value)
    return None


def fit_points(best: dict[int, dict[str, Any]], drop_rising: bool = True) -> tuple[list[int], list[float], list[int]]:
    """(batches, steps, excluded batches) to fit from `best_per_batch`.

    S(B) falls monotonically in the model. Past the largest useful batch, measured steps may
    rise again (Shallue et al.'s maximal-data-parallelism regime, or an lr grid that no longer
    reaches the optimum there); with drop_rising a batch past the one with the fewest steps is
    left out of the fit, and reported as excluded, only when its rise exceeds the seed spread:
    S_j - S_min > max(range_j, range_min), the seed ranges at the two batches' best lrs
    (`intervals.rising`, the test every bootstrap resample repeats). A rise within the seeds'
    scatter keeps the batch; with one seed (no spread known) every batch stays.
    """
    batches = sorted(best)
    steps = [best[b]["steps_to_target"] for b in batches]
    excluded: list[int] = []
    if drop_rising and batches:
        spread = [_seed_range(best[b]) for b in batches]
        mask = intervals.rising(np.asarray([steps], float), np.asarray([spread], float))[0]
        excluded = [b for b, m in zip(batches, mask) if m]
    keep = [(b, s) for b, s in zip(batches, steps) if b not in excluded]
    return [b for b, _ in keep], [s for _, s in keep], excluded


def _seed_range(entry: dict[str, Any]) -> float:
    """Max - min steps over the seeds that reached at a batch's best lr (NaN with fewer than two)."""
    v = [t["steps_to_target"] for t in entry["trials"]]
    return float(max(v) - min(v)) if len(v) >= 2 else math.nan


def seed_cube(trials: Iterable[dict[str, Any]]) -> tuple[list[int], list[Any], np.ndarray]:
    """(batches, seed ids, values[batch, lr, seed id]) for `intervals.joint_bootstrap`.

    values: steps to target of the seed at that batch and lr (lrs in ascending order per batch,
    padded), +inf where it ran and did not reach (diverged, not reached, raced), NaN where it did
    not run; crashed trials are no seed (as in `lr_groups`).
    """
    groups = lr_groups(trials)
    batches = sorted(groups)
    ids = sorted({t.get("seed", 0) for by_lr in groups.values() for g in by_lr.values() for t in g["all"]})
    col = {s: i for i, s in enumerate(ids)}
    values = np.full((len(batches), max((len(v) for v in groups.values()), default=0), len(ids)), np.nan)
    for i, b in enumerate(batches):
        for j, g in enumerate(groups[b].values()):
            for t in g["all"]:
                ok = t.get("status") == "ok" and t.get("steps_to_target") is not None
                values[i, j, col[t.get("seed", 0)]] = float(t["steps_to_target"]) if ok else math.inf
    return batches, ids, values


def _median_of(values: Iterable[Any]) -> float | None:
    vals = [float(v) for v in values if v is not None and math.isfinite(float(v))]
    return statistics.median(vals) if vals else None


# --- regimes (Shallue et al. 2018) -----------------------------------------------------------

REGIME_FACTOR = 4.0


def regime(batch: float, b_crit: float | None) -> str | None:
    """Shallue et al.'s regime of a batch under the fitted S(B) = S_min (1 + B_crit / B).

    perfect scaling: B <= B_crit / 4 (examples within 25 % of E_min: steps nearly halve per
    doubling); maximal data parallelism: B >= 4 B_crit (steps within 25 % of S_min); diminishing
    returns in between.
    """
    if not b_crit:
        return None
    if batch <= b_crit / REGIME_FACTOR:
        return "perfect scaling"
    if batch >= b_crit * REGIME_FACTOR:
        return "maximal data parallelism"
    return "diminishing returns"


def noise_at_target(best: dict[int, dict[str, Any]], name: str) -> dict[str, Any]:
    """`name` ("b_simple" or "b_noise") at the target: the median over the best trials of every
    batch size, with an interval and the failed estimates counted.

    The noise scale depends on where the optimizer is in the landscape, not on the batch used to
    get there (McCandlish et al. 2018, section 2.2), so all batches contribute; B_noise =
    tr(H Sigma)/(G^T H G) is the quantity they predict B_crit from. A failed estimate is a lower
    bound (`*_lower_bound_at_target`) and enters the median as its bound, so the median is then a
    lower bound too (`lower_bound`). The interval is [median of the per-batch lower ends, median of
    the upper ends]: the median is monotone in each value, so it holds whenever every per-batch 95 %
    interval holds (conservative, not a joint 95 %); an unmeasured end is 0 / unbounded (None).
    """
    vals, los, his, bounds = [], [], [], 0
    for e in best.values():
        for t in e["trials"]:
            value, bound = t.get(f"{name}_at_target"), t.get(f"{name}_lower_bound_at_target")
            lo, hi = t.get(f"{name}_interval_at_target") or (None, None)
            if value is not None and math.isfinite(float(value)):
                vals.append(float(value))
            elif bound is not None:
                vals.append(float(bound))
                lo, hi, bounds = bound, None, bounds + 1
            else:
                continue
            los.append(float(lo) if lo is not None else 0.0)
            his.append(float(hi) if hi is not None else math.inf)
    if not vals:
        return {"value": None, "interval": None, "lower_bounds": 0, "n": 0}
    hi = statistics.median(his)
    return {"value": statistics.median(vals), "interval": [statistics.median(los), hi if math.isfinite(hi) else None],
            "lower_bounds": bounds, "lower_bound": bounds > 0, "n": len(vals)}


def ratio_interval(b_crit_ci: list | None, noise_ci: list | None) -> list[float | None] | None:
    """B_crit / noise scale: [B_crit lower / noise upper, B_crit upper / noise lower] (None: unbounded)."""
    if not b_crit_ci or not noise_ci:
        return None
    lo = b_crit_ci[0] / noise_ci[1] if b_crit_ci[0] is not None and noise_ci[1] else 0.0
    hi = b_crit_ci[1] / noise_ci[0] if b_crit_ci[1] is not None and noise_ci[0] else None
    return [lo, hi]


def phase_of(trial: dict[str, Any]) -> str:
    """"critical" (steps to the test target) or "gap" (trained to the training criterion)."""
    return trial.get("phase") or "critical"


def analyse(trials: Sequence[dict[str, Any]], drop_rising: bool = True, reps: int = 2000) -> dict[str, Any]:
    """Everything critical.json holds, from trials.jsonl's records alone.

    The rule: per batch the best lr by majority (`best_per_batch`), its censored median steps;
    batches past the fastest whose rise exceeds the seed spread left out (`fit_points`); the
    relative least-squares fit of S(B); the intervals from a seeded bootstrap over seed ids with
    that whole rule redone in every resample (`intervals.joint_bootstrap`), or none (ci_unavailable
    "n/a (k seeds)") when a fitted batch's best lr ran fewer than 3 seeds; the gap table and
    trends from the gap phase. Refitting a sweep's trials.jsonl gives its critical.json.
    """
    critical_trials = [t for t in trials if phase_of(t) == "critical"]
    gap_trials = [t for t in trials if phase_of(t) == "gap"]
    best = best_per_batch(critical_trials)
    batches, steps, excluded = fit_points(best, drop_rising)
    fit = None
    note = None
    n_seeds = min((best[b]["n_seeds"] for b in batches), default=0)
    ci: dict[str, Any] = {"b_crit_ci": None, "s_min_ci": None, "e_min_ci": None, "fit_band": None,
                          "ci_unavailable": None}
    if len(batches) >= 2:
        fit = fit_critical_batch(batches, steps)
        if n_seeds >= intervals.MIN_SEEDS_FOR_INTERVAL:
            cube_batches, _, values = seed_cube(critical_trials)
            ci.update(intervals.joint_bootstrap(values, cube_batches, reps=reps, drop_rising=drop_rising,
                                                band_batches=np.geomspace(min(best), max(best), 40)))
        else:  # a percentile bootstrap over 1-2 seeds does not cover 95 %: no interval rather than a false one
            ci["ci_unavailable"] = f"n/a ({n_seeds} seed{'s' if n_seeds != 1 else ''})"
        if math.isinf(fit["b_crit"]):
            note = "no saturation: steps keep falling as 1/B up to the largest batch; B_crit is beyond it"
    else:
        note = f"only {len(batches)} batch size(s) reached the target: no fit"
    b_crit = _finite_or_none(fit["b_crit"]) if fit else None
    swept = [min(best), max(best)] if best else None
    outside = None
    if fit is not None and (b_crit is None or b_crit > swept[1]):
        outside = f"B_crit lies above the swept range {swept[0]}-{swept[1]}: an extrapolation of the fit"
    elif fit is not None and b_crit < swept[0]:
        outside = f"B_crit lies below the swept range {swept[0]}-{swept[1]}: an extrapolation of the fit"
    elif fit is not None and ci.get("b_crit_ci") and (ci["b_crit_ci"][1] is None or ci["b_crit_ci"][1] > swept[1]):
        outside = f"the interval of B_crit reaches above the swept range {swept[0]}-{swept[1]}"
    noise = {name: noise_at_target(best, name) for name in ("b_simple", "b_noise")}
    b_simple, b_noise = noise["b_simple"]["value"], noise["b_noise"]["value"]
    counts: dict[str, int] = defaultdict(int)
    for t in trials:
        counts[t.get("status", "unknown")] += 1
    tokens = in_tokens(critical_trials, b_crit, fit, ci, noise)
    resolutions = [t["crossing_resolution"] for e in best.values() for t in e["trials"] if t.get("crossing_resolution") is not None]
    return {
        "fit": {**fit, "b_crit": b_crit} if fit else None,
        "s_min": fit["s_min"] if fit else None,
        "e_min": fit["e_min"] if fit else None,
        "b_crit": b_crit,
        "r2": fit["r2"] if fit else None,
        **ci,
        "n_seeds": n_seeds,
        "swept_batches": swept,
        "outside_swept_range": outside,
        "note": note,
        "rule": "best lr per batch: reached the target on more than half of its seeds, fewest median steps "
                "over those seeds; steps = interpolated crossing of the target",
        "fit_batches": batches,
        "excluded_batches": excluded,
        "edge_batches": {str(b): e["edge"] for b, e in best.items() if e["edge"]},
        "crossing_resolution_max": max(resolutions) if resolutions else None,
        "regimes": {"rule": f"perfect scaling B <= B_crit/{REGIME_FACTOR:g}, maximal data parallelism B >= "
                            f"{REGIME_FACTOR:g} B_crit, diminishing returns between",
                    "perfect_scaling_below": b_crit / REGIME_FACTOR if b_crit else None,
                    "max_parallelism_above": b_crit * REGIME_FACTOR if b_crit else None},
        "b_simple_at_target": b_simple,
        "b_simple_online_at_target": _median_of(t.get("b_simple_online_at_target") for e in best.values() for t in e["trials"]),
        "b_crit_over_b_simple": (b_crit / b_simple) if b_crit and b_simple else None,
        "b_noise_at_target": b_noise,
        "b_crit_over_b_noise": (b_crit / b_noise) if b_crit and b_noise else None,
        **{f"{name}_at_target_{part}": noise[name][key] for name in noise
           for part, key in (("interval", "interval"), ("lower_bounds", "lower_bounds"))},
        "noise_micro_batches": sorted({t["micro_batch"] for e in best.values() for t in e["trials"]
                                       if t.get("micro_batch") is not None}),
        **{f"b_crit_over_{name}_interval": ratio_interval(ci.get("b_crit_ci"), noise[name]["interval"]) for name in noise},
        "best": [
            {"batch": b, "lr": e["lr"], "lr_multiplier": e["lr_multiplier"], "steps_to_target": e["steps_to_target"],
             "examples_to_target": e["examples_to_target"], "seeds": e["seeds"], "n_seeds": e["n_seeds"],
             "seed_steps": sorted(t["steps_to_target"] for t in e["trials"]), "edge": e["edge"],
             "regime": regime(b, b_crit),
             "b_simple_at_target": _median_of(t.get("b_simple_at_target") for t in e["trials"]),
             "b_noise_at_target": _median_of(t.get("b_noise_at_target") for t in e["trials"])}
            for b, e in best.items()
        ],
        **tokens,
        "gap": gap_rows(gap_trials),
        "gap_criterion": next((t["criterion"] for t in gap_trials if t.get("criterion")), None),
        "gap_trend": gap_trends(gap_trials),
        "gap_outliers": outlier_rows(gap_trials),
        "trials": dict(counts),
    }


def in_tokens(trials: Sequence[dict[str, Any]], b_crit: float | None, fit: dict[str, Any] | None,
              ci: dict[str, Any], noise: dict[str, Any]) -> dict[str, Any]:
    """For a sequence task (every trial's examples are windows of T tokens): the batch-size answers
    again in tokens, x T ({} for one label per example). B_crit = E_min / S_min is a ratio of
    examples to steps, so it scales by T like a batch; S_min does not."""
    ts = {t.get("tokens_per_example") for t in trials} - {None}
    if len(ts) != 1:  # classification (none), or a mix that has no single T
        return {}
    (T,) = ts

    def scaled(v: Any) -> Any:
        if isinstance(v, list):
            return [scaled(x) for x in v]
        return None if v is None else v * T

    return {"tokens_per_example": T, "in_tokens": {
        "b_crit": scaled(b_crit), "b_crit_ci": scaled(ci.get("b_crit_ci")),
        "e_min": scaled(fit["e_min"]) if fit else None, "e_min_ci": scaled(ci.get("e_min_ci")),
        **{f"{name}_at_target": scaled(noise[name]["value"]) for name in noise},
        **{f"{name}_at_target_interval": scaled(noise[name]["interval"]) for name in noise},
    }}


def added_batches(trials: Iterable[dict[str, Any]], configured: Sequence[int]) -> list[int]:
    """Batch sizes the study ran beyond the configured ones (`adaptive.batch_extension`)."""
    return sorted({int(t["batch"]) for t in trials if phase_of(t) == "critical"} - {int(b) for b in configured})


def _finite_or_none(v: float) -> float | None:
    return v if math.isfinite(v) else None
