"""Gradient noise scales B_simple = tr(Sigma)/|G|^2 and B_noise = tr(H Sigma)/(G^T H G)
(McCandlish, Kaplan, Amodei 2018, section 2.2; estimators as in appendix A).

Three pieces:

- `two_batch_estimate` + `GNSEstimator`: the online estimate from the squared norms of a
  gradient at two batch sizes (McCandlish et al. 2018, appendix A.1). Under data parallelism the
  small batch is one rank's local batch and the big batch the global batch, so both norms come
  almost for free; in one process the micro-batches of gradient accumulation are the small batches.
- `train_mode_noise` (measure.train_mode): the reference on the loss that is trained. K
  independent gradients of the training micro-batch size b, BatchNorm in train mode (each
  micro-batch normalised by its own statistics, as SGD sees it), give unbiased |G|^2 and
  tr(Sigma); with Hessian-vector products on an independent batch also G^T H G and tr(H Sigma),
  hence B_noise; each with a jackknife standard error (measure.jackknife).
- `per_sample_b_simple`: the exact value from per-example gradients (torch.func), for models
  without batch-dependent layers (a BatchNorm model is refused unless eval mode is asked for:
  a per-example gradient in eval mode is the gradient of a different loss).
"""

from __future__ import annotations

import math
from typing import Callable

import torch

from bigbatch.measure.modes import has_batch_norm, measuring


def two_batch_estimate(sq_small: float, b_small: float, sq_big: float, b_big: float) -> tuple[float, float]:
    """Unbiased (|G|^2, tr(Sigma)) from |G_small|^2 at batch b_small and |G_big|^2 at batch b_big.

    E|G_B|^2 = |G|^2 + tr(Sigma)/B (McCandlish et al. 2018, eq. A.1), two batch sizes, two unknowns:
      |G|^2  = (b_big |G_big|^2 - b_small |G_small|^2) / (b_big - b_small)
      tr(S)  = (|G_small|^2 - |G_big|^2) / (1/b_small - 1/b_big)
    """
    if not (0 < b_small < b_big):
        raise ValueError(f"need 0 < b_small < b_big, got b_small={b_small}, b_big={b_big}")
    grad_sq = (b_big * sq_big - b_small * sq_small) / (b_big - b_small)
    trace_sigma = (sq_small - sq_big) / (1.0 / b_small - 1.0 / b_big)
    return grad_sq, trace_sigma


class GNSEstimator:
    """Exponential moving averages of |G|^2 and tr(Sigma); `b_simple` is the ratio of the EMAs.

    The ratio of two noisy per-step estimates is biased (and often negative), so, as in the paper,
    each quantity is averaged first and the ratio taken last. The EMAs are bias-corrected like
    Adam's (divide by 1 - decay^n), so the first values are not pulled towards zero.

    `update` takes the squared norms as measured, under an AMP loss scale `scale` (norms scale as
    scale^2); a step whose norms are not finite (an fp16 overflow the GradScaler will skip) is
    skipped here too.
    """

    def __init__(self, decay: float = 0.95):
        if not 0.0 <= decay < 1.0:
            raise ValueError(f"decay must be in [0, 1), got {decay}")
        self.decay = decay
        self.count = 0  # accepted updates
        self.skipped = 0
        self._grad_sq = 0.0
        self._trace_sigma = 0.0

    def update(self, sq_small: float, b_small: float, sq_big: float, b_big: float, scale: float = 1.0) -> bool:
        """Add one measurement; returns False (and changes nothing) when it is not finite."""
        inv = 1.0 / (float(scale) ** 2)
        sq_small, sq_big = float(sq_small) * inv, float(sq_big) * inv
        if not (math.isfinite(sq_small) and math.isfinite(sq_big)):
            self.skipped += 1
            return False
        g, s = two_batch_estimate(sq_small, b_small, sq_big, b_big)
        d = self.decay
        self._grad_sq = d * self._grad_sq + (1.0 - d) * g
        self._trace_sigma = d * self._trace_sigma + (1.0 - d) * s
        self.count += 1
        return True

    def _corrected(self, v: float) -> float | None:
        if self.count == 0:
            return None
        return v / (1.0 - self.decay ** self.count)

    @property
    def grad_sq(self) -> float | None:
        """Bias-corrected EMA of |G|^2 (None before the first update)."""
        return self._corrected(self._grad_sq)

    @property
    def trace_sigma(self) -> float | None:
        """Bias-corrected EMA of tr(Sigma) (None before the first update)."""
        return self._corrected(self._trace_sigma)

    @property
    def b_simple(self) -> float | None:
        """tr(Sigma)/|G|^2 from the EMAs; None while undefined (no data yet, or |G|^2 EMA <= 0)."""
        g, s = self.grad_sq, self.trace_sigma
        if g is None or s is None or g <= 0.0:
            return None
        return s / g

    def metrics(self) -> dict[str, float]:
        """The metrics.jsonl keys (only those defined so far)."""
        out = {}
        if self.grad_sq is not None:
            out["gns/grad_sq"] = self.grad_sq
            out["gns/trace_sigma"] = self.trace_sigma
        if self.b_simple is not None:
            out["gns/b_simple"] = self.b_simple
        return out

    def state_dict(self) -> dict[str, float]:
        return {"decay": self.decay, "count": self.count, "skipped": self.skipped,
                "grad_sq": self._grad_sq, "trace_sigma": self._trace_sigma}

    def load_state_dict(self, state: dict[str, float]) -> None:
        self.decay = float(state["decay"])
        self.count = int(state["count"])
        self.skipped = int(state["skipped"])
        self._grad_sq = float(state["grad_sq"])
        self._trace_sigma = float(state["trace_sigma"])


