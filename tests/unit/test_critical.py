"""The critical-batch-size fit and the per-batch tables (McCandlish et al. 2018; Shallue et al. 2018)."""

import json
import math

import numpy as np
import pytest

from bigbatch.study.critical import (
    analyse,
    best_per_batch,
    fit_critical_batch,
    fit_points,
    gap_table,
    gap_trend,
    predict_steps,
)

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


def test_batches_past_the_minimum_with_rising_steps_are_left_out_of_the_fit():
    trials = [trial(b, 0.1, s) for b, s in [(8, 1000), (32, 300), (128, 120), (512, 100), (2048, 180)]]
    batches, steps, excluded = fit_points(best_per_batch(trials))
    assert batches == [8, 32, 128, 512] and excluded == [2048]
    assert fit_points(best_per_batch(trials), drop_rising=False)[2] == []


def test_gap_table_and_trend():
    trials = [trial(b, 0.1, 100, gap=g, train_acc=0.9 + g, test_acc=0.9, gap_at_budget=g / 2)
              for b, g in [(16, 0.01), (64, 0.03), (256, 0.05)]]
    rows = gap_table(best_per_batch(trials))
    assert [r["batch"] for r in rows] == [16, 64, 256]
    assert rows[2]["gap"] == pytest.approx(0.05) and rows[2]["gap_at_budget"] == pytest.approx(0.025)
    assert gap_trend(rows) == pytest.approx(0.01)  # +1 point of accuracy gap per doubling
    assert gap_trend(rows[:1]) is None


def test_analyse_is_json_and_compares_b_crit_with_b_simple():
    rng = np.random.default_rng(3)
    steps = synthetic_steps(200.0, 500.0, BATCHES, 0.03, rng)
    trials = [trial(b, 0.1, float(s), b_simple_at_target=1500.0, gap=0.0) for b, s in zip(BATCHES, steps)]
    trials.append(trial(8, 0.1, None, status="failed", error="boom"))
    out = analyse(trials)
    json.dumps(out, allow_nan=False)  # critical.json is strict JSON
    assert out["b_crit"] == pytest.approx(500.0, rel=0.1)
    assert out["b_simple_at_target"] == 1500.0
    assert out["b_crit_over_b_simple"] == pytest.approx(out["b_crit"] / 1500.0)
    assert out["trials"] == {"ok": len(BATCHES), "failed": 1}


def test_analyse_with_too_few_batches_says_so():
    out = analyse([trial(8, 0.1, 100)])
    assert out["fit"] is None and out["b_crit"] is None and "no fit" in out["note"]
