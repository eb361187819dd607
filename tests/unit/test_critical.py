"""The critical-batch-size fit and the per-batch tables (McCandlish et al. 2018; Shallue et al. 2018)."""

import json
import math

import numpy as np
import pytest

from bigbatch.study.critical import (
    analyse,
    best_per_batch,
    censored_median,
    crossing,
    fit_critical_batch,
    fit_points,
    predict_steps,
    regime,
)
from bigbatch.study.intervals import rising, wls_rows
from bigbatch.study.gap import gap_rows, gap_trends, outlier_rows, trend_per_doubling

BATCHES = [8, 16, 32, 64, 128, 256, 512, 1024, 2048, 4096]


def synthetic_steps(s_min, b_crit, batches, noise, rng):
    """S(B) = S_min (1 + B_crit/B) with multiplicative noise (seed-to-seed scatter)."""
    s = s_min * (1.0 + b_crit / np.asarray(batches, float))
    return s * (1.0 + noise * rng.standard_normal(len(batches)))


def test_fit_is_exact_on_noiseless_curve():
    s = synthetic_steps(250.0, 600.0, BATCHES, 0.0, np.random.default_rng(0))
    fit = fit_critical_batch(BATCHES, s)
    assert fit["s_min"] == pytest.approx(250.0, rel=1e-9)
    assert fit["b_crit"] == pytest.approx(600.0, rel=1e-9)
    assert fit["e_min"] == pytest.approx(250.0 * 600.0, rel=1e-9)  # E_min = S_min * B_crit
    assert fit["r2"] == pytest.approx(1.0)
    assert predict_steps(fit, 600.0) == pytest.approx(2 * 250.0)  # S(B_crit) = 2 S_min


@pytest.mark.parametrize("s_min,b_crit", [(250.0, 600.0), (40.0, 100.0), (1000.0, 1000.0)])
def test_fit_recovers_b_crit_and_s_min_from_noisy_curve_within_10_percent(s_min, b_crit):
    # 5 % seed-to-seed noise on every point, 20 independent draws: every draw within 10 %.
    # (B_crit must lie inside the measured range: the largest batch here is 4 x B_crit or more.)
    rng = np.random.default_rng(1)
    for _ in range(20):
        s = synthetic_steps(s_min, b_crit, BATCHES, 0.05, rng)
        fit = fit_critical_batch(BATCHES, s)
        assert fit["b_crit"] == pytest.approx(b_crit, rel=0.10)
        assert fit["s_min"] == pytest.approx(s_min, rel=0.10)
        assert fit["r2"] > 0.9


def test_fit_without_saturation_reports_infinite_b_crit():
    # Perfect scaling over the whole range: S = E/B, no floor to fit.
    fit = fit_critical_batch([8, 16, 32, 64], [8000.0, 4000.0, 2000.0, 1000.0])
    assert fit["s_min"] == pytest.approx(0.0, abs=1e-6) or math.isinf(fit["b_crit"])


def test_fit_rejects_bad_input():
    with pytest.raises(ValueError, match="two distinct"):
        fit_critical_batch([64, 64], [10.0, 11.0])
    with pytest.raises(ValueError, match="positive"):
        fit_critical_batch([8, 16], [10.0, float("nan")])
    with pytest.raises(ValueError, match="same length"):
        fit_critical_batch([8, 16, 32], [10.0, 5.0])


def trial(batch, lr, steps, seed=0, status="ok", **kw):
    return {"batch": batch, "lr": lr, "seed": seed, "status": status, "steps_to_target": steps,
            "examples_to_target": None if steps is None else steps * batch, **kw}


def test_best_lr_per_batch_uses_median_over_seeds_and_skips_failures():
    trials = [
        trial(32, 0.1, 100, seed=0), trial(32, 0.1, 300, seed=1), trial(32, 0.1, 120, seed=2),  # median 120
        trial(32, 0.2, 110, seed=0), trial(32, 0.2, 115, seed=1),  # median 112.5: best
        trial(32, 0.4, None, status="diverged"),
        trial(32, 0.8, 10, status="failed"),  # failed trials never count, whatever they report
        trial(64, 0.4, None, status="not_reached"),
    ]
    best = best_per_batch(trials)
    assert list(best) == [32]  # no lr at 64 reached the target
    assert best[32]["lr"] == 0.2
    assert best[32]["steps_to_target"] == pytest.approx(112.5)
    assert best[32]["examples_to_target"] == pytest.approx(112.5 * 32)
    assert best[32]["seeds"] == [0, 1]
    assert best[32]["edge"] is None  # 0.1 < 0.2 < 0.4 were run