def per_sample_stats(
    model: torch.nn.Module,
    loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
    x: torch.Tensor,
    y: torch.Tensor,
    chunk: int = 256,
    eval_batchnorm: bool = False,
) -> tuple[float, float]:
    """Exact (|G|^2, tr(Sigma)) over the examples (x, y) from per-example gradients.

    G is the mean of the per-example gradients g_i; tr(Sigma) = sum_i |g_i - G|^2 / (n - 1), the
    unbiased sample covariance, which is what the two-batch estimator measures when its batches
    are drawn without replacement from these n examples. Computed in chunks (sums of g_i and
    |g_i|^2 in float64), so memory is chunk x parameters, not n x parameters.

    A model with BatchNorm has no per-example gradient of its training loss (a batch of one has
    no batch statistics): it is refused (use `train_mode_noise`), unless `eval_batchnorm=True`
    asks for the eval-mode value (running statistics) by name. Other models run in their
    current mode; buffers and the RNG are restored.
    """
    if has_batch_norm(model) and not eval_batchnorm:
        raise ValueError("the model has BatchNorm: per-example gradients would be of the eval-mode loss, not the "
                         "trained one; use train_mode_noise (micro-batches), or pass eval_batchnorm=True to ask for it")
    if x.shape[0] < 2:
        raise ValueError("need at least 2 examples")
    mode = "eval" if has_batch_norm(model) else ("train" if model.training else "eval")
    with measuring(model, mode):
        return _per_sample_stats(model, loss_fn, x, y, chunk)


def _per_sample_stats(model, loss_fn, x, y, chunk):
    from torch.func import functional_call, grad, vmap

    n = x.shape[0]
    params = {k: v.detach() for k, v in model.named_parameters() if v.requires_grad}
    buffers = {k: v.detach() for k, v in model.named_buffers()}

    def loss_one(p, xi, yi):
        out = functional_call(model, (p, buffers), (xi.unsqueeze(0),))
        return loss_fn(out, yi.unsqueeze(0))

    per_example = vmap(grad(loss_one), in_dims=(None, 0, 0))
    total = None
    sum_sq = torch.zeros((), dtype=torch.float64, device=x.device)
    for start in range(0, n, chunk):
        g = per_example(params, x[start:start + chunk], y[start:start + chunk])
        flat = torch.cat([v.reshape(v.shape[0], -1) for v in g.values()], dim=1).double()
        s = flat.sum(0)
        total = s if total is None else total + s
        sum_sq += flat.pow(2).sum()
    mean = total / n
    grad_sq = float(mean.pow(2).sum())
    trace_sigma = float((sum_sq - n * mean.pow(2).sum()) / (n - 1))
    return grad_sq, trace_sigma


def per_sample_b_simple(
    model: torch.nn.Module,
    loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
    x: torch.Tensor,
    y: torch.Tensor,
    chunk: int = 256,
    eval_batchnorm: bool = False,
) -> float:
    """Exact B_simple = tr(Sigma)/|G|^2 on (x, y) from per-example gradients (see `per_sample_stats`).

    Exact for the distribution "uniform over these n examples" (what the tests and a full
    in-memory dataset give). When (x, y) is a sample of a larger training set, |mean gradient|^2
    over-estimates |G|^2 by tr(Sigma)/n; subtract it (or use `train_mode_noise`, which does).
    """
    grad_sq, trace_sigma = per_sample_stats(model, loss_fn, x, y, chunk, eval_batchnorm)
    return trace_sigma / grad_sq
