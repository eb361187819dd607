"""The quadratic Bezier curve of `bigbatch connect` (Garipov et al. 2018): its points, its gradient
in the control point, and one training step equal to the SGD formula on the trained loss."""

from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from bigbatch import config
from bigbatch.study.connect import bezier_point, curve_state, train_curve
from bigbatch.study.landscape import Pair
from bigbatch.trainer.data import DataBundle, TensorData

CONFIG = Path(__file__).resolve().parents[2] / "configs" / "mnist1d-mlp.toml"


def test_the_curve_passes_through_both_ends_and_bends_towards_the_control_point():
    a, c, b = {"w": torch.tensor([0.0, 2.0])}, {"w": torch.tensor([4.0, 4.0])}, {"w": torch.tensor([8.0, -2.0])}
    assert torch.equal(bezier_point(a, c, b, 0.0)["w"], a["w"])
    assert torch.equal(bezier_point(a, c, b, 1.0)["w"], b["w"])
    # t = 1/2: (A + 2C + B) / 4, not the chord's midpoint (A + B) / 2
    assert torch.allclose(bezier_point(a, c, b, 0.5)["w"], torch.tensor([4.0, 2.0]))
    # a control point at the midpoint gives the straight line, at the line's speed
    mid = {"w": (a["w"] + b["w"]) / 2}
    for t in (0.1, 0.3, 0.7):
        assert torch.allclose(bezier_point(a, mid, b, t)["w"], torch.lerp(a["w"], b["w"], t))


@pytest.mark.parametrize("t", [0.0, 0.25, 0.5, 0.9])
def test_the_gradient_in_the_control_point_is_2t_1_minus_t_times_the_gradient_at_the_point(t):
    a, b = {"w": torch.randn(5)}, {"w": torch.randn(5)}
    c = {"w": torch.randn(5, requires_grad=True)}
    g = torch.randn(5)
    (bezier_point(a, c, b, t)["w"] * g).sum().backward()
    assert torch.allclose(c["w"].grad, 2 * t * (1 - t) * g)


def _net() -> nn.Module:
    return nn.Sequential(nn.Linear(6, 8), nn.BatchNorm1d(8), nn.ReLU(), nn.Linear(8, 3))


def _pair(model: nn.Module, n: int = 40) -> Pair:
    torch.manual_seed(1)
    state_a = {k: v.clone() for k, v in _net().state_dict().items()}
    state_b = {k: v.clone() for k, v in _net().state_dict().items()}
    data = TensorData(torch.randn(n, 6), torch.randint(0, 3, (n,)))
    cfg = config.load(CONFIG, ["train.label_smoothing=0.1"])
    return Pair(Path("a"), Path("b"), cfg, state_a, state_b, DataBundle(data, data, 3, (6,), "random"), model,
                torch.device("cpu"))


def test_one_curve_step_is_sgd_on_the_label_smoothed_train_mode_loss_at_the_sampled_point():
    pair = _pair(_net())
    lr, batch, seed = 0.3, 16, 5
    control, history = train_curve(pair, steps=1, batch=batch, lr=lr, seed=seed)

    gen = torch.Generator().manual_seed(seed)  # the draws train_curve makes: t, then the mini-batch
    t = torch.rand((), generator=gen).item()
    idx = torch.randperm(40, generator=gen)[:batch]
    x, y = pair.bundle.train.x[idx], pair.bundle.train.y[idx]
    names = [n for n, _ in pair.model.named_parameters()]
    mid = {n: (pair.state_a[n] + pair.state_b[n]) / 2 for n in names}
    ref = _net()
    ref.load_state_dict({**pair.state_a, **bezier_point(pair.state_a, mid, pair.state_b, t)})
    ref.train()  # BatchNorm on the mini-batch's statistics
    loss = F.cross_entropy(ref(x), y, label_smoothing=0.1)
    loss.backward()
    assert history == [{"step": 1, "loss": pytest.approx(loss.item(), rel=1e-6)}]
    for n, p in ref.named_parameters():
        expected = mid[n] - lr * 2 * t * (1 - t) * p.grad  # first SGD step: the momentum buffer is the gradient
        assert torch.allclose(control[n], expected, atol=1e-6), n


class Tied(nn.Module):
    def __init__(self):
        super().__init__()
        self.embed = nn.Linear(3, 3, bias=False)
        self.head = nn.Linear(3, 3, bias=False)
        self.head.weight = self.embed.weight

    def forward(self, x):
        return self.head(self.embed(x))


def test_a_tied_weight_takes_its_parameters_value_in_the_state():
    torch.manual_seed(0)
    model = Tied()
    a, b = Tied().state_dict(), Tied().state_dict()
    pair = Pair(Path("a"), Path("b"), None, a, b, None, model, torch.device("cpu"))
    control = {"embed.weight": torch.randn(3, 3)}  # named_parameters() names the tied weight once
    state = curve_state(pair, control, 0.4)
    point = bezier_point(a, control, b, 0.4)["embed.weight"]
    assert torch.equal(state["embed.weight"], point) and torch.equal(state["head.weight"], point)
