"""LARS/LARC and LAMB steps equal their formulas computed by hand; BatchNorm and biases get no
weight decay and no adaptation; build_optimizer builds every optimizer the config names."""

from __future__ import annotations

import io
import math

import pytest
import torch
from torch import nn

from bigbatch import config
from bigbatch.config import OptimConfig
from bigbatch.errors import ConfigError
from bigbatch.trainer.optim import LAMB, LARS, build_optimizer, param_groups


def _param(values) -> nn.Parameter:
    return nn.Parameter(torch.tensor(values, dtype=torch.float64))


def _step(opt: torch.optim.Optimizer, params, grads) -> None:
    for p, g in zip(params, grads):
        p.grad = torch.tensor(g, dtype=torch.float64)
    opt.step()


def _close(p: torch.Tensor, expected) -> None:
    torch.testing.assert_close(p.detach(), torch.tensor(expected, dtype=torch.float64), rtol=1e-12, atol=1e-12)


# --- LARS (You, Gitman, Ginsburg 2017) ---------------------------------------------------------
# w = [3, 4] (|w| = 5), g = [0.6, 0.8] (|g| = 1), weight decay 0.1, eta 0.5, lr 0.1:
#   trust = 0.5 * 5 / (1 + 0.1 * 5) = 5/3;  g + wd*w = [0.9, 1.2]
#   step 1: v = 0.1 * 5/3 * [0.9, 1.2] = [0.15, 0.2];  w = [2.85, 3.8]


def test_lars_one_step_equals_the_formula():
    w = _param([3.0, 4.0])
    opt = LARS([w], lr=0.1, momentum=0.9, weight_decay=0.1, trust_coefficient=0.5)
    _step(opt, [w], [[0.6, 0.8]])
    _close(w, [2.85, 3.8])


def test_lars_two_steps_carry_the_lr_scaled_momentum():
    w = _param([3.0, 4.0])
    opt = LARS([w], lr=0.1, momentum=0.9, weight_decay=0.1, trust_coefficient=0.5)
    _step(opt, [w], [[0.6, 0.8]])
    # step 2 at a new lr (the schedule moves it): v2 = 0.9 * v1 + lr2 * trust2 * (g2 + wd * w1)
    opt.param_groups[0]["lr"] = 0.2
    w1, g2 = [2.85, 3.8], [0.0, 2.0]
    trust2 = 0.5 * 4.75 / (2.0 + 0.1 * 4.75)  # |w1| = 4.75, |g2| = 2
    v1 = [0.15, 0.2]
    v2 = [0.9 * v + 0.2 * trust2 * (g + 0.1 * x) for v, g, x in zip(v1, g2, w1)]
    _step(opt, [w], [g2])
    _close(w, [x - v for x, v in zip(w1, v2)])


def test_lars_nesterov_looks_ahead_along_the_buffer():
    w = _param([3.0, 4.0])
    opt = LARS([w], lr=0.1, momentum=0.9, weight_decay=0.1, trust_coefficient=0.5, nesterov=True)
    _step(opt, [w], [[0.6, 0.8]])
    # u = [0.15, 0.2], v = u, step = u + 0.9 v = 1.9 u
    _close(w, [3.0 - 1.9 * 0.15, 4.0 - 1.9 * 0.2])


def test_lars_zero_norms_give_trust_ratio_one():
    zero_w = _param([0.0, 0.0])
    zero_g = _param([3.0, 4.0])
    opt = LARS([zero_w, zero_g], lr=0.1, momentum=0.0, weight_decay=0.1, trust_coefficient=0.5)
    _step(opt, [zero_w, zero_g], [[0.6, 0.8], [0.0, 0.0]])
    _close(zero_w, [-0.06, -0.08])  # |w| = 0: w - lr * g
    _close(zero_g, [3.0 - 0.1 * 0.3, 4.0 - 0.1 * 0.4])  # |g| = 0: w - lr * wd * w
    assert torch.isfinite(zero_w).all() and torch.isfinite(zero_g).all()