def test_best_lr_needs_a_majority_of_its_seeds():
    # lr 0.4 is fastest on the one seed of three that reached: it does not count.
    trials = [trial(64, 0.4, 50, seed=0), trial(64, 0.4, None, seed=1, status="not_reached"),
              trial(64, 0.4, None, seed=2, status="slower", steps_lower_bound=120),
              trial(64, 0.2, 80, seed=0), trial(64, 0.2, 90, seed=1), trial(64, 0.2, None, seed=2, status="diverged"),
              trial(64, 0.1, 95, seed=0)]
    best = best_per_batch(trials)[64]
    assert best["lr"] == 0.2 and best["steps_to_target"] == pytest.approx(90.0)  # 80, 90, diverged = inf: 90
    assert best["n_seeds"] == 3 and best["n_reached"] == 2
    # The best at the top of the lr grid is flagged as an edge.
    assert best_per_batch([trial(8, 0.1, 90), trial(8, 0.2, 80)])[8]["edge"] == "high"


def test_censored_median_counts_a_seed_that_did_not_reach_as_infinite_steps():
    # The recorded case of issue 32: 80, 90 and a diverged seed. The median over the seeds that
    # reached (the old rule) was 85; with the diverged seed as +inf it is 90.
    assert censored_median([80.0, 90.0], 3) == 90.0
    assert censored_median([80.0, 90.0, 100.0], 4) == 95.0  # 3 of 4: (90 + 100) / 2
    assert censored_median([80.0, 90.0], 4) is None and censored_median([50.0], 3) is None  # no majority: inf
    trials = [trial(64, 0.2, 80, seed=0), trial(64, 0.2, 90, seed=1), trial(64, 0.2, None, seed=2, status="diverged"),
              trial(64, 0.1, 86, seed=0), trial(64, 0.1, 88, seed=1), trial(64, 0.1, 89, seed=2)]
    best = best_per_batch(trials)[64]
    # Median over reached seeds would pick 0.2 (85 < 88); censored, 0.1 (88 < 90) is the best.
    assert best["lr"] == 0.1 and best["steps_to_target"] == 88.0


def test_raced_and_diverged_trials_without_an_lr_still_bound_the_grid():
    # A trial stopped before its summary has no recorded lr, only its multiplier: it still makes
    # the fastest lr an interior point of the grid, not an edge.
    trials = [{**trial(32, 0.05, 1000), "lr_multiplier": 1.0},
              {**trial(32, None, None, status="slower"), "lr_multiplier": 2.0},
              {**trial(32, None, None, status="diverged"), "lr_multiplier": 4.0},
              {**trial(32, 0.025, 1400), "lr_multiplier": 0.5}]
    best = best_per_batch(trials)[32]
    assert best["lr_multiplier"] == 1.0 and best["lr"] == 0.05 and best["edge"] is None and best["n_seeds"] == 1


def test_crossing_is_interpolated_between_the_evaluations_around_the_target():
    evals = [(100, 0.80), (200, 0.90), (300, 0.94), (310, 0.96)]
    c = crossing(evals, 0.95)
    assert c["steps"] == pytest.approx(305.0)  # halfway from 0.94 to 0.96
    assert c["steps_at_eval"] == 310 and c["resolution"] == pytest.approx(10 / 305)
    assert crossing(evals, 0.99) is None
    assert crossing([(50, 0.97)], 0.95) == {"steps": 50.0, "resolution": 1.0, "steps_at_eval": 50.0}
    # A loss target: the first evaluation at or below it.
    assert crossing([(10, 0.5), (20, 0.3)], 0.4, higher_is_better=False)["steps"] == pytest.approx(15.0)


def test_vectorised_fit_equals_the_lstsq_fit():
    rng = np.random.default_rng(5)
    s = synthetic_steps(120.0, 900.0, BATCHES, 0.05, rng)
    a, b = wls_rows(1.0 / np.asarray(BATCHES, float), s[None, :])
    fit = fit_critical_batch(BATCHES, s)
    assert a[0] == pytest.approx(fit["s_min"], rel=1e-9) and b[0] == pytest.approx(fit["e_min"], rel=1e-9)
    mask = np.ones((1, len(BATCHES)), bool)
    mask[0, -2:] = False  # the masked fit is the fit of the other points
    a, b = wls_rows(1.0 / np.asarray(BATCHES, float), s[None, :], mask)
    assert a[0] == pytest.approx(fit_critical_batch(BATCHES[:-2], s[:-2])["s_min"], rel=1e-9)


