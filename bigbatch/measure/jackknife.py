"""Standard errors of the noise-scale estimates: a delete-a-group jackknife over micro-batch gradients.

`train_mode_noise` (measure.noise) estimates |G|^2, tr(Sigma), G^T H G and tr(H Sigma) from K
independent micro-batch gradients G_k and the HVPs H G_a of the first M of them. Every estimator
is a smooth function of a few sums over the gradients, so a jackknife gives its standard error
and that of the ratios B_simple and B_noise (Efron & Tibshirani 1993, ch. 11; Quenouille's
bias-reducing use is not taken: the estimators are already unbiased). Deleting one gradient at a
time would need every G_k kept (K parameter-sized vectors); instead gradient k goes into group
k mod J (J = `groups`, 16 by default) and the J groups are deleted one at a time. That keeps J
group sums and the M HVPs, (J + M) parameter-sized vectors in float64, and the standard error
has J - 1 degrees of freedom. The first M gradients (those with an HVP) land in M different
groups while M <= J, so every leave-one-group-out estimate still has M - 1 of them.

For a set I of groups (all J, or all but one), with K_I gradients, S_I their sum, Q_I the sum of
their squared norms, A_I the HVP gradients among them (M_I of them), c_a = G_a^T H G_a:

    tr Cov(G_b) = (Q_I - |S_I|^2 / K_I) / (K_I - 1)      tr(Sigma) = b tr Cov(G_b)
    |G|^2       = |S_I|^2 / K_I^2 - tr Cov(G_b) / K_I
    G^T H G     = sum_{a in A_I} (S_I^T H G_a - c_a) / (M_I (K_I - 1))
    tr(H Sigma) = b (sum_{a in A_I} c_a / M_I - G^T H G)

(the formulas of measure.noise.train_mode_noise on the gradients in I). |S_I|^2 and S_I^T H G_a
come from the J x J Gram matrix of the group sums and the J x M matrix of their products with
the HVPs, so every leave-one-out estimate costs a few small sums.
"""

from __future__ import annotations

import math

import torch

GROUPS = 16
FIELDS = ("grad_sq", "trace_sigma", "b_simple", "g_h_g", "trace_h_sigma", "b_noise")


class GradientSums:
    """Group sums of K micro-batch gradients of b examples each (and the HVPs of the first M)."""

    def __init__(self, micro_batch: int, groups: int = GROUPS):
        if groups < 2:
            raise ValueError(f"the jackknife needs at least 2 groups, got {groups}")
        self.micro_batch, self.groups = micro_batch, groups
        self.count = 0
        self._sums: list[torch.Tensor | None] = [None] * groups
        self._sq = [0.0] * groups
        self._counts = [0] * groups
        self._hvps: list[torch.Tensor] = []  # H G_a, float64
        self._c: list[float] = []  # G_a^T H G_a
        self._hvp_group: list[int] = []

    def add(self, g: torch.Tensor, hg: torch.Tensor | None = None) -> None:
        """One gradient (flat, float64) and, when it has one, its HVP H g."""
        j = self.count % self.groups
        self._sums[j] = g.clone() if self._sums[j] is None else self._sums[j].add_(g)
        self._sq[j] += float(g @ g)
        self._counts[j] += 1
        if hg is not None:
            self._hvps.append(hg)
            self._c.append(float(g @ hg))
            self._hvp_group.append(j)
        self.count += 1

    @property
    def hessian_samples(self) -> int:
        return len(self._hvps)

    def _tables(self) -> tuple[torch.Tensor, torch.Tensor | None]:
        used = [s for s in self._sums if s is not None]
        sums = torch.stack(used)
        gram = sums @ sums.T
        cross = sums @ torch.stack(self._hvps).T if self._hvps else None
        return gram, cross

    def estimates(self) -> tuple[dict[str, float | None], dict[str, float | None]]:
        """(the estimates on all K gradients, their jackknife standard errors). A ratio whose
        denominator is not positive is None, and so is its standard error when a leave-one-out
        denominator is not positive (the ratio is then not a smooth function of the sums)."""
        if self.count < 2:
            raise ValueError(f"need at least 2 micro-batch gradients, got {self.count}")
        gram, cross = self._tables()
        live = [j for j in range(self.groups) if self._counts[j]]
        full = self._on(live, live, gram, cross)
        if len(live) < 2 or self.count - max(self._counts) < 2:  # every leave-one-out keeps >= 2 gradients
            return full, {k: None for k in FIELDS}
        drops = [self._on(live, [j for j in live if j != d], gram, cross) for d in live]
        return full, {k: _jackknife_se([r[k] for r in drops]) for k in FIELDS}

    def _on(self, live: list[int], keep: list[int], gram: torch.Tensor, cross: torch.Tensor | None) -> dict[str, float | None]:
        rows = [live.index(j) for j in keep]
        k = sum(self._counts[j] for j in keep)
        ss = float(gram[rows][:, rows].sum())
        cov = (sum(self._sq[j] for j in keep) - ss / k) / (k - 1)
        out: dict[str, float | None] = {"grad_sq": ss / k**2 - cov / k, "trace_sigma": self.micro_batch * cov}
        out["b_simple"] = _ratio(out["trace_sigma"], out["grad_sq"])
        hvp = [a for a, j in enumerate(self._hvp_group) if j in keep]
        if cross is None or not hvp:
            out.update(g_h_g=None, trace_h_sigma=None, b_noise=None)
            return out
        m = len(hvp)
        s_hg = cross[rows][:, hvp].sum(0)  # S_I^T H G_a for each a in A_I
        c = torch.tensor([self._c[a] for a in hvp], dtype=torch.float64)
        out["g_h_g"] = float((s_hg - c).sum()) / (m * (k - 1))
        out["trace_h_sigma"] = self.micro_batch * (float(c.sum()) / m - out["g_h_g"])
        out["b_noise"] = _ratio(out["trace_h_sigma"], out["g_h_g"])
        return out


def _ratio(num: float | None, den: float | None) -> float | None:
    return num / den if num is not None and den is not None and den > 0 else None


def _jackknife_se(values: list[float | None]) -> float | None:
    """sqrt((J - 1)/J sum_j (theta_-j - mean)^2) over the J leave-one-group-out estimates."""
    if any(v is None or not math.isfinite(v) for v in values):
        return None
    j = len(values)
    mean = sum(values) / j
    return math.sqrt((j - 1) / j * sum((v - mean) ** 2 for v in values))


def t_quantile(p: float, df: int) -> float:
    """Student-t quantile (scipy ships with scikit-learn; imported on use, off the trainer's path)."""
    from scipy import stats

    return float(stats.t.ppf(p, df))
