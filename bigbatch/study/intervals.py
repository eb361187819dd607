"""Intervals for the critical-batch fit: a bootstrap over seed ids with the whole rule inside.

`train.seed` fixes a trial's initialisation and data order at every batch size, so seed s of
batch 64 and seed s of batch 512 share their luck; the unit that was sampled is the seed id,
not the (batch, seed) pair. One resample draws the sweep's seed ids with replacement (each id
as often as the draw says, at every batch and lr where it ran) and then redoes everything the
point estimate did on those seeds:

1. per (batch, lr) the censored median (a seed that did not reach is +inf) and the majority rule;
2. per batch the best lr among those that count (no winner's curse: a resample may pick
   another lr, or find none);
3. the `drop_rising` exclusions (`rising`), on the resampled medians and seed ranges;
4. the relative least-squares fit of S(B) = S_min + E_min / B (`wls_rows`).

Smoothed (`joint_bootstrap`'s `smooth`): each drawn value is jittered by the seeds' own scatter
over sqrt(n), which fills in the gaps a bootstrap over 3 seed ids leaves.

The percentile interval of B_crit, S_min and E_min over the resamples is the reported interval.
Pure numpy, vectorised over resamples: 2,000 resamples of an 8-batch, 4-lr, 3-seed sweep take
a few ms.

The trials enter as a cube `values[batch, lr, seed id]`: steps to target, +inf for a seed that
ran and did not reach, NaN where that seed did not run (`bigbatch.study.critical.seed_cube`).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import numpy as np

# A percentile bootstrap over 1 or 2 seeds has 1-4 distinct resamples per batch: its "95 %"
# interval collapses (1 seed: to the point) and covers far less (about 79 % with 2 seeds).
MIN_SEEDS_FOR_INTERVAL = 3


def wls_rows(x: np.ndarray, s: np.ndarray, mask: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """`fit_critical_batch`'s relative least squares (weights 1/S) for many S rows at once.

    x: (n,) = 1/B; s: (R, n); mask: (R, n), the points each row fits (default all). Returns
    (S_min, E_min), each (R,): the 2x2 normal equations of S = a + b x with weights 1/S^2,
    solved in closed form (the same numbers as the lstsq fit). A row with fewer than two points
    gives NaN.
    """
    mask = np.ones(s.shape, bool) if mask is None else mask
    safe = np.where(mask & np.isfinite(s) & (s > 0), s, 1.0)
    w = np.where(mask, 1.0 / safe**2, 0.0)
    sw, sx, sxx = w.sum(1), (w * x).sum(1), (w * x * x).sum(1)
    sy, sxy = (w * safe).sum(1), (w * x * safe).sum(1)
    det = sw * sxx - sx * sx
    with np.errstate(divide="ignore", invalid="ignore"):
        ok = mask.sum(1) >= 2
        return (np.where(ok, (sxx * sy - sx * sxy) / det, np.nan),
                np.where(ok, (sw * sxy - sx * sy) / det, np.nan))


def rising(steps: np.ndarray, spread: np.ndarray) -> np.ndarray:
    """`drop_rising`'s test, per row: which batches past the fastest rise by more than the noise.

    steps: (R, n) median steps per batch in batch order (+inf: no lr counts there, absent);
    spread: (R, n) the seed range (max - min over the seeds that reached) at each batch's best
    lr, NaN when fewer than two seeds reached. A batch j after the fastest batch i is
    excluded when S_j - S_i > max(range_j, range_i): the rise exceeds the larger of the two
    batches' seed ranges, so seed-to-seed scatter alone does not produce it. With an unknown
    spread (one seed) the rise is not shown to exceed the noise and the batch stays.
    """
    present = np.isfinite(steps)
    i_min = np.argmin(np.where(present, steps, np.inf), axis=1)
    s_min = np.take_along_axis(steps, i_min[:, None], 1)
    r_min = np.take_along_axis(spread, i_min[:, None], 1)
    after = np.arange(steps.shape[1])[None, :] > i_min[:, None]
    with np.errstate(invalid="ignore"):
        return after & present & (steps - s_min > np.fmax(spread, r_min)) & ~np.isnan(np.fmax(spread, r_min))


def _group_rows(x: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """One (batch, lr) over the resamples: censored median (inf: no majority), seed range, seeds run.

    x: (R, n) the steps of each resample's drawn seeds (inf: did not reach, NaN: that seed did
    not run here). The median is statistics.median of the drawn seeds that ran, +inf included.
    """
    srt = np.sort(x, axis=1)  # finite, then inf, then NaN
    total = (~np.isnan(x)).sum(1)
    reached = np.isfinite(x).sum(1)
    counts_ok = (total > 0) & (2 * reached > total)
    lo = np.take_along_axis(srt, np.maximum((total - 1) // 2, 0)[:, None], 1)[:, 0]
    hi = np.take_along_axis(srt, np.minimum(total // 2, x.shape[1] - 1)[:, None], 1)[:, 0]
    with np.errstate(invalid="ignore"):
        med = np.where(counts_ok, (lo + hi) / 2, np.inf)
    fin = np.isfinite(x)
    top, bottom = np.where(fin, x, -np.inf).max(1), np.where(fin, x, np.inf).min(1)
    distinct = reached >= 2
    spread = np.where(distinct, np.where(distinct, top, 0.0) - np.where(distinct, bottom, 0.0), np.nan)
    return med, spread, total


def select_rows(values: np.ndarray, draws: np.ndarray, jitter: float = 0.0,
                rng: np.random.Generator | None = None) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """The best lr per batch in every resample: (steps, spread, lr index, seeds), each (R, n_batches).

    draws: (R, n) the seed-id indices each resample drew (the same ids at every batch and lr).
    With `jitter`, each drawn finite value is multiplied by exp(jitter z), z standard normal (the
    smoothed bootstrap). steps is the best lr's censored median (+inf where no lr counts at that
    batch in that resample), spread its seed range, seeds the number of seeds it ran. Ties go to
    the lower lr index, as `best_per_batch` does.
    """
    n_b, n_l, _ = values.shape
    reps = len(draws)
    steps = np.full((reps, n_b), np.inf)
    spread = np.full((reps, n_b), np.nan)
    best = np.full((reps, n_b), -1)
    seeds = np.zeros((reps, n_b), int)
    for b in range(n_b):
        for lr in range(n_l):
            if np.isnan(values[b, lr]).all():
                continue
            x = values[b, lr][draws]
            if jitter:
                x = x * np.exp(jitter * rng.standard_normal(x.shape))
            med, rng_, total = _group_rows(x)
            better = med < steps[:, b]
            steps[:, b] = np.where(better, med, steps[:, b])
            spread[:, b] = np.where(better, rng_, spread[:, b])
            best[:, b] = np.where(better, lr, best[:, b])
            seeds[:, b] = np.where(better, total, seeds[:, b])
    return steps, spread, best, seeds


def seed_sd(values: np.ndarray) -> float:
    """The pooled seed-to-seed sd of log steps: over every (batch, lr) where >= 2 seeds reached."""
    logs = np.log(np.where(np.isfinite(values), values, np.nan))
    n = np.sum(~np.isnan(logs), axis=2)
    ok = n >= 2
    if not ok.any():
        return 0.0
    with np.errstate(invalid="ignore"):
        dev = logs - np.nanmean(np.where(ok[..., None], logs, 0.0), axis=2, keepdims=True)
    ss = np.nansum(np.where(ok[..., None], dev**2, 0.0))
    return float(np.sqrt(ss / np.sum(n[ok] - 1)))


def _interval(values: np.ndarray, level: float) -> list[float | None]:
    """Percentile interval [lo, hi]; an infinite end (no saturation in some resamples) is None."""
    lo, hi = np.quantile(values, [(1 - level) / 2, (1 + level) / 2], method="inverted_cdf")
    return [float(v) if math.isfinite(v) else None for v in (lo, hi)]


def joint_bootstrap(values: np.ndarray, batches: Sequence[float], reps: int = 2000, level: float = 0.95,
                    seed: int = 0, drop_rising: bool = True, band_batches: Sequence[float] = (),
                    smooth: bool = True) -> dict[str, Any]:
    """Percentile intervals for B_crit, S_min and E_min, resampling seed ids jointly across batches
    and redoing the lr selection, the majority rule and the exclusions in every resample.

    values: (n_batches, n_lrs, n_seed_ids), see the module docstring; batches: (n_batches,).
    With `smooth`, every drawn finite value is multiplied by exp(h z), z standard normal, h =
    s / sqrt(n): s the pooled seed-to-seed sd of log steps (`seed_sd`), n the seed ids. Three seed
    ids have only 10 distinct resamples, and the median of three takes only the observed values:
    the plain percentile interval is too narrow (simulated coverage 74-77 % with 3 seeds, 8
    batches, 3 lrs, 5-10 % seed noise), the smoothed one covers 95-97 % (and 97-99 % with 5 seeds;
    tests/study/test_intervals.py). A resample without saturation (S_min <= 0) has B_crit = inf, so the upper end may be None
    (unbounded); one left with fewer than two batches to fit is dropped and counted
    (`resamples_without_fit`). Seeded: the same records give the same interval. With
    `band_batches`, also the pointwise interval of the fitted S(B) there (`fit_band`).
    """
    values = np.asarray(values, float)
    n_ids = values.shape[2]
    rng = np.random.default_rng(seed)
    draws = rng.integers(0, n_ids, (reps, n_ids))
    jitter = seed_sd(values) / math.sqrt(n_ids) if smooth else 0.0
    steps, spread, _, _ = select_rows(values, draws, jitter, rng)
    mask = np.isfinite(steps)
    if drop_rising:
        mask &= ~rising(steps, spread)
    s_min, e_min = wls_rows(1.0 / np.asarray(batches, float), steps, mask)
    ok = np.isfinite(s_min)
    s_min, e_min = s_min[ok], e_min[ok]
    if not ok.any():
        return {"b_crit_ci": None, "s_min_ci": None, "e_min_ci": None, "fit_band": None, "resamples_without_fit": reps}
    with np.errstate(divide="ignore", invalid="ignore"):
        b_crit = np.where(s_min > 0, np.where(e_min > 0, e_min / s_min, 0.0), np.inf)
    out: dict[str, Any] = {
        "b_crit_ci": _interval(b_crit, level), "s_min_ci": _interval(s_min, level), "e_min_ci": _interval(e_min, level),
        "ci_level": level, "resamples_without_fit": int(reps - ok.sum()),
        "ci_method": f"smoothed percentile bootstrap over seed ids, drawn jointly across batches ({reps} "
                     f"resamples, log-normal jitter sd {jitter:.3g}); censored medians, majority rule, best lr, "
                     "drop_rising and the fit redone in each",
    }
    if len(band_batches):
        curves = s_min[:, None] + e_min[:, None] / np.asarray(band_batches, dtype=float)[None, :]
        lo, hi = np.quantile(curves, [(1 - level) / 2, (1 + level) / 2], axis=0)
        out["fit_band"] = {"batch": [float(b) for b in band_batches], "lo": lo.tolist(), "hi": hi.tolist()}
    return out