def test_trend_per_doubling_has_an_interval_around_the_slope():
    rng = np.random.default_rng(0)
    pts = [(b, 0.01 * np.log2(b) + 0.002 * rng.standard_normal()) for b in [16, 64, 256, 1024, 4096] for _ in range(2)]
    t = trend_per_doubling(pts)
    assert t["n"] == 10 and t["ci"][0] < t["slope"] < t["ci"][1]
    assert t["ci"][0] < 0.01 < t["ci"][1]
    assert trend_per_doubling([(16, 0.1), (16, 0.2)]) is None


def test_regimes_follow_b_crit():
    assert regime(64, 1000) == "perfect scaling"
    assert regime(1000, 1000) == "diminishing returns"
    assert regime(8192, 1000) == "maximal data parallelism"
    assert regime(64, None) is None


def test_a_batch_is_left_out_only_when_its_rise_exceeds_the_seed_spread():
    curve = [(8, 1000), (32, 300), (128, 120), (512, 100)]
    seeds = (0.96, 1.0, 1.04)  # +-4 %: range 8 at the fastest batch (512)

    def with_last(steps_2048, scatter=seeds):
        trials = [trial(b, 0.1, s * f, seed=i) for b, s in curve for i, f in enumerate(seeds)]
        return trials + [trial(2048, 0.1, steps_2048 * f, seed=i) for i, f in enumerate(scatter)]

    # 180 vs 100: a rise of 80, far beyond the ranges (8 and 14.4): maximal data parallelism, left out.
    batches, steps, excluded = fit_points(best_per_batch(with_last(180)))
    assert batches == [8, 32, 128, 512] and excluded == [2048]
    assert fit_points(best_per_batch(with_last(180)), drop_rising=False)[2] == []
    # 106 vs 100: a rise of 6, within the seed range at 2048 (8.5): seed noise, the batch stays.
    assert fit_points(best_per_batch(with_last(106)))[2] == []
    # A wide scatter at 2048 (+-30 %) keeps even a rise of 30.
    assert fit_points(best_per_batch(with_last(130, (0.7, 1.0, 1.3))))[2] == []
    # One seed per batch: no spread is known, so no rise is shown to exceed it; nothing is dropped.
    one = [trial(b, 0.1, s) for b, s in curve + [(2048, 180)]]
    assert fit_points(best_per_batch(one))[2] == []


def test_drop_rising_rarely_fires_without_a_rise_and_catches_a_real_one():
    # S(B) = 80 (1 + 100/B) on 8 batches 16..2048 (five past B_crit, nearly flat), 3 seeds, 7 %
    # log-normal seed noise, 2,000 simulated sweeps. The old rule (any batch past the fastest
    # with more steps) fired in 25 % of them; the seed-spread test in 0.75 % (0 % with 5 seeds,
    # <= 1.3 % at 10 % noise). A real rise (2048 at 1.5x the steps of 1024) is caught in 99 %.
    rng = np.random.default_rng(0)
    b = np.array([16, 32, 64, 128, 256, 512, 1024, 2048], float)
    true = 80 * (1 + 100 / b)
    x = true[None, :, None] * np.exp(0.07 * rng.standard_normal((2000, len(b), 3)))
    med, spread = np.median(x, 2), x.max(2) - x.min(2)
    old = (np.arange(len(b))[None, :] > med.argmin(1)[:, None]).any(1).mean()
    assert old > 0.2 and rising(med, spread).any(1).mean() < 0.02
    x[:, -1] *= 1.5 * true[-2] / true[-1]
    med, spread = np.median(x, 2), x.max(2) - x.min(2)
    assert rising(med, spread)[:, -1].mean() > 0.95


