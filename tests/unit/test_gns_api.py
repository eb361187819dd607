"""The public noise-scale object (`bigbatch.measure.GradientNoiseScale`) in one process with
gradient accumulation: one update equals the two-batch formula on the micro-batch gradients
computed by hand; an AMP loss scale changes nothing; an overflowed step is skipped; `every`,
state_dict and the undefined one-batch case behave as documented."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from bigbatch.measure import GradientNoiseScale
from bigbatch.measure.noise import two_batch_estimate

MICRO, ACCUM = 8, 4


def _setup(seed: int = 0):
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(6, 16), nn.Tanh(), nn.Linear(16, 3))
    x, y = torch.randn(MICRO * ACCUM, 6), torch.randint(0, 3, (MICRO * ACCUM,))
    return model, x, y


def _accumulate(model, x, y, gns, scaler=None, poison: bool = False):
    loss_fn = nn.CrossEntropyLoss()
    for xb, yb in zip(x.chunk(ACCUM), y.chunk(ACCUM)):
        loss = loss_fn(model(xb), yb) / ACCUM
        (scaler.scale(loss) if scaler is not None else loss).backward()
    if poison:
        next(model.parameters()).grad[0, 0] = float("inf")
    return gns.update(scaler)


def test_one_update_equals_the_two_batch_formula_on_micro_batch_gradients():
    model, x, y = _setup()
    loss_fn = nn.CrossEntropyLoss()
    params = list(model.parameters())
    micro = []
    for xb, yb in zip(x.chunk(ACCUM), y.chunk(ACCUM)):
        g = torch.autograd.grad(loss_fn(model(xb), yb), params)
        micro.append(torch.cat([t.reshape(-1) for t in g]).double())
    sq_small = sum(float(g.square().sum()) for g in micro) / ACCUM
    sq_big = float(torch.stack(micro).mean(0).square().sum())
    want_g, want_s = two_batch_estimate(sq_small, MICRO, sq_big, MICRO * ACCUM)

    gns = GradientNoiseScale(model, batch_size=MICRO, accum_steps=ACCUM, decay=0.0)
    assert _accumulate(model, x, y, gns)
    assert gns.grad_sq == pytest.approx(want_g, rel=1e-6)
    assert gns.trace_sigma == pytest.approx(want_s, rel=1e-6)
    assert gns.b_simple == pytest.approx(want_s / want_g, rel=1e-6)
    assert set(gns.metrics()) == {"gns/b_simple", "gns/grad_sq", "gns/trace_sigma"}


def test_an_amp_loss_scale_is_divided_out_and_an_overflowed_step_is_skipped():
    plain_model, x, y = _setup()
    plain = GradientNoiseScale(plain_model, batch_size=MICRO, accum_steps=ACCUM)
    _accumulate(plain_model, x, y, plain)

    model, x, y = _setup()
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0 ** 12)
    scaled = GradientNoiseScale(model, batch_size=MICRO, accum_steps=ACCUM)
    assert _accumulate(model, x, y, scaled, scaler)
    assert scaled.b_simple == pytest.approx(plain.b_simple, rel=1e-5)
    assert scaled.grad_sq == pytest.approx(plain.grad_sq, rel=1e-5)
    before = scaled.state_dict()
    model.zero_grad()
    _accumulate(model, x, y, scaled, scaler, poison=True)  # the GradScaler would skip this step
    assert scaled.state_dict()["estimator"] == {**before["estimator"], "skipped": 1}  # nothing else changed


def test_every_and_state_dict_resume_the_same_estimate():
    model, x, y = _setup()
    gns = GradientNoiseScale(model, batch_size=MICRO, accum_steps=ACCUM, every=2)
    measured = []
    for _ in range(4):
        measured.append(_accumulate(model, x, y, gns))
        model.zero_grad()
    assert measured == [True, False, True, False] and gns.state_dict()["estimator"]["count"] == 2
    state = gns.state_dict()
    other_model, _, _ = _setup()
    other = GradientNoiseScale(other_model, batch_size=MICRO, accum_steps=ACCUM, every=2)
    other.load_state_dict(state)
    assert other.b_simple == gns.b_simple and math.isfinite(other.b_simple)
    for m, g in ((model, gns), (other_model, other)):
        _accumulate(m, x, y, g)
    assert other.state_dict()["estimator"]["count"] == gns.state_dict()["estimator"]["count"] == 3


def test_one_process_without_accumulation_is_refused():
    model, _, _ = _setup()
    with pytest.raises(ValueError, match="accum_steps >= 2"):
        GradientNoiseScale(model, batch_size=32)
