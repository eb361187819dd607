"""Gradient noise scale: the two-batch estimator, its EMA, and the exact per-example reference."""

import math

import pytest
import torch

from bigbatch.measure.noise import GNSEstimator, per_sample_b_simple, per_sample_stats, two_batch_estimate


def expected_sq(grad_sq, trace_sigma, b):
    # McCandlish et al. 2018, eq. A.1: E|G_B|^2 = |G|^2 + tr(Sigma)/B
    return grad_sq + trace_sigma / b


@pytest.mark.parametrize("b_small,b_big", [(1, 2), (8, 64), (32, 4096)])
def test_two_batch_estimate_recovers_noiseless_inputs_exactly(b_small, b_big):
    g, s = two_batch_estimate(expected_sq(3.0, 50.0, b_small), b_small, expected_sq(3.0, 50.0, b_big), b_big)
    assert g == pytest.approx(3.0, rel=1e-12)
    assert s == pytest.approx(50.0, rel=1e-12)


def test_two_batch_estimate_rejects_unordered_batches():
    with pytest.raises(ValueError):
        two_batch_estimate(1.0, 8, 1.0, 8)


def test_ema_ratio_is_exact_from_the_first_update_and_divides_out_the_loss_scale():
    est = GNSEstimator(decay=0.9)
    assert est.b_simple is None and est.metrics() == {}
    scale = 2.0 ** 12
    for _ in range(3):
        assert est.update(expected_sq(2.0, 10.0, 16) * scale**2, 16, expected_sq(2.0, 10.0, 64) * scale**2, 64, scale=scale)
    # bias correction: a constant input gives back that constant, not (1 - 0.9^n) of it
    assert est.grad_sq == pytest.approx(2.0, rel=1e-9)
    assert est.trace_sigma == pytest.approx(10.0, rel=1e-9)
    assert est.b_simple == pytest.approx(5.0, rel=1e-9)
    assert set(est.metrics()) == {"gns/b_simple", "gns/grad_sq", "gns/trace_sigma"}


def test_non_finite_steps_are_skipped():
    est = GNSEstimator(decay=0.5)
    est.update(expected_sq(1.0, 4.0, 2), 2, expected_sq(1.0, 4.0, 8), 8)
    before = est.state_dict()
    assert not est.update(math.inf, 2, 1.0, 8)
    assert not est.update(1.0, 2, math.nan, 8)
    assert est.skipped == 2
    assert est.state_dict()["grad_sq"] == before["grad_sq"] and est.count == 1
    assert est.b_simple == pytest.approx(4.0)
    other = GNSEstimator()
    other.load_state_dict(est.state_dict())
    assert other.b_simple == est.b_simple


def test_the_average_of_per_rank_emas_is_the_ema_of_the_rank_averaged_norm():
    """Why DDP needs no all-reduce per step: each rank feeds its own small-batch norm (the big
    one is shared), and averaging the EMAs afterwards, then resuming every rank from that
    average, equals one estimator fed the rank-averaged norm at every step."""
    gen = torch.Generator().manual_seed(0)
    steps, ranks = 40, 4
    small = torch.rand(steps, ranks, generator=gen, dtype=torch.float64) * 10 + 5
    big = torch.rand(steps, generator=gen, dtype=torch.float64) + 2
    b_small = [16 if t < 20 else 32 for t in range(steps)]  # the batch may change mid-way
    want = GNSEstimator(decay=0.9)
    per_rank = [GNSEstimator(decay=0.9) for _ in range(ranks)]
    for t in range(steps):
        want.update(float(small[t].mean()), b_small[t], float(big[t]), 8 * b_small[t])
        for r, est in enumerate(per_rank):
            est.update(float(small[t, r]), b_small[t], float(big[t]), 8 * b_small[t])
        if t == 24:  # a checkpoint: every rank continues from the average
            avg = {k: sum(e.state_dict()[k] for e in per_rank) / ranks for k in ("grad_sq", "trace_sigma")}
            for est in per_rank:
                est.load_state_dict({**est.state_dict(), **avg})
    got = {k: sum(e.state_dict()[k] for e in per_rank) / ranks for k in ("grad_sq", "trace_sigma")}
    assert got["grad_sq"] == pytest.approx(want.state_dict()["grad_sq"], rel=1e-12)
    assert got["trace_sigma"] == pytest.approx(want.state_dict()["trace_sigma"], rel=1e-12)


def test_per_sample_reference_equals_the_closed_form_on_linear_regression():
    torch.manual_seed(0)
    n, d = 300, 5
    x = torch.randn(n, d, dtype=torch.float64)
    y = x @ torch.randn(d, dtype=torch.float64) + 0.3 * torch.randn(n, dtype=torch.float64)
    model = torch.nn.Linear(d, 1).double()
    loss_fn = lambda out, t: torch.nn.functional.mse_loss(out.squeeze(-1), t)  # noqa: E731
    # per-example gradient of (w.x + b - y)^2 is 2 r (x, 1)
    r = (model(x).squeeze(-1) - y).detach()
    g = 2 * r[:, None] * torch.cat([x, torch.ones(n, 1, dtype=torch.float64)], 1)
    mean = g.mean(0)
    want_g = float(mean @ mean)
    want_s = float(((g - mean) ** 2).sum() / (n - 1))
    got_g, got_s = per_sample_stats(model, loss_fn, x, y, chunk=64)  # chunks must not change the answer
    assert got_g == pytest.approx(want_g, rel=1e-9)
    assert got_s == pytest.approx(want_s, rel=1e-9)
    assert per_sample_b_simple(model, loss_fn, x, y) == pytest.approx(want_s / want_g, rel=1e-9)
