"""B_simple and B_noise of the loss that is trained, with standard errors: `train_mode_noise`.

K independent gradients of the training micro-batch size b, BatchNorm in train mode, give
unbiased |G|^2 and tr(Sigma) (McCandlish, Kaplan, Amodei 2018, appendix A); with Hessian-vector
products on an independent batch also G^T H G and tr(H Sigma), hence B_noise (section 2.2).
Every value carries a jackknife standard error (measure.jackknife). K can grow until the
estimate is resolved (b K >= 10 B_simple, or a relative standard error below 20 %) within a
budget, and an estimate whose denominator is not positive is reported as a lower bound with its
reason instead of a value.
"""

from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass, field
from typing import Callable, Iterable

import torch

from bigbatch.measure.jackknife import GROUPS, GradientSums, t_quantile
from bigbatch.measure.modes import has_batch_norm, measuring
from bigbatch.measure.sharpness import HessianOperator

TARGET_RSE = 0.2  # stop growing K once B_simple's standard error is this fraction of it
RESOLVED = 10.0  # ... or once b K >= RESOLVED x B_simple: |G|^2 then carries ~1/10 of its noise floor
LEVEL = 0.95


@dataclass
class NoiseMeasurement:
    """What `train_mode_noise` measured; `to_dict` gives the JSON fields."""

    micro_batch: int  # b: the examples in each gradient (the BatchNorm micro-batch)
    samples: int  # K: independent micro-batch gradients
    grad_sq: float  # |G|^2, unbiased
    trace_sigma: float  # tr(Sigma), per-example units: b x tr Cov(G_b)
    g_h_g: float | None = None  # G^T H G, unbiased given H
    trace_h_sigma: float | None = None  # tr(H Sigma), per-example units
    hessian_examples: int = 0  # examples in the independent Hessian batch(es) (0: B_noise not measured)
    hessian_samples: int = 0  # M: gradients that got an HVP
    bn_mode: str = "train"  # "train": batch statistics of each micro-batch; "none": no BatchNorm
    se: dict = field(default_factory=dict)  # jackknife standard errors, keyed like the values
    groups: int = GROUPS  # J: the jackknife's groups (its standard errors have J - 1 degrees of freedom)
    stopped: str = "all batches"  # why K stopped growing
    gradients: torch.Tensor | None = field(default=None, repr=False)  # the first `keep` gradients (K', P)

    @property
    def b_simple(self) -> float | None:
        """tr(Sigma)/|G|^2; None when the |G|^2 estimate is not positive (see `bound`)."""
        return self.trace_sigma / self.grad_sq if self.grad_sq > 0 else None

    @property
    def b_noise(self) -> float | None:
        """tr(H Sigma)/(G^T H G); None when not measured or G^T H G is not positive (see `bound`)."""
        if self.g_h_g is None or self.trace_h_sigma is None or self.g_h_g <= 0:
            return None
        return self.trace_h_sigma / self.g_h_g

    def interval(self, name: str) -> list[float | None] | None:
        """The `LEVEL` interval of "b_simple" or "b_noise": value x exp(-+ t_{J-1} SE / value)
        (symmetric in log B: a ratio of noisy estimates is skewed upward; over 200 draws of
        tests/unit/test_noise_se.py the log interval covered 95-96 %, value -+ t SE 84-92 %). When
        the denominator's own interval reaches zero the data cannot exclude a zero gradient: the
        interval is then [the one-sided lower bound (`bound`), None (unbounded)]."""
        value, se = getattr(self, name), self.se.get(name)
        lower = self.bound(name)
        if lower is None:
            return None
        den = "grad_sq" if name == "b_simple" else "g_h_g"
        q = t_quantile((1 + LEVEL) / 2, self.groups - 1)
        den_value, den_se = getattr(self, den), self.se.get(den)
        if value is None or se is None or den_se is None or den_value - q * den_se <= 0:
            return [lower["value"], None]
        spread = math.exp(q * se / value)
        return [value / spread, value * spread]

    def bound(self, name: str) -> dict | None:
        """A one-sided `LEVEL` lower bound of "b_simple" or "b_noise" with the reason it is needed:
        the numerator's lower confidence limit over the denominator's upper one (each one-sided
        at `LEVEL`; e.g. (tr(Sigma) - t SE) / (|G|^2 + t SE)). A ratio of noisy estimates is most
        unreliable where the denominator nears zero, and a non-positive
        |G|^2 or G^T H G estimate says the gradient is below the noise floor of b K examples:
        B is then large, and only a lower bound is known. None when not measured."""
        den, num = ("grad_sq", "trace_sigma") if name == "b_simple" else ("g_h_g", "trace_h_sigma")
        d, n = getattr(self, den), getattr(self, num)
        if d is None or n is None:
            return None
        q = t_quantile(LEVEL, self.groups - 1)
        se_d, se_n = self.se.get(den), self.se.get(num, 0.0)
        upper = d + q * se_d if se_d is not None else (d if d > 0 else None)
        low_n = n - q * se_n  # the numerator's lower limit: tr(H Sigma) from M HVPs is noisy too
        value = low_n / upper if upper is not None and upper > 0 and low_n > 0 else 0.0
        if d > 0:
            resolved = se_d is not None and d - t_quantile((1 + LEVEL) / 2, self.groups - 1) * se_d > 0
            se_text = f"SE {se_d:.3g}" if se_d is not None else "no SE: a leave-one-group-out estimate was not positive"
            reason = "resolved" if resolved else (f"{den} {d:.3g} is within its noise ({se_text}): "
                                                  f"{name} > {value:.4g}, upper end unbounded")
        else:
            reason = (f"{den} estimate {d:.3g} <= 0 at b K = {self.micro_batch * self.samples} examples: "
                      f"the gradient is below the noise floor; {name} > {value:.4g}")
        return {"value": value, "reason": reason}

    def to_dict(self) -> dict:
        out = {k: v for k, v in asdict(self).items() if k not in ("gradients", "se")}
        for name in ("b_simple", "b_noise"):
            out[name] = getattr(self, name)
            out[f"{name}_interval"] = self.interval(name)
            b = self.bound(name)
            out[f"{name}_lower_bound"] = b["value"] if b else None
            out[f"{name}_reason"] = b["reason"] if b else None
        out.update({f"{k}_se": v for k, v in self.se.items()})
        return out