def test_larc_clips_the_layer_lr_at_the_global_lr():
    # trust 5/3 > lr 0.1: LARC's per-layer lr = lr * min(trust / lr, 1) = lr (LARS would use lr * trust)
    big = _param([3.0, 4.0])
    # eta 0.001: trust = 0.001 * 5 / 1.5 = 1/300 < lr: per-layer lr = trust (LARS: lr * trust)
    small = _param([3.0, 4.0])
    opt = LARS([{"params": [big], "trust_coefficient": 0.5}, {"params": [small], "trust_coefficient": 0.001}],
                      lr=0.1, momentum=0.0, weight_decay=0.1, clip=True)
    _step(opt, [big, small], [[0.6, 0.8], [0.6, 0.8]])
    _close(big, [3.0 - 0.1 * 0.9, 4.0 - 0.1 * 1.2])
    _close(small, [3.0 - 0.9 / 300, 4.0 - 1.2 / 300])
    assert opt.param_groups[0]["clip"]


def test_lars_group_without_adaptation_is_momentum_sgd():
    adapted = _param([3.0, 4.0])
    plain = _param([3.0, 4.0])
    opt = LARS([{"params": [adapted]}, {"params": [plain], "lars_adapt": False, "weight_decay": 0.0}],
               lr=0.1, momentum=0.9, weight_decay=0.1, trust_coefficient=0.5)
    _step(opt, [adapted, plain], [[0.6, 0.8], [0.6, 0.8]])
    _close(adapted, [2.85, 3.8])
    _close(plain, [3.0 - 0.06, 4.0 - 0.08])  # w - lr * g: no trust ratio, no decay
    _step(opt, [adapted, plain], [[0.6, 0.8], [0.6, 0.8]])
    _close(plain, [3.0 - 0.06 - (0.9 * 0.06 + 0.06), 4.0 - 0.08 - (0.9 * 0.08 + 0.08)])


def test_lars_rejects_bad_arguments():
    w = [_param([1.0])]
    for kwargs in ({"lr": -1.0}, {"lr": 0.1, "momentum": 1.0}, {"lr": 0.1, "trust_coefficient": 0.0},
                   {"lr": 0.1, "weight_decay": -1.0}, {"lr": 0.1, "eps": -1.0}, {"lr": 0.1, "momentum": 0.0, "nesterov": True}):
        with pytest.raises(ValueError):
            LARS(w, **kwargs)


# --- LAMB (You et al. 2019, Algorithm 2) ---------------------------------------------------------


def _lamb_by_hand(w, grads, lr, b1, b2, eps, wd, adapt=True):
    """LAMB on a list of floats, written out coordinate by coordinate."""
    m = [0.0] * len(w)
    v = [0.0] * len(w)
    for t, g in enumerate(grads, start=1):
        m = [b1 * a + (1 - b1) * x for a, x in zip(m, g)]
        v = [b2 * a + (1 - b2) * x * x for a, x in zip(v, g)]
        r = [(a / (1 - b1**t)) / (math.sqrt(c / (1 - b2**t)) + eps) for a, c in zip(m, v)]
        u = [ri + wd * wi for ri, wi in zip(r, w)]
        w_norm, u_norm = math.hypot(*w), math.hypot(*u)
        trust = w_norm / u_norm if adapt and w_norm > 0 and u_norm > 0 else 1.0
        w = [wi - lr * trust * ui for wi, ui in zip(w, u)]
    return w


@pytest.mark.parametrize("adapt", [True, False])
def test_lamb_two_steps_equal_the_formula(adapt):
    grads = [[0.6, -0.8], [0.1, 0.5]]
    w = _param([3.0, 4.0])
    opt = LAMB([{"params": [w], "lars_adapt": adapt}], lr=0.05, betas=(0.9, 0.99), eps=1e-6, weight_decay=0.01)
    _step(opt, [w], grads[:1])
    _close(w, _lamb_by_hand([3.0, 4.0], grads[:1], 0.05, 0.9, 0.99, 1e-6, 0.01, adapt))
    _step(opt, [w], grads[1:])
    _close(w, _lamb_by_hand([3.0, 4.0], grads, 0.05, 0.9, 0.99, 1e-6, 0.01, adapt))


def test_lamb_zero_weight_norm_gives_trust_ratio_one():
    w = _param([0.0, 0.0])
    opt = LAMB([w], lr=0.1, weight_decay=0.01)
    _step(opt, [w], [[0.6, -0.8]])
    assert torch.isfinite(w).all()
    _close(w, _lamb_by_hand([0.0, 0.0], [[0.6, -0.8]], 0.1, 0.9, 0.999, 1e-6, 0.01))
    assert w[0] < 0 < w[1]  # moved by lr * sign(g) (trust 1), not stuck at 0


# --- parameter groups ----------------------------------------------------------------------------


