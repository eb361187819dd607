"""The multi-tensor LARS/LARC/LAMB steps equal the per-tensor formulas, step after step.

The reference below is bigbatch's per-tensor step as it was before the `torch._foreach_*` one: a
Python loop over the parameters with one small op at a time. Both run on the same model (conv,
BatchNorm, linear layers with biases, so the excluded BN/bias group takes part; a zero weight
and a zero gradient for the zero-norm guards; a float64 tensor among float32 ones; a parameter
that gets its first gradient late, so a step mixes new and existing momentum buffers) for
several steps at a moving lr, and must agree within 1e-6.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

from bigbatch.trainer import optim
from bigbatch.trainer.optim import LAMB, LARS, _trust_ratio, param_groups


class PerTensorLARS(LARS):
    def _step(self, group, params):
        lr, m, wd = group["lr"], group["momentum"], group["weight_decay"]
        for p in params:
            g = p.grad
            if group["lars_adapt"]:
                w_norm, g_norm = torch.linalg.vector_norm(p), torch.linalg.vector_norm(g)
                trust = group["trust_coefficient"] * w_norm / (g_norm + wd * w_norm + group["eps"])
                if group["clip"]:
                    trust = torch.clamp(trust / lr, max=1.0) if lr > 0 else torch.ones_like(trust)
                scale = lr * _trust_ratio(w_norm, g_norm, trust)
            else:
                scale = lr
            update = g.add(p, alpha=wd) if wd != 0 else g.clone()
            update.mul_(scale)
            if m != 0:
                state = self.state[p]
                if "momentum_buffer" not in state:
                    state["momentum_buffer"] = update.clone()
                else:
                    state["momentum_buffer"].mul_(m).add_(update)
                buf = state["momentum_buffer"]
                update = update.add(buf, alpha=m) if group["nesterov"] else buf
            p.sub_(update)


class PerTensorLAMB(LAMB):
    def _step(self, group, params):
        b1, b2 = group["betas"]
        wd = group["weight_decay"]
        for p in params:
            state = self.state[p]
            state["step"] += 1
            t = state["step"]
            m, v = state["exp_avg"], state["exp_avg_sq"]
            m.mul_(b1).add_(p.grad, alpha=1 - b1)
            v.mul_(b2).addcmul_(p.grad, p.grad, value=1 - b2)
            update = (m / (1 - b1**t)).div_((v / (1 - b2**t)).sqrt_().add_(group["eps"]))
            if wd != 0:
                update.add_(p, alpha=wd)
            if group["lars_adapt"]:
                w_norm, u_norm = torch.linalg.vector_norm(p), torch.linalg.vector_norm(update)
                update.mul_(_trust_ratio(w_norm, u_norm, w_norm / u_norm))
            p.sub_(update, alpha=group["lr"])


class _Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3)
        self.bn = nn.BatchNorm2d(8)
        self.fc = nn.Linear(8, 6)
        self.zero = nn.Linear(6, 4)  # weight starts at 0: |w| = 0, trust ratio 1
        nn.init.zeros_(self.zero.weight)
        self.late = nn.Linear(4, 4)  # no gradient on the first step: created late, buffers mixed
        self.wide = nn.Parameter(torch.randn(5, 3, dtype=torch.float64))  # its own dtype bucket


def _run(opt_cls, kwargs: dict, steps: int = 5) -> list[torch.Tensor]:
    torch.manual_seed(0)
    net = _Net()
    opt = opt_cls(param_groups(net, weight_decay=kwargs.pop("weight_decay")), **kwargs)
    gen = torch.Generator().manual_seed(1)
    for step in range(steps):
        for name, p in net.named_parameters():
            if name.startswith("late") and step == 0:
                p.grad = None
            elif name == "fc.weight" and step == 2:
                p.grad = torch.zeros_like(p)  # |g| = 0: trust ratio 1
            else:
                p.grad = torch.randn(p.shape, generator=gen, dtype=p.dtype)
        for g in opt.param_groups:  # the schedule moves the lr every step
            g["lr"] = kwargs["lr"] * (1 + step) / steps
        opt.step()
    return [p.detach().clone() for p in net.parameters()]


CASES = {
    "lars": (LARS, PerTensorLARS, dict(lr=0.5, momentum=0.9, weight_decay=1e-2, trust_coefficient=0.02)),
    "lars-nesterov": (LARS, PerTensorLARS, dict(lr=0.5, momentum=0.9, weight_decay=1e-2, nesterov=True)),
    "lars-no-momentum-eps": (LARS, PerTensorLARS, dict(lr=0.5, momentum=0.0, weight_decay=0.0, eps=1e-8)),
    # eta 1 makes trust > lr on some layers (clipped to lr) and eta small < lr on others
    "larc": (LARS, PerTensorLARS, dict(lr=0.05, momentum=0.9, weight_decay=1e-2, trust_coefficient=0.05, clip=True)),
    "larc-large-eta": (LARS, PerTensorLARS, dict(lr=0.05, momentum=0.9, weight_decay=1e-2, trust_coefficient=1.0, clip=True)),
    "lamb": (LAMB, PerTensorLAMB, dict(lr=0.05, weight_decay=1e-2)),
    "lamb-no-decay": (LAMB, PerTensorLAMB, dict(lr=0.05, weight_decay=0.0, betas=(0.8, 0.99), eps=1e-6)),
}


@pytest.mark.parametrize("bucket_bytes", [1 << 20, 256])
@pytest.mark.parametrize("case", sorted(CASES))
def test_multi_tensor_step_equals_the_per_tensor_formulas(case, bucket_bytes, monkeypatch):
    """With every parameter of a group in one multi-tensor op, and with the CPU's cache-sized runs
    cut small enough that the groups split into several runs (one layer each, or less)."""
    monkeypatch.setattr(optim, "CPU_BUCKET_BYTES", bucket_bytes)
    ours_cls, ref_cls, kwargs = CASES[case]
    start = _run(ours_cls, {**kwargs, "lr": 0.0}, steps=1)  # lr 0: the initial weights
    ours = _run(ours_cls, dict(kwargs))
    ref = _run(ref_cls, dict(kwargs))
    moved = max((a.double() - s.double()).abs().max().item() for a, s in zip(ours, start))
    assert moved > 1e-3, f"{case}: the steps barely moved the weights ({moved:.2g}): the comparison would be empty"
    for i, (a, b) in enumerate(zip(ours, ref)):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-6, msg=lambda m: f"{case}, parameter {i}: {m}")


def test_lars_is_bitwise_the_per_tensor_step_on_the_cpu():
    # same ops in the same order: the golden LARS losses (tests/assets/golden) stay exact
    ours = _run(LARS, dict(lr=0.5, momentum=0.9, weight_decay=1e-2, trust_coefficient=0.02))
    ref = _run(PerTensorLARS, dict(lr=0.5, momentum=0.9, weight_decay=1e-2, trust_coefficient=0.02))
    assert all(torch.equal(a, b) for a, b in zip(ours, ref))


def test_a_step_is_a_fixed_number_of_ops_whatever_the_depth():
    """The point of the multi-tensor step: the ops it dispatches do not grow with the layer count."""
    from torch.profiler import ProfilerActivity, profile

    def top_level_ops(depth: int, opt_cls, **kw) -> int:
        net = nn.Sequential(*[nn.Linear(8, 8) for _ in range(depth)])
        for p in net.parameters():
            p.grad = torch.randn_like(p)
        opt = opt_cls(param_groups(net, 1e-4), lr=0.1, **kw)
        opt.step()  # the first step creates the state
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            opt.step()
        # ops called by the step itself; a foreach op's per-tensor work on the CPU is nested under it
        return sum(1 for e in prof.events() if e.name.startswith("aten::") and e.cpu_parent is not None
                   and e.cpu_parent.name.startswith("Optimizer.step#"))

    for opt_cls, kw in ((LARS, {"momentum": 0.9}), (LARS, {"momentum": 0.9, "clip": True}), (LAMB, {})):
        shallow, deep = top_level_ops(2, opt_cls, **kw), top_level_ops(40, opt_cls, **kw)  # 40 layers: one CPU run
        assert 0 < shallow == deep < 60, (opt_cls.__name__, kw, shallow, deep)


def test_cpu_runs_stay_under_the_cache_budget_in_order():
    net = nn.Sequential(nn.Linear(256, 256), nn.Linear(256, 1024), nn.Linear(1024, 8))  # 256 KiB, 1 MiB, 32 KiB weights
    for p in net.parameters():
        p.grad = torch.zeros_like(p)
    runs = optim._buckets(list(net.parameters()))
    assert [p for run in runs for p in run] == list(net.parameters())  # every parameter once, in order
    nbytes = [sum(p.numel() * 4 for p in run) for run in runs]
    assert all(b <= optim.CPU_BUCKET_BYTES or len(run) == 1 for b, run in zip(nbytes, runs)), nbytes
    assert len(runs) == 3, nbytes  # [w0 b0], [w1 alone: 1 MiB], [b1 w2 b2]
