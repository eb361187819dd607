"""The branching arithmetic (bigbatch.study.branching): the local fit recovers a known critical
batch from synthetic branch measurements, the integration reproduces McCandlish's S(B), and the
ramps match hand-computed cases."""

import math

import numpy as np
import pytest

from bigbatch.errors import UsageError
from bigbatch.study import branching as br

B0 = 32
BATCHES = B0 * np.array([1, 2, 4, 8, 16])


def synthetic_decreases(b_crit: float, rng, n_eval: int = 1000, amp: float = 0.05, noise: float = 0.05):
    """Per-example loss decreases of branches at BATCHES: A eps(B), a per-example offset shared by
    every branch (the same evaluation examples) and independent per-branch noise."""
    eps = 1.0 / (1.0 + BATCHES / b_crit)
    shared = rng.normal(0, noise, size=n_eval)
    return amp * eps[:, None] + shared[None, :] + rng.normal(0, noise, size=(BATCHES.size, n_eval))


def test_fit_recovers_a_known_critical_batch_along_training():
    rng = np.random.default_rng(0)  # one fixed draw; the coverage over 200 draws is the next test
    for true in (40.0, 150.0, 400.0):  # small early, growing as the loss falls
        fit = br.fit_local(BATCHES, synthetic_decreases(true, rng, noise=0.005))
        assert fit.low <= true <= fit.high, (true, fit)
        assert fit.b_crit == pytest.approx(true, rel=0.1)
        assert not fit.at_edge
        assert fit.efficiency[0] == pytest.approx(1 / (1 + B0 / true), abs=0.05)


def test_fit_interval_covers_the_truth_in_at_least_90_percent_of_draws():
    rng = np.random.default_rng(2)
    true, draws = 120.0, 200
    hits = 0
    for i in range(draws):
        fit = br.fit_local(BATCHES, synthetic_decreases(true, rng), n_boot=200, seed=i)
        hits += fit.low <= true <= fit.high
    assert hits / draws >= 0.90, hits


def test_no_drop_in_efficiency_is_reported_as_the_grid_edge():
    rng = np.random.default_rng(3)
    d = 0.05 + rng.normal(0, 0.001, size=(BATCHES.size, 500))  # every batch as good per example
    fit = br.fit_local(BATCHES, d)
    assert fit.at_edge and fit.b_crit > 50 * BATCHES.max()


def test_constant_critical_batch_integrates_to_mccandlish():
    """S(B) = S_min (1 + B_crit / B), E(B) = E_min (1 + B / B_crit), and the base run's own steps at B0."""
    e0 = np.array([3000.0, 5000.0, 8000.0])
    seg = br.Segments.from_base(e0, [200.0] * 3, B0)
    assert seg.B_crit == pytest.approx(200.0)
    assert seg.cost(B0) == (pytest.approx(e0.sum() / B0), pytest.approx(e0.sum()))
    for b in (8, 64, 200, 1000, 10_000):
        steps, examples = seg.cost(b)
        assert steps == pytest.approx(seg.S_min * (1 + 200 / b))
        assert examples == pytest.approx(seg.E_min * (1 + b / 200))
        assert (steps / seg.S_min - 1) * (examples / seg.E_min - 1) == pytest.approx(1.0)


def test_varying_critical_batch_keeps_constant_batches_on_one_hyperbola():
    seg = br.Segments.from_base([1000.0, 4000.0, 9000.0], [30.0, 300.0, 900.0], B0)
    assert seg.cost(B0)[0] == pytest.approx(14000 / B0)
    for b in (16, 128, 2048):
        s, e = seg.cost(b)
        assert (s / seg.S_min - 1) * (e / seg.E_min - 1) == pytest.approx(1.0)


def hand_segments() -> br.Segments:
    # E_min = [1000, 1000], S_min = [10, 1]: B_c = [100, 1000], S_min 11, E_min 2000
    return br.Segments(np.array([1000.0, 1000.0]), np.array([10.0, 1.0]))


def test_proportional_ramp_lies_on_the_constant_batch_hyperbola():
    seg = hand_segments()
    b = br.ramp_batches(seg, "proportional", 4000)
    assert b == pytest.approx([100, 1000])  # c = 1
    got = br.ramp_gain(seg, b)
    assert (got["steps"], got["examples"]) == (pytest.approx(22), pytest.approx(4000))
    assert got["constant_steps"] == pytest.approx(22) and got["gain"] == pytest.approx(0, abs=1e-12)


def test_sqrt_ramp_by_hand():
    """c = 2000 / (10 sqrt(100) + 1 sqrt(1000)) = 15.195; S = 11 + (131.62)^2 / 2000 = 19.662
    against 22 for the constant batch (181.8) at the same 4000 examples: 10.6 % fewer steps."""
    seg = hand_segments()
    b = br.ramp_batches(seg, "sqrt", 4000)
    c = 2000 / (100 + math.sqrt(1000))
    assert b == pytest.approx([10 * c, math.sqrt(1000) * c])
    got = br.ramp_gain(seg, b)
    assert got["examples"] == pytest.approx(4000)
    assert got["steps"] == pytest.approx(11 + (100 + math.sqrt(1000)) ** 2 / 2000)
    assert got["steps"] == pytest.approx(19.662, abs=1e-3)
    assert got["constant_batch"] == pytest.approx(2000 / 11)
    assert got["gain"] == pytest.approx(1 - 19.662 / 22, abs=1e-4)
    with pytest.raises(ValueError):
        br.ramp_batches(seg, "sqrt", 1500)  # below E_min


def test_ramp_as_phases_and_a_batch_that_does_not_divide():
    seg = hand_segments()
    b = br.round_batches([100.4, 1003], 4)
    assert list(b) == [100, 1004]
    # segment 1 at 100 takes 1000 + 100 x 10 = 2000 examples: epoch 2 of a 1000-example set
    assert br.ramp_phases(seg, [100, 1000], 1000) == [[0, 100], [2.0, 1000]]
    assert br.ramp_phases(seg, [100, 100], 1000) == [[0, 100]]  # equal batches merge
    assert br.ramp_phases(seg, [100, 1000], 1000, world_size=2, accum_steps=2) == [[0, 100], [2.0, 1000]]
    with pytest.raises(UsageError, match="ramp batch 100 is not divisible by world size 3"):
        br.ramp_phases(seg, [100, 1000], 1000, world_size=3)


@pytest.mark.parametrize("decrease, expect", [
    ({0.5: 0.1, 1.0: 0.3, 2.0: 0.2}, None),            # the best inside the grid: done
    ({0.5: 0.1, 1.0: 0.2, 2.0: 0.3}, 4.0),             # the best at the top: one factor of 2 beyond
    ({0.5: 0.3, 1.0: 0.2, 2.0: 0.1}, 0.25),            # ... at the bottom
    ({1.0: -0.2, 2.0: -0.1, 4.0: -0.4}, 0.5),          # no progress at any lr (the best, x2, is not an edge): lower
    ({1.0: -0.2, 2.0: -0.1, 4.0: None}, 0.5),          # a divergence counts as no progress
    ({1.0: None, 2.0: None}, None),                    # every lr diverged: nothing left to try
    ({4.0: 0.1, 8.0: 0.2, 16.0: 0.3}, None),           # not beyond 16
    ({1 / 16: -0.1, 1 / 8: -0.3}, None),               # not below 1/16
])
def test_the_branch_lr_search_extends_at_an_edge_and_lowers_without_progress(decrease, expect):
    from bigbatch.study.branch_runs import next_lr_factor

    assert next_lr_factor(decrease) == expect
