"""Gradient noise scales B_simple = tr(Sigma)/|G|^2 and B_noise = tr(H Sigma)/(G^T H G)
(McCandlish, Kaplan, Amodei 2018, section 2.2; estimators as in appendix A).

Three pieces:

- `two_batch_estimate` + `GNSEstimator`: the online estimate from the squared norms of a
  gradient at two batch sizes (McCandlish et al. 2018, appendix A.1). Under data parallelism the
  small batch is one rank's local batch and the big batch the global batch, so both norms come
  almost for free; in one process the micro-batches of gradient accumulation are the small batches.
- `train_mode_noise`: the reference on the loss that is trained. K independent gradients of the
  training micro-batch size b, BatchNorm in train mode (each micro-batch normalised by its own
  statistics, as SGD sees it), give unbiased |G|^2 and tr(Sigma); with Hessian-vector products on
  an independent batch also G^T H G and tr(H Sigma), hence B_noise.
- `per_sample_b_simple`: the exact value from per-example gradients (torch.func), for models
  without batch-dependent layers (a BatchNorm model is refused unless eval mode is asked for:
  a per-example gradient in eval mode is the gradient of a different loss).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import Callable, Iterable

import torch

from bigbatch.measure.modes import has_batch_norm, measuring
from bigbatch.measure.sharpness import HessianOperator


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


@dataclass
class NoiseMeasurement:
    """What `train_mode_noise` measured; `to_dict` gives the JSON fields."""

    micro_batch: int  # b: the examples in each gradient (the training micro-batch)
    samples: int  # K: independent micro-batch gradients
    grad_sq: float  # |G|^2, unbiased
    trace_sigma: float  # tr(Sigma), per-example units: b x tr Cov(G_b)
    g_h_g: float | None = None  # G^T H G, unbiased given H
    trace_h_sigma: float | None = None  # tr(H Sigma), per-example units
    hessian_examples: int = 0  # examples in the independent Hessian batch (0: B_noise not measured)
    hessian_samples: int = 0  # M: gradients that got an HVP
    bn_mode: str = "train"  # "train": batch statistics of each micro-batch; "none": no BatchNorm
    gradients: torch.Tensor | None = field(default=None, repr=False)  # the first `keep` gradients (K', P)

    @property
    def b_simple(self) -> float | None:
        """tr(Sigma)/|G|^2 (None when the |G|^2 estimate is not positive: noise dominates)."""
        return self.trace_sigma / self.grad_sq if self.grad_sq > 0 else None

    @property
    def b_noise(self) -> float | None:
        """tr(H Sigma)/(G^T H G) (None when not measured or G^T H G is not positive)."""
        if self.g_h_g is None or self.trace_h_sigma is None or self.g_h_g <= 0:
            return None
        return self.trace_h_sigma / self.g_h_g

    def to_dict(self) -> dict:
        out = {k: v for k, v in asdict(self).items() if k != "gradients"}
        return {**out, "b_simple": self.b_simple, "b_noise": self.b_noise}


def train_mode_noise(
    model: torch.nn.Module,
    loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
    batches: Iterable[tuple[torch.Tensor, torch.Tensor]],
    hessian: HessianOperator | None = None,
    keep: int = 0,
    hessian_samples: int | None = None,
) -> NoiseMeasurement:
    """B_simple (and with `hessian`, B_noise) of the training loss from K independent
    micro-batch gradients.

    `batches`: K >= 2 independent micro-batches (x_k, y_k), each of the training micro-batch
    size b, drawn as training draws them (augmentation included). Each gradient G_k is taken in
    train mode: BatchNorm normalises the micro-batch by its own statistics, which is the loss SGD
    follows. G = E[G_k] is the gradient of that expected loss and Cov(G_k) = Sigma/b defines the
    per-example-equivalent covariance Sigma, so the noise of any batch built from micro-batches
    of b (accumulation, data parallelism) is Sigma/B, as McCandlish et al. 2018 assume. Unbiased
    estimators (the mean gradient Gbar over K; E|G_B|^2 = |G|^2 + tr(Sigma)/B at B = b and B = bK):

        tr(Sigma) = b * sum_k |G_k - Gbar|^2 / (K - 1)
        |G|^2     = |Gbar|^2 - tr(Sigma) / (b K)

    `hessian`: a `HessianOperator` of the same training loss on a batch independent of the K
    micro-batches (so E[H] is the Hessian and does not correlate with the G_k). Given H,
    E[G_k^T H G_k] = G^T H G + tr(H Sigma)/b (McCandlish et al. 2018, section 2.2: the
    second-order term of the expected loss change), so the same two estimators with H in the
    inner product give

        tr(H Sigma) = b * sum_k (G_k - Gbar)^T H (G_k - Gbar) / (K - 1)
        G^T H G     = Gbar^T H Gbar - tr(H Sigma) / (b K)

    and B_noise = tr(H Sigma)/(G^T H G) (section 2.2; B_simple is its H = I form).

    HVPs cost several backward passes, so only the first M = `hessian_samples` gradients (all
    K by default) get one, and each H G_a is dotted with every gradient: for independent G_a, G_l
    (l != a), E[G_l^T H G_a] = G^T H G and E[G_a^T H G_a] = G^T H G + tr(H Sigma)/b, so

        G^T H G     = sum_{a <= M} sum_{l != a} G_l^T H G_a / (M (K - 1))
        tr(H Sigma) = b * (sum_{a <= M} G_a^T H G_a / M - G^T H G)

    which at M = K is exactly the pair of formulas above. Sums in float64, memory O(parameters)
    plus `keep` stored gradients (float32; for the tail index). Mode, BatchNorm buffers and RNG
    are restored afterwards.
    """
    params = [p for p in model.parameters() if p.requires_grad]
    bn_mode = "train" if has_batch_norm(model) else "none"
    sum_g = sum_hg = None
    sum_sq = sum_ghg = 0.0
    kept: list[torch.Tensor] = []
    count, micro, hvps = 0, None, 0
    with measuring(model, "train"):
        for x, y in batches:
            if micro is None:
                micro = x.shape[0]
            elif x.shape[0] != micro:
                raise ValueError(f"every micro-batch must have the same size b; got {x.shape[0]} after {micro}")
            loss = loss_fn(model(x), y)
            grads = torch.autograd.grad(loss, params, allow_unused=True)
            g = torch.cat([(gi if gi is not None else torch.zeros_like(p)).reshape(-1) for gi, p in zip(grads, params)])
            if len(kept) < keep:
                kept.append(g.detach().float())
            g = g.detach().double()
            sum_g = g.clone() if sum_g is None else sum_g.add_(g)
            sum_sq += float(g @ g)
            if hessian is not None and (hessian_samples is None or hvps < hessian_samples):
                hg = hessian.hvp(g)
                sum_hg = hg.clone() if sum_hg is None else sum_hg.add_(hg)
                sum_ghg += float(g @ hg)
                hvps += 1
            count += 1
    if count < 2:
        raise ValueError(f"need at least 2 micro-batch gradients, got {count}")
    k, b = count, micro
    cov_trace = (sum_sq - float(sum_g @ sum_g) / k) / (k - 1)  # tr Cov(G_b)
    out = NoiseMeasurement(micro_batch=b, samples=k, trace_sigma=b * cov_trace,
                           grad_sq=float(sum_g @ sum_g) / k**2 - cov_trace / k, bn_mode=bn_mode,
                           gradients=torch.stack(kept) if kept else None)
    if hessian is not None:
        m = hvps
        out.g_h_g = (float(sum_g @ sum_hg) - sum_ghg) / (m * (k - 1))
        out.trace_h_sigma = b * (sum_ghg / m - out.g_h_g)
        out.hessian_examples = hessian.examples
        out.hessian_samples = m
    return out