def train_mode_noise(
    model: torch.nn.Module,
    loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
    batches: Iterable[tuple[torch.Tensor, torch.Tensor]],
    hessian: HessianOperator | None = None,
    keep: int = 0,
    hessian_samples: int | None = None,
    *,
    min_samples: int | None = None,
    max_samples: int | None = None,
    budget_s: float | None = None,
    groups: int = GROUPS,
    hessian_batches: Iterable[tuple[torch.Tensor, torch.Tensor]] | None = None,
) -> NoiseMeasurement:
    """B_simple (and with `hessian`, B_noise) of the training loss from K independent
    micro-batch gradients, with jackknife standard errors.

    `batches`: independent micro-batches (x_k, y_k), each of the training micro-batch size b,
    drawn as training draws them (augmentation included). Each gradient G_k is taken in train
    mode: BatchNorm normalises the micro-batch by its own statistics, which is the loss SGD
    follows. G = E[G_k] is the gradient of that expected loss and Cov(G_k) = Sigma/b defines the
    per-example-equivalent covariance Sigma, so the noise of any batch built from micro-batches
    of b (accumulation, data parallelism) is Sigma/B, as McCandlish et al. 2018 assume. Unbiased
    estimators (the mean gradient Gbar over K; E|G_B|^2 = |G|^2 + tr(Sigma)/B at B = b and B = bK):

        tr(Sigma) = b * sum_k |G_k - Gbar|^2 / (K - 1)
        |G|^2     = |Gbar|^2 - tr(Sigma) / (b K)

    `hessian`: a `HessianOperator` of the same training loss on a batch independent of the K
    micro-batches (so E[H] is the Hessian and does not correlate with the G_k). Given H,
    E[G_k^T H G_k] = G^T H G + tr(H Sigma)/b (McCandlish et al. 2018, section 2.2), and with
    HVPs of the first M = `hessian_samples` gradients (all by default), each dotted with every
    gradient (E[G_l^T H G_a] = G^T H G for l != a):

        G^T H G     = sum_{a <= M} sum_{l != a} G_l^T H G_a / (M (K - 1))
        tr(H Sigma) = b * (sum_{a <= M} G_a^T H G_a / M - G^T H G)

    and B_noise = tr(H Sigma)/(G^T H G) (at M = K the same pair as for tr(Sigma) and |G|^2).

    `hessian_batches` instead of `hessian`: each HVP gradient G_a gets its own Hessian H_a, of one
    micro-batch drawn independently of everything else (`HessianOperator` on the next batch).
    E[H_a] = H, the Hessian of the training loss, and H_a is independent of every G_l, so the
    formulas above stay unbiased with H_a in place of H. An HVP on one micro-batch costs a few
    passes instead of a few per micro-batch of a large fixed Hessian batch, so many more
    gradients get one for the same time, and the Hessian's own sampling noise is averaged over
    them instead of frozen into one draw (the jackknife sees it: (G_a, H_a) is one unit).

    Growth: with `max_samples`, at least `min_samples` gradients are taken (default: `groups`),
    then after every `groups` more the estimate is checked and K stops growing once b K >= 10
    B_simple or B_simple's standard error is below 20 % of it (`stopped` says which), or at
    `max_samples` or after `budget_s` seconds ("budget"). Without `max_samples` every batch is
    used. Sums in float64; memory (J + M) parameter-sized vectors plus `keep` stored gradients
    (float32; for the tail index). Mode, BatchNorm buffers and RNG are restored afterwards.
    """
    params = [p for p in model.parameters() if p.requires_grad]
    bn_mode = "train" if has_batch_norm(model) else "none"
    kept: list[torch.Tensor] = []
    sums: GradientSums | None = None
    floor = groups if min_samples is None else max(2, min_samples)
    stopped = "all batches"
    start = time.perf_counter()
    h_iter = iter(hessian_batches) if hessian_batches is not None else None
    h_examples = 0
    with measuring(model, "train"):
        for x, y in batches:
            if sums is None:
                sums = GradientSums(x.shape[0], groups)
            elif x.shape[0] != sums.micro_batch:
                raise ValueError(f"every micro-batch must have the same size b; got {x.shape[0]} after {sums.micro_batch}")
            loss = loss_fn(model(x), y)
            grads = torch.autograd.grad(loss, params, allow_unused=True)
            g = torch.cat([(gi if gi is not None else torch.zeros_like(p)).reshape(-1) for gi, p in zip(grads, params)])
            if len(kept) < keep:
                kept.append(g.detach().float())
            g = g.detach().double()
            with_hvp = (hessian is not None or h_iter is not None) and (
                hessian_samples is None or sums.hessian_samples < hessian_samples)
            op = hessian
            if with_hvp and h_iter is not None:
                hx, hy = next(h_iter)
                op = HessianOperator(model, loss_fn, hx, hy)
                h_examples += op.examples
            sums.add(g, op.hvp(g) if with_hvp else None)
            if max_samples is not None and sums.count >= floor and sums.count % groups == 0:
                stopped = _stop_reason(sums, max_samples, budget_s, time.perf_counter() - start)
                if stopped:
                    break
    if sums is None or sums.count < 2:
        raise ValueError(f"need at least 2 micro-batch gradients, got {0 if sums is None else sums.count}")
    values, se = sums.estimates()
    out = NoiseMeasurement(micro_batch=sums.micro_batch, samples=sums.count, grad_sq=values["grad_sq"],
                           trace_sigma=values["trace_sigma"], g_h_g=values["g_h_g"],
                           trace_h_sigma=values["trace_h_sigma"], bn_mode=bn_mode, groups=groups,
                           se={k: v for k, v in se.items() if v is not None and values[k] is not None},
                           stopped=stopped or "all batches", gradients=torch.stack(kept) if kept else None)
    if hessian is not None or h_iter is not None:
        out.hessian_examples = hessian.examples if hessian is not None else h_examples
        out.hessian_samples = sums.hessian_samples
    return out


def _stop_reason(sums: GradientSums, max_samples: int, budget_s: float | None, elapsed: float) -> str:
    """Why K should stop growing now ("" = keep going)."""
    values, se = sums.estimates()
    b_simple, b_se = values["b_simple"], se["b_simple"]
    if b_simple is not None and sums.micro_batch * sums.count >= RESOLVED * b_simple:
        return f"b K >= {RESOLVED:g} B_simple"
    if b_simple is not None and b_se is not None and b_se <= TARGET_RSE * b_simple:
        return f"relative SE of B_simple <= {TARGET_RSE:g}"
    if sums.count >= max_samples or (budget_s is not None and elapsed >= budget_s):
        return "budget"
    return ""