class _Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, bias=True)
        self.bn = nn.BatchNorm2d(4)
        self.gn = nn.GroupNorm(2, 4)
        self.fc = nn.Linear(4, 5)
        self.ln = nn.LayerNorm(5)
        self.head = nn.Linear(5, 2, bias=False)
        self.head_again = self.head  # shared: must appear once
        self.frozen = nn.Linear(2, 2)
        self.frozen.requires_grad_(False)


def test_bn_and_biases_get_no_decay_and_no_adaptation():
    net = _Net()
    groups = param_groups(net, weight_decay=5e-4)
    assert len(groups) == 2
    decay, no_decay = groups
    assert decay["weight_decay"] == 5e-4 and decay["lars_adapt"] is True
    assert no_decay["weight_decay"] == 0.0 and no_decay["lars_adapt"] is False
    ids = lambda ps: sorted(id(p) for p in ps)  # noqa: E731
    assert ids(decay["params"]) == ids([net.conv.weight, net.fc.weight, net.head.weight])
    assert ids(no_decay["params"]) == ids([net.conv.bias, net.bn.weight, net.bn.bias, net.gn.weight, net.gn.bias,
                                           net.fc.bias, net.ln.weight, net.ln.bias])


def test_without_exclusion_everything_is_decayed_and_adapted():
    net = _Net()
    (group,) = param_groups(net, weight_decay=5e-4, exclude_bn_bias=False)
    assert group["weight_decay"] == 5e-4 and group["lars_adapt"] is True
    assert len(group["params"]) == 11  # 13 tensors, minus the frozen layer's 2, the shared head once


def test_resnet_batchnorm_gammas_and_fc_bias_are_excluded():
    torchvision = pytest.importorskip("torchvision")
    net = torchvision.models.resnet18(weights=None, num_classes=10)
    decay, no_decay = param_groups(net, weight_decay=1e-4)
    bn = [p for m in net.modules() if isinstance(m, nn.BatchNorm2d) for p in m.parameters()]
    assert {id(p) for p in no_decay["params"]} == {id(p) for p in bn} | {id(net.fc.bias)}
    assert all(p.ndim >= 2 for p in decay["params"])


def test_build_optimizer_trains_a_bn_model_with_every_optimizer():
    """Every name the config allows builds, keeps the groups' flags, and lowers a fixed-batch loss."""
    torch.manual_seed(0)
    x, y = torch.randn(64, 10), torch.randint(0, 2, (64,))
    # LARC's layer lr is min(trust, lr): it needs a larger eta than LARS (apex's default is 0.02)
    for name, lr, eta in (("sgd", 0.1, 0.001), ("adamw", 0.01, 0.001), ("lars", 10.0, 0.001), ("larc", 1.0, 0.02),
                          ("lamb", 0.1, 0.001)):
        torch.manual_seed(1)
        net = nn.Sequential(nn.Linear(10, 32), nn.BatchNorm1d(32), nn.ReLU(), nn.Linear(32, 2))
        opt = build_optimizer(OptimConfig(name=name, weight_decay=1e-4, trust_coefficient=eta), net, lr)
        assert [g["lars_adapt"] for g in opt.param_groups] == [True, False]
        assert [g["weight_decay"] for g in opt.param_groups] == [1e-4, 0.0]
        losses = []
        for _ in range(20):
            for g in opt.param_groups:  # what the loop does every step
                g["lr"] = lr
            loss = nn.functional.cross_entropy(net(x), y)
            opt.zero_grad()
            loss.backward()
            opt.step()
            losses.append(loss.item())
        assert losses[-1] < 0.5 * losses[0], (name, losses)
        # the optimizer state survives a weights_only checkpoint round trip
        buf = io.BytesIO()
        torch.save(opt.state_dict(), buf)
        buf.seek(0)
        opt.load_state_dict(torch.load(buf, weights_only=True))


def test_build_optimizer_bad_input_names_the_field():
    net = nn.Linear(2, 2)
    with pytest.raises(ConfigError, match="optim.nesterov"):
        build_optimizer(OptimConfig(name="sgd", momentum=0.0, nesterov=True), net, 0.1)
    try:
        import apex  # noqa: F401
    except ImportError:
        with pytest.raises(ConfigError, match="apex is not installed"):
            build_optimizer(OptimConfig(name="lamb", impl="apex"), net, 0.1)
    with pytest.raises(ConfigError, match="optim.name"):
        config.from_dict({"optim": {"name": "adam"}})  # unknown names stop at the config