def test_gap_rows_hold_seeds_that_met_the_criterion_and_the_trend():
    trials = [dict(trial(b, 0.1, 100, seed=sd, phase="gap", train_acc=0.99, test_acc=0.99 - g - 0.002 * sd,
                         gap=g + 0.002 * sd, loss_gap=g, sharpness=10.0 * b ** 0.5))
              for b, g in [(16, 0.01), (64, 0.03), (256, 0.05)] for sd in (0, 1)]
    trials.append(dict(trial(256, 0.1, None, seed=2, status="not_reached", phase="gap", train_acc=0.9)))
    rows = gap_rows(trials)
    assert [r["batch"] for r in rows] == [16, 64, 256]
    assert all(r["train_acc"] == pytest.approx(0.99) for r in rows)  # every row at the criterion
    assert rows[2]["n_seeds"] == 2 and rows[2]["n_not_met"] == 1
    assert rows[2]["gap"] == pytest.approx(0.051) and rows[2]["gap_sd"] == pytest.approx(0.002 * 2 ** -0.5)
    trends = gap_trends(trials)
    assert trends["gap"]["slope"] == pytest.approx(0.01)  # +1 point of accuracy gap per doubling
    assert trends["log2_sharpness"]["slope"] == pytest.approx(0.5)  # sqrt(B): x 2^0.5 per doubling


def outlier_trials():
    """Gap trials whose top-6 (C = 3 classes) grow as B^0.5 (lambda_1) and B^0.25 (lambda_3), two
    seeds 10 % apart; the outlier count grows by one per two doublings."""
    out = []
    for b, n_out in [(16, 1), (64, 2), (256, 3)]:
        for sd, f in ((0, 1.0), (1, 1.1)):
            eigs = [f * b ** 0.5, f * 0.5 * b ** 0.5, f * b ** 0.25, 1.0, 0.99, 0.98]
            out.append(trial(b, 0.1, 100, seed=sd, phase="gap", top_eigenvalues=eigs, num_classes=3, sharpness=eigs[0],
                             outliers=n_out, outliers_saturated=False, grad_fraction_top_k=0.5 + 0.1 * sd))
    out.append(trial(256, 0.1, None, seed=2, status="not_reached", phase="gap", top_eigenvalues=[99.0] * 6,
                     num_classes=3, outliers=6, grad_fraction_top_k=0.0))  # did not meet the criterion: left out
    return out


def test_outliers_vs_batch_median_and_seed_range_and_trends_per_doubling():
    trials = outlier_trials()
    rows = outlier_rows(trials)
    assert [r["batch"] for r in rows] == [16, 64, 256] and all(r["n_seeds"] == 2 and r["k"] == 6 for r in rows)
    assert rows[2]["lambda_1"] == pytest.approx(1.05 * 16) and rows[2]["lambda_1_range"] == pytest.approx([16, 17.6])
    assert rows[1]["lambda_c"] == pytest.approx(1.05 * 64 ** 0.25) and rows[0]["lambda_k"] == pytest.approx(0.98 * 1.0)
    assert [r["outliers"] for r in rows] == [1, 2, 3] and rows[0]["grad_fraction_top_k"] == pytest.approx(0.55)
    trends = gap_trends(trials)
    assert trends["log2_sharpness"]["slope"] == pytest.approx(0.5)  # lambda_1 x 2^0.5 per doubling
    assert trends["log2_class_eigenvalue"]["slope"] == pytest.approx(0.25)  # lambda_C x 2^0.25
    lo, hi = trends["log2_class_eigenvalue"]["ci"]
    assert lo < 0.25 < hi and trends["outliers"]["slope"] == pytest.approx(0.5)
    assert trends["grad_fraction_top_k"]["slope"] == pytest.approx(0.0, abs=1e-12)
    rows_gap = gap_rows(trials)
    assert rows_gap[0]["grad_fraction_top_k"] == pytest.approx(0.55) and rows_gap[2]["outliers"] == 3
    assert outlier_rows([trial(16, 0.1, 100, phase="gap", sharpness=2.0)]) == []  # k = 0: sharpness only, no rows


def test_analyse_is_json_and_compares_b_crit_with_b_simple():
    rng = np.random.default_rng(3)
    steps = synthetic_steps(200.0, 500.0, BATCHES, 0.03, rng)
    trials = [trial(b, 0.1, float(s) * f, seed=sd, b_simple_at_target=1500.0)
              for b, s in zip(BATCHES, steps) for sd, f in enumerate((0.97, 1.0, 1.04))]
    trials.append(trial(8, 0.1, None, status="failed", error="boom"))
    out = analyse(trials, reps=500)
    json.dumps(out, allow_nan=False)  # critical.json is strict JSON
    assert out["b_crit"] == pytest.approx(500.0, rel=0.1)
    assert out["n_seeds"] == 3 and out["b_crit_ci"][0] <= out["b_crit"] <= out["b_crit_ci"][1]
    assert out["best"][0]["regime"] == "perfect scaling" and out["best"][-1]["regime"] == "maximal data parallelism"
    assert out["b_simple_at_target"] == 1500.0
    assert out["b_crit_over_b_simple"] == pytest.approx(out["b_crit"] / 1500.0)
    assert out["trials"] == {"ok": 3 * len(BATCHES), "failed": 1}


