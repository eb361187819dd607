"""Optimizers for large-batch training: parameter groups, LARS/LARC, LAMB, and the one factory.

- `param_groups`: BatchNorm/LayerNorm/GroupNorm parameters and biases get no weight decay and no
  layer-wise adaptation (Goyal et al. 2017; MLPerf's LARS ``skip_list=['batch_normalization',
  'bias']``; excluding them is worth 1-2 points top-1 at batch 2k-16k).
- `LARS`: layer-wise adaptive rate scaling, You, Gitman, Ginsburg 2017 (arXiv 1708.03888);
  ``clip=True`` is LARC (NVIDIA apex's clipping variant).
- `LAMB`: You et al. 2019, "Large Batch Optimization for Deep Learning: Training BERT in 76
  minutes" (arXiv 1904.00962), Algorithm 2 with Adam's bias correction.
- `build_optimizer`: ``optim.name`` in sgd, adamw, lars, larc, lamb; ``optim.impl = "apex"``
  swaps in apex's FusedLAMB / LARC when apex imports.

The training loop sets ``group["lr"]`` of every group at every step from the schedule, so no
group carries its own lr multiplier: the adaptation lives inside the optimizers' steps.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Hashable, Iterable
from typing import Any

import torch
from torch import nn

from bigbatch.config import OptimConfig
from bigbatch.errors import ConfigError

# Parameters of these layers are scale/shift terms, not weights to decay or adapt.
NORM_LAYERS: tuple[type[nn.Module], ...] = (
    nn.modules.batchnorm._NormBase,  # BatchNorm1d/2d/3d, SyncBatchNorm, InstanceNorm*
    nn.LayerNorm,
    nn.GroupNorm,
    *((nn.RMSNorm,) if hasattr(nn, "RMSNorm") else ()),
)

APEX_INSTALL = (
    "apex is not installed; install NVIDIA apex with its CUDA extensions (pip install -v --no-build-isolation "
    "--config-settings '--build-option=--cpp_ext' --config-settings '--build-option=--cuda_ext' "
    "git+https://github.com/NVIDIA/apex), use an NVIDIA PyTorch container, or set optim.impl = \"torch\""
)


def param_groups(model: nn.Module, weight_decay: float, exclude_bn_bias: bool = True) -> list[dict[str, Any]]:
    """Split the trainable parameters of `model` into optimizer groups.

    With `exclude_bn_bias`, parameters of normalisation layers and every parameter with
    ``ndim <= 1`` (biases, gains) go into a group with ``weight_decay = 0`` and
    ``lars_adapt = False``; the rest into a group with `weight_decay` and ``lars_adapt = True``.
    Without it, one group holds everything (decayed and adapted). Empty groups are left out;
    a parameter shared between modules appears once.
    """
    norm_params = {id(p) for m in model.modules() if isinstance(m, NORM_LAYERS) for p in m.parameters(recurse=False)}
    decay: list[nn.Parameter] = []
    no_decay: list[nn.Parameter] = []
    seen: set[int] = set()
    for p in model.parameters():  # deduplicates shared parameters itself; `seen` guards the contract
        if not p.requires_grad or id(p) in seen:
            continue
        seen.add(id(p))
        if exclude_bn_bias and (id(p) in norm_params or p.ndim <= 1):
            no_decay.append(p)
        else:
            decay.append(p)
    groups = [
        {"params": decay, "weight_decay": weight_decay, "lars_adapt": True},
        {"params": no_decay, "weight_decay": 0.0, "lars_adapt": False},
    ]
    return [g for g in groups if g["params"]]


def _trust_ratio(w_norm: torch.Tensor, u_norm: torch.Tensor, ratio: torch.Tensor) -> torch.Tensor:
    """`ratio` where both norms are positive, else 1 (the zero-norm guard of LARS and LAMB).

    torch.where keeps it on the device: no host sync per parameter.
    """
    return torch.where((w_norm > 0) & (u_norm > 0), ratio, torch.ones_like(ratio))


def _norms(tensors: list[torch.Tensor]) -> torch.Tensor:
    """The L2 norm of every tensor, as one vector: one multi-tensor kernel, no host sync."""
    return torch.stack(torch._foreach_norm(tensors))


def _evaluate(closure: Callable[[], float] | None):
    """The optimizer-closure convention: re-evaluate the loss with gradients on, if given."""
    if closure is None:
        return None
    with torch.enable_grad():
        return closure()


CPU_BUCKET_BYTES = 1 << 20
"""On the CPU a multi-tensor op runs tensor by tensor, so one op over every parameter at once
streams the whole model through memory, once per op: ResNet-50's LARS step took 2x the
per-tensor loop's time that way (137 vs 66 ms, one thread, benchmarks/optimizer_step.py). Runs of
about this many bytes stay in cache across a step's ~10 ops instead (64 ms; a tensor larger than
this is a run of its own)."""


def _buckets(params: list[torch.Tensor], key: Callable[[torch.Tensor], Hashable] = lambda p: None
             ) -> list[list[torch.Tensor]]:
    """The parameters with a gradient, split by (device, dtype, key(p)): a multi-tensor kernel
    takes one device and one dtype (torch's foreach optimizers split the same way). On the CPU
    each such group is cut further into runs of at most CPU_BUCKET_BYTES."""
    groups: dict[Hashable, list[torch.Tensor]] = {}
    for p in params:
        if p.grad is None:
            continue
        if p.grad.is_sparse:
            raise RuntimeError("LARS and LAMB do not support sparse gradients")
        groups.setdefault((p.device, p.dtype, key(p)), []).append(p)
    out = []
    for (device, _, _), group in groups.items():
        if device.type != "cpu":
            out.append(group)
            continue
        run, size = [], 0
        for p in group:
            nbytes = p.numel() * p.element_size()
            if run and size + nbytes > CPU_BUCKET_BYTES:
                out.append(run)
                run, size = [], 0
            run.append(p)
            size += nbytes
        out.append(run)
    return out


class LARS(torch.optim.Optimizer):
    """Layer-wise Adaptive Rate Scaling (You, Gitman, Ginsburg 2017, arXiv 1708.03888).

    Per parameter tensor w with gradient g, at global lr gamma (the group's ``lr``):

        trust  = eta * |w| / (|g| + beta * |w| + eps)       1 when |w| = 0 or |g| = 0
        v     <- m * v + gamma * trust * (g + beta * w)      (paper, eq. in Algorithm 1)
        w     <- w - v                                       (nesterov: w - (gamma*trust*(g+beta*w) + m*v))

    with eta = `trust_coefficient` and beta = `weight_decay` (folded into the update, as in the
    paper). ``clip=True`` is LARC (NVIDIA apex): the per-layer lr gamma * trust is replaced by
    gamma * min(trust / gamma, 1) = min(trust, gamma), so the adaptation can only lower the lr.
    A group with ``lars_adapt = False`` (BatchNorm parameters, biases) takes trust = 1: plain
    momentum SGD in the same form. The momentum buffer holds lr-scaled steps, as in the paper.

    The step is multi-tensor: every parameter of a group (per device and dtype; on the CPU, per
    cache-sized run, `CPU_BUCKET_BYTES`) goes through each ``torch._foreach_*`` op at once, and
    the trust ratios of all layers are one vector, so on a GPU a step is a few dozen kernels
    whatever the number of layers, with no host sync. The operations are those of the
    per-tensor formulas above, in the same order (bitwise the same results on the CPU).

    Args:
        params: parameters or param groups (groups may set ``lars_adapt``; default True).
        lr: global learning rate gamma (the loop overwrites it every step from the schedule).
        momentum: m, in [0, 1).
        weight_decay: beta, >= 0.
        trust_coefficient: eta, > 0 (paper and MLPerf: 0.001).
        eps: added to the trust-ratio denominator, >= 0 (MLPerf 0, timm 1e-8).
        clip: LARC clipping.
        nesterov: Nesterov momentum (needs momentum > 0).
    """

    def __init__(self, params: Iterable, lr: float, momentum: float = 0.9, weight_decay: float = 0.0,
                 trust_coefficient: float = 0.001, eps: float = 0.0, clip: bool = False, nesterov: bool = False):
        if not lr >= 0.0:
            raise ValueError(f"LARS: lr must be >= 0, got {lr}")
        if not 0.0 <= momentum < 1.0:
            raise ValueError(f"LARS: momentum must be in [0, 1), got {momentum}")
        if not weight_decay >= 0.0:
            raise ValueError(f"LARS: weight_decay must be >= 0, got {weight_decay}")
        if not trust_coefficient > 0.0:
            raise ValueError(f"LARS: trust_coefficient must be > 0, got {trust_coefficient}")
        if not eps >= 0.0:
            raise ValueError(f"LARS: eps must be >= 0, got {eps}")
        if nesterov and momentum == 0.0:
            raise ValueError("LARS: nesterov needs momentum > 0")
        defaults = dict(lr=lr, momentum=momentum, weight_decay=weight_decay, trust_coefficient=trust_coefficient,
                        eps=eps, clip=clip, nesterov=nesterov, lars_adapt=True)
        super().__init__(params, defaults)

    @torch.no_grad()
    def step(self, closure: Callable[[], float] | None = None):
        loss = _evaluate(closure)
        for group in self.param_groups:
            # parameters whose momentum buffer exists apart from those taking their first step
            for params in _buckets(group["params"], lambda p: "momentum_buffer" in self.state[p]):
                self._step(group, params)
        return loss

    def _step(self, group: dict[str, Any], params: list[torch.Tensor]) -> None:
        lr, m, wd = group["lr"], group["momentum"], group["weight_decay"]
        grads = [p.grad for p in params]
        scale: float | list[torch.Tensor] = lr
        if group["lars_adapt"]:
            w_norm, g_norm = _norms(params), _norms(grads)
            trust = group["trust_coefficient"] * w_norm / (g_norm + wd * w_norm + group["eps"])
            if group["clip"]:  # LARC: gamma * min(trust / gamma, 1); lr 0 = no step
                trust = torch.clamp(trust / lr, max=1.0) if lr > 0 else torch.ones_like(trust)
            scale = (lr * _trust_ratio(w_norm, g_norm, trust)).unbind(0)  # one 0-dim tensor per layer
        update = torch._foreach_add(grads, params, alpha=wd) if wd != 0 else torch._foreach_mul(grads, 1.0)
        torch._foreach_mul_(update, scale)
        if m != 0:
            if "momentum_buffer" not in self.state[params[0]]:  # a bucket is all-new or all-old
                bufs = torch._foreach_mul(update, 1.0)  # v_1 = the first update, as a copy
                for p, buf in zip(params, bufs):
                    self.state[p]["momentum_buffer"] = buf
            else:
                bufs = [self.state[p]["momentum_buffer"] for p in params]
                torch._foreach_mul_(bufs, m)
                torch._foreach_add_(bufs, update)
            if group["nesterov"]:
                torch._foreach_add_(update, bufs, alpha=m)
            else:
                update = bufs
        torch._foreach_sub_(params, update)


class LAMB(torch.optim.Optimizer):
    """LAMB (You et al. 2019, arXiv 1904.00962, Algorithm 2), with Adam's bias correction.

    Per parameter tensor w with gradient g, step t (from 1), group lr gamma:

        m <- b1 * m + (1 - b1) * g            v <- b2 * v + (1 - b2) * g^2
        r  = (m / (1 - b1^t)) / (sqrt(v / (1 - b2^t)) + eps)
        u  = r + wd * w
        trust = |w| / |u|                     1 when |w| = 0 or |u| = 0 (phi = identity)
        w <- w - gamma * trust * u

    A group with ``lars_adapt = False`` (BatchNorm parameters, biases) takes trust = 1, i.e.
    AdamW with decoupled weight decay (their group has weight decay 0).

    Multi-tensor like `LARS`: the parameters of a group that share device, dtype and step count t
    (on the CPU, a cache-sized run of them) go through each ``torch._foreach_*`` op together, the
    trust ratios as one vector.
    """

    def __init__(self, params: Iterable, lr: float, betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-6,
                 weight_decay: float = 0.0):
        if not lr >= 0.0:
            raise ValueError(f"LAMB: lr must be >= 0, got {lr}")
        if not all(0.0 <= b < 1.0 for b in betas) or len(betas) != 2:
            raise ValueError(f"LAMB: betas must be two numbers in [0, 1), got {betas}")
        if not eps > 0.0:
            raise ValueError(f"LAMB: eps must be > 0, got {eps}")
        if not weight_decay >= 0.0:
            raise ValueError(f"LAMB: weight_decay must be >= 0, got {weight_decay}")
        super().__init__(params, dict(lr=lr, betas=tuple(betas), eps=eps, weight_decay=weight_decay, lars_adapt=True))

    @torch.no_grad()
    def step(self, closure: Callable[[], float] | None = None):
        loss = _evaluate(closure)
        for group in self.param_groups:
            for p in group["params"]:
                state = self.state[p]
                if p.grad is not None and not state:
                    state["step"] = 0
                    state["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                    state["exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)
            # the step count t sets the bias corrections: a bucket shares it (normally all do)
            for params in _buckets(group["params"], lambda p: self.state[p]["step"]):
                self._step(group, params)
        return loss

    def _step(self, group: dict[str, Any], params: list[torch.Tensor]) -> None:
        b1, b2 = group["betas"]
        wd = group["weight_decay"]
        grads = [p.grad for p in params]
        states = [self.state[p] for p in params]
        for state in states:
            state["step"] += 1
        t = states[0]["step"]
        m, v = [s["exp_avg"] for s in states], [s["exp_avg_sq"] for s in states]
        torch._foreach_lerp_(m, grads, 1 - b1)  # m <- b1 m + (1 - b1) g, one pass
        torch._foreach_mul_(v, b2)
        torch._foreach_addcmul_(v, grads, grads, value=1 - b2)
        # r = (m / bc1) / (sqrt(v / bc2) + eps) = c m / (sqrt(v) + eps sqrt(bc2)) with c = sqrt(bc2) / bc1:
        # the bias corrections become two scalars, and u is built in place in the one buffer this
        # step allocates (a fresh buffer costs more than several passes over it on the CPU)
        bc1, bc2_sqrt = 1 - b1**t, math.sqrt(1 - b2**t)
        update = torch._foreach_sqrt(v)
        torch._foreach_add_(update, group["eps"] * bc2_sqrt)
        torch._foreach_reciprocal_(update)
        torch._foreach_mul_(update, m)
        torch._foreach_mul_(update, bc2_sqrt / bc1)
        if wd != 0:
            torch._foreach_add_(update, params, alpha=wd)
        if group["lars_adapt"]:
            w_norm, u_norm = _norms(params), _norms(update)
            step = -group["lr"] * _trust_ratio(w_norm, u_norm, w_norm / u_norm)
            # w <- w - gamma * trust * u, the per-layer scalars as tensor1: pytorch/pytorch#172731
            # gives CUDA's foreach addcmul a fused path for 0-dim tensor1 (as tensor2 they fall
            # back to one kernel per tensor)
            torch._foreach_addcmul_(params, step.unbind(0), update)
        else:
            torch._foreach_add_(params, update, alpha=-group["lr"])


def _apex_optimizer(cfg: OptimConfig, groups: list[dict[str, Any]], lr: float, on_gpu: bool):
    """apex's FusedLAMB or LARC (one import, only when optim.impl = "apex")."""
    try:
        import apex  # noqa: F401
    except ImportError:
        raise ConfigError("optim.impl", APEX_INSTALL) from None
    if cfg.name not in ("lamb", "lars", "larc"):
        raise ConfigError("optim.impl", f"apex is used for lamb, lars and larc; for {cfg.name} set optim.impl = \"torch\"")
    if not on_gpu:
        raise ConfigError("optim.impl", "apex's optimizers run on CUDA tensors; on the CPU set optim.impl = \"torch\"")
    if cfg.name == "lamb":
        from apex.optimizers import FusedLAMB

        # use_nvlamb=False: apex skips the trust ratio where weight decay is 0, which is exactly
        # our lars_adapt=False group (BatchNorm/bias, weight decay 0).
        return FusedLAMB(groups, lr=lr, betas=tuple(cfg.betas), eps=cfg.eps or 1e-6, weight_decay=cfg.weight_decay,
                         bias_correction=True, use_nvlamb=not cfg.exclude_bn_bias,
                         max_grad_norm=float("inf"))  # apex clips the global grad norm at 1.0 by default; ours does not
    if cfg.exclude_bn_bias:
        raise ConfigError("optim.impl", "apex.parallel.LARC adapts every parameter, BatchNorm and biases included; "
                          "use optim.impl = \"torch\" (bigbatch's LARS honours optim.exclude_bn_bias) "
                          "or set optim.exclude_bn_bias = false")
    from apex.parallel import LARC

    sgd = torch.optim.SGD(groups, lr=lr, momentum=cfg.momentum, nesterov=cfg.nesterov, weight_decay=cfg.weight_decay)
    return LARC(sgd, trust_coefficient=cfg.trust_coefficient, clip=cfg.name == "larc", eps=cfg.eps)


def build_optimizer(cfg: OptimConfig, model: nn.Module, lr: float) -> torch.optim.Optimizer:
    """The optimizer named by ``cfg.name`` over `param_groups(model, ...)`, starting at `lr`.

    sgd (momentum, nesterov), adamw, lars, larc (= LARS with clip), lamb. For adamw and lamb,
    ``optim.eps`` is Adam's epsilon; its default 0 (the LARS/MLPerf value) means 1e-8 for adamw
    (torch's default) and 1e-6 for lamb (You et al. 2019), since 0 divides by zero wherever a
    gradient coordinate is 0.
    """
    if cfg.nesterov and cfg.name in ("sgd", "lars", "larc") and cfg.momentum == 0:
        raise ConfigError("optim.nesterov", "needs optim.momentum > 0")
    groups = param_groups(model, cfg.weight_decay, cfg.exclude_bn_bias)
    if not groups:
        raise ConfigError("model.name", "the model has no trainable parameters")
    if cfg.impl == "apex":
        on_gpu = all(p.is_cuda for g in groups for p in g["params"])
        return _apex_optimizer(cfg, groups, lr, on_gpu)
    if cfg.name == "sgd":
        return torch.optim.SGD(groups, lr=lr, momentum=cfg.momentum, nesterov=cfg.nesterov, weight_decay=cfg.weight_decay)
    if cfg.name == "adamw":
        return torch.optim.AdamW(groups, lr=lr, betas=tuple(cfg.betas), eps=cfg.eps or 1e-8, weight_decay=cfg.weight_decay)
    if cfg.name in ("lars", "larc"):
        return LARS(groups, lr=lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay,
                    trust_coefficient=cfg.trust_coefficient, eps=cfg.eps, clip=cfg.name == "larc", nesterov=cfg.nesterov)
    if cfg.name == "lamb":
        return LAMB(groups, lr=lr, betas=tuple(cfg.betas), eps=cfg.eps or 1e-6, weight_decay=cfg.weight_decay)
    raise ConfigError("optim.name", f"expected one of sgd, adamw, lars, larc, lamb; got {cfg.name!r}")