def test_analyse_with_too_few_batches_says_so():
    out = analyse([trial(8, 0.1, 100)])
    assert out["fit"] is None and out["b_crit"] is None and "no fit" in out["note"]


def test_noise_at_target_counts_a_failed_estimate_as_its_bound_and_the_headline_claims_only_what_intervals_show():
    """Issue 32: a failed B_noise is a lower bound in the median (never dropped); the interval is the
    median of the per-batch intervals; agreement with B_crit ~ B_noise is stated only when the
    ratio's interval contains 1."""
    from bigbatch.study.critical import noise_at_target, ratio_interval
    from bigbatch.study.records import _agreement

    def trial(value, lo, hi, bound=None):
        return {"b_noise_at_target": value, "b_noise_interval_at_target": [lo, hi] if lo else None,
                "b_noise_lower_bound_at_target": bound}

    best = {64: {"trials": [trial(300.0, 250.0, 360.0)]}, 128: {"trials": [trial(None, None, None, bound=500.0)]},
            256: {"trials": [trial(200.0, 150.0, 270.0)]}}
    got = noise_at_target(best, "b_noise")
    assert got["value"] == 300.0 and got["lower_bounds"] == 1 and got["lower_bound"]
    assert got["interval"] == [250.0, 360.0]  # medians of [250, 500, 150] and [360, inf, 270]
    assert noise_at_target({64: {"trials": [trial(None, None, None)]}}, "b_noise")["value"] is None
    assert ratio_interval([400.0, 600.0], [250.0, 360.0]) == [400 / 360, 600 / 250]
    assert ratio_interval([400.0, None], [250.0, 360.0]) == [400 / 360, None]
    assert "contains 1" in _agreement({"b_crit_over_b_noise_interval": [0.8, 1.4]})
    assert "not supported" in _agreement({"b_crit_over_b_noise_interval": [1.2, 2.4]})
    assert "neither" in _agreement({"b_crit_over_b_noise_interval": [0.5, None]})
    assert "neither" in _agreement({"b_crit_over_b_noise_interval": [0.0, 3.6]})  # the default study's, B_noise unbounded above
    assert "no agreement claimed" in _agreement({})


def test_a_sequence_task_reports_the_batch_answers_in_tokens_too():
    """Trials of windows of T = 64 tokens: B_crit, its interval, E_min and B_simple again x T; S_min not."""
    from bigbatch.study.records import headline, tokens_per_example

    rng = np.random.default_rng(3)
    batches = [8, 16, 32, 64, 128, 256]
    trials = [trial(b, 0.01, float(s), seed=seed, tokens_per_example=64, b_simple_at_target=40.0 + seed)
              for seed in range(3) for b, s in zip(batches, synthetic_steps(150.0, 30.0, batches, 0.03, rng))]
    a = analyse(trials, reps=200)
    tok = a["in_tokens"]
    assert a["tokens_per_example"] == 64
    assert tok["b_crit"] == pytest.approx(64 * a["b_crit"])
    assert tok["e_min"] == pytest.approx(64 * a["e_min"])
    assert tok["b_crit_ci"] == pytest.approx([64 * v for v in a["b_crit_ci"]])
    assert tok["b_simple_at_target"] == pytest.approx(64 * a["b_simple_at_target"])
    line = next(l for l in headline(a) if l.startswith("in tokens"))
    assert f"B_crit = {64 * a['b_crit']:,.0f}".replace(",", "") in line.replace(",", "")
    # one label per example: no token line; a summary says T (older ones through tokens / examples)
    assert "in_tokens" not in analyse([{k: v for k, v in t.items() if k != "tokens_per_example"} for t in trials], reps=50)
    assert tokens_per_example({"tokens_per_example": 64}) == 64
    assert tokens_per_example({"tokens": 6400, "examples": 100}) == 64
    assert tokens_per_example({"examples": 100}) is None
