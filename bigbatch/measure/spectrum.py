"""The Hessian's spectrum from Hessian-vector products: top-k eigenpairs, the spectral density,
the trace, the gradient's share of the top eigenspace, and the outliers that stand out of the bulk.

Pure: every function takes `hvp`, a callable v -> H v for a symmetric H on R^n (for a network,
`measure.sharpness.HessianOperator.hvp`, the training loss in train-mode BatchNorm), and tensors.
The Hessian is never formed; memory is a few dozen n-vectors.

- `top_eigenpairs`: Lanczos with full reorthogonalisation, stopped on the Ritz residuals.
- `slq`: stochastic Lanczos quadrature (Golub & Meurant; Ubaru, Chen, Saad 2017; Ghorbani et al.
  2019, PyHessian): m Lanczos steps from each random probe; the Ritz values are the nodes and the
  squared first components of the tridiagonal matrix's eigenvectors the weights of a Gauss
  quadrature of the probe's weighted spectral measure, whose mean over probes is the spectrum.
  `Quadrature.density` broadens the nodes with Gaussians (`log_abs_grid`: a grid for a plot of
  |lambda| on a log axis, where the bulk near zero and the outliers are both visible).
- `hutchinson_trace`: E[v^T H v] = tr H (Hutchinson 1989), optionally with the top-k eigenspace
  deflated (its trace taken exactly), which removes the outliers' share of the variance.
- `top_space_fraction`: |P_k g|^2 / |g|^2 (Gur-Ari, Roberts, Dyer 2018).
- `count_outliers`: how many of the top-k eigenvalues stand out of the bulk (rule in its docstring).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

import torch

from bigbatch.errors import UsageError

Hvp = Callable[[torch.Tensor], torch.Tensor]
PROBES = ("rademacher", "gaussian")


def check_lanczos_args(k: int, iters: int, n_params: int) -> None:
    if not 1 <= k <= n_params:
        raise UsageError("k", f"must be between 1 and the number of parameters ({n_params}), got {k}")
    if iters < 1:
        raise UsageError("iters", f"must be >= 1, got {iters}")


def tridiag_eig(alphas: list[float], betas: list[float]) -> tuple[torch.Tensor, torch.Tensor]:
    """Eigenvalues of the Lanczos tridiagonal matrix T (diagonal `alphas`, off-diagonal `betas`),
    descending, and its eigenvectors as the columns of the second tensor (same order)."""
    n = len(alphas)
    t = torch.diag(torch.tensor(alphas, dtype=torch.float64))
    if n > 1:
        off = torch.tensor(betas[: n - 1], dtype=torch.float64)
        t += torch.diag(off, 1) + torch.diag(off, -1)
    values, vectors = torch.linalg.eigh(t)
    order = values.argsort(descending=True)
    return values[order], vectors[:, order]


def lanczos(hvp: Hvp, q: torch.Tensor, steps: int,
            stop: Callable[[list[float], list[float], float], bool] | None = None
            ) -> tuple[list[float], list[float], torch.Tensor, float]:
    """Up to `steps` Lanczos steps from the unit vector q, with full reorthogonalisation.

    Returns (alphas, betas, basis, beta_next): T's diagonal, its off-diagonal (len(alphas) - 1
    entries), the orthonormal Krylov basis as rows, and the norm of the next residual vector (a
    Ritz pair's residual |H u - theta u| is beta_next times the last component of its eigenvector
    of T). After each step `stop(alphas, betas, beta_next)` may end the run; it also ends when the
    Krylov space is invariant (beta_next ~ 0), where the Ritz values are exact eigenvalues.
    """
    basis = [q]
    alphas: list[float] = []
    betas: list[float] = []
    beta = 0.0
    for j in range(steps):
        w = hvp(basis[j])
        alpha = float(w @ basis[j])
        alphas.append(alpha)
        # Full reorthogonalisation (twice is enough, Kahan/Parlett): without it converged
        # outliers come back as spurious copies ("ghosts") and SLQ's weights are biased.
        q_mat = torch.stack(basis)
        for _ in range(2):
            w = w - q_mat.T @ (q_mat @ w)
        beta = float(w.norm())
        if stop is not None and stop(alphas, betas, beta):
            break
        if j == steps - 1 or beta <= 1e-10 * max(abs(alpha), 1.0):
            break
        betas.append(beta)
        basis.append(w / beta)
    return alphas, betas, torch.stack(basis[: len(alphas)]), beta


def _probe(n: int, kind: str, gen: torch.Generator) -> torch.Tensor:
    """A random vector with E[v v^T] = I: Rademacher (+-1) or standard Gaussian, float64."""
    if kind == "rademacher":
        return torch.randint(0, 2, (n,), generator=gen, dtype=torch.int64).double() * 2 - 1
    if kind == "gaussian":
        return torch.randn(n, generator=gen, dtype=torch.float64)
    raise UsageError("probe", f"expected one of {PROBES}, got {kind!r}")


@dataclass
class Eigenpairs:
    """The top-k eigenpairs of H, descending: values (k,), vectors (k, n) orthonormal rows,
    residuals (k,) bounds on |H u - theta u| from the recurrence, and the Lanczos steps taken."""

    values: torch.Tensor
    vectors: torch.Tensor
    residuals: torch.Tensor
    steps: int


def top_eigenpairs(hvp: Hvp, n: int, k: int = 1, iters: int = 100, tol: float = 1e-4, seed: int = 0,
                   dtype: torch.dtype = torch.float64, device: torch.device | str = "cpu") -> Eigenpairs:
    """The k algebraically largest eigenpairs of the symmetric operator `hvp` on R^n (Lanczos with
    full reorthogonalisation from a seeded Gaussian start, vectors in `dtype` on `device`).

    Stops when every top-k Ritz pair (theta, u) has a residual |H u - theta u| <= tol |theta|.
    The residual after j steps is beta_{j+1} |s_j| (s_j the last component of the pair's
    eigenvector of T; Parlett, The Symmetric Eigenvalue Problem, 13.2), so the test costs no
    product; H has an eigenvalue within the residual of theta, and within residual^2 / gap once
    theta is separated by `gap` from the rest of the spectrum. At most min(iters, n) steps; a
    pair that has not met `tol` by then is returned with its (larger) residual.
    """
    check_lanczos_args(k, iters, n)
    gen = torch.Generator(device="cpu").manual_seed(seed)
    q = torch.randn(n, generator=gen, dtype=torch.float64).to(device=device, dtype=dtype)
    q /= q.norm()

    def converged(alphas: list[float], betas: list[float], beta: float) -> bool:
        if len(alphas) < k:
            return False
        theta, s = tridiag_eig(alphas, betas)
        return all(beta * abs(float(s[-1, i])) <= tol * max(abs(float(theta[i])), 1e-12) for i in range(k))

    alphas, betas, basis, beta = lanczos(hvp, q, min(iters, n), converged)
    theta, s = tridiag_eig(alphas, betas)
    if len(theta) < k:  # invariant subspace smaller than k: restarting is not worth it here
        raise UsageError("k", f"the Krylov space has only {len(theta)} dimensions; ask for fewer eigenvalues")
    vectors = s[:, :k].T.to(device=basis.device, dtype=basis.dtype) @ basis
    residuals = beta * s[-1, :k].abs()
    return Eigenpairs(theta[:k].clone(), vectors, residuals, len(alphas))


@dataclass
class Quadrature:
    """Stochastic Lanczos quadrature: per probe, the Gauss quadrature of its weighted spectral
    measure sum_i (v^T u_i)^2 / |v|^2 delta(lambda - lambda_i). nodes and weights are
    (probes, m); each row's weights sum to 1 (rows of a run that stopped early are padded with
    zero weight); the mean over rows estimates the spectral measure (1/n) sum_i delta(lambda - lambda_i)."""

    nodes: torch.Tensor
    weights: torch.Tensor

    def measure(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The SLQ estimate as one discrete measure: (nodes, weights summing to 1), flattened."""
        p = self.nodes.shape[0]
        return self.nodes.reshape(-1), self.weights.reshape(-1) / p

    def density(self, grid: torch.Tensor, sigma: float | torch.Tensor) -> torch.Tensor:
        """phi(t) = (1/probes) sum_p sum_j w_pj N(t; theta_pj, sigma_pj^2) on `grid` (integrates
        to 1 over the real line). `sigma`: one width, or one per node, shaped as `nodes` (see
        `broadening`)."""
        nodes, weights = self.measure()
        sig = torch.as_tensor(sigma, dtype=torch.float64).expand_as(self.nodes).reshape(-1)
        z = (grid.double()[:, None] - nodes[None, :]) / sig[None, :]
        return (weights[None, :] * torch.exp(-0.5 * z ** 2) / (sig[None, :] * math.sqrt(2 * math.pi))).sum(1)


def slq(hvp: Hvp, n: int, probes: int = 4, steps: int = 40, seed: int = 0, probe: str = "gaussian",
        dtype: torch.dtype = torch.float64, device: torch.device | str = "cpu") -> Quadrature:
    """Stochastic Lanczos quadrature with `probes` random starts of `steps` Lanczos steps each
    (Ubaru, Chen, Saad 2017; Ghorbani et al. 2019). Per probe v: T = the Lanczos tridiagonal
    matrix from v / |v|, T = S diag(theta) S^T; nodes theta_j, weights S_1j^2. Costs probes x
    steps products. Chen, Trogdon, Ubaru 2021: with Gaussian (sphere) probes, ceil(12/t + 1/2)
    steps and ceil(4 ln(2n/eta) / ((n + 2) t^2)) probes give a Wasserstein-1 distance to the
    spectral measure of at most t (lambda_max - lambda_min) with probability 1 - eta."""
    if probes < 1:
        raise UsageError("probes", f"must be >= 1, got {probes}")
    if steps < 1:
        raise UsageError("steps", f"must be >= 1, got {steps}")
    gen = torch.Generator(device="cpu").manual_seed(seed)
    m = min(steps, n)
    nodes = torch.zeros(probes, m, dtype=torch.float64)
    weights = torch.zeros(probes, m, dtype=torch.float64)
    for p in range(probes):
        v = _probe(n, probe, gen)
        alphas, betas, _, _ = lanczos(hvp, (v / v.norm()).to(device=device, dtype=dtype), m)
        theta, s = tridiag_eig(alphas, betas)
        nodes[p, : len(theta)] = theta
        weights[p, : len(theta)] = s[0] ** 2
    return Quadrature(nodes, weights)


def broadening(nodes: torch.Tensor, relative: float = 0.05, floor: float = 1e-4) -> torch.Tensor:
    """A width per node: relative x |theta|, at least `floor`. On a log |lambda| axis every node
    then spreads over the same fraction of a decade (a fixed width either hides the bulk's spread
    of magnitudes near zero or splits each outlier into a spike)."""
    return torch.clamp(relative * nodes.abs(), min=floor)


def log_abs_grid(low: float, high: float, points: int = 400) -> torch.Tensor:
    """Grid points for a plot of |lambda| on a log axis: geometric from `low` to `high` on each
    side of zero (-high .. -low, low .. high), ascending."""
    if not 0 < low < high:
        raise ValueError(f"need 0 < low < high, got {low}, {high}")
    pos = torch.logspace(math.log10(low), math.log10(high), points, dtype=torch.float64)
    return torch.cat([-pos.flip(0), pos])


def wasserstein1(x: torch.Tensor, wx: torch.Tensor, y: torch.Tensor, wy: torch.Tensor) -> float:
    """W1 between two discrete measures on the line (weights each summing to 1): the integral of
    |F_x - F_y| over the line, exact from the merged support."""
    pts = torch.cat([x, y]).double()
    mass = torch.cat([wx.double(), -wy.double()])
    order = pts.argsort()
    pts, diff = pts[order], mass[order].cumsum(0)  # F_x - F_y just right of each point
    return float((diff[:-1].abs() * (pts[1:] - pts[:-1])).sum())


@dataclass
class Trace:
    """A Hutchinson estimate of tr H with its standard error over probes; `deflated`: the top
    eigenvalues' exact part (sum of their Ritz values) included in `value`, 0.0 when none."""

    value: float
    se: float
    probes: int
    deflated: float


def hutchinson_trace(hvp: Hvp, n: int, probes: int = 32, seed: int = 0, probe: str = "rademacher",
                     deflate: torch.Tensor | None = None, deflate_values: torch.Tensor | None = None,
                     dtype: torch.dtype = torch.float64, device: torch.device | str = "cpu") -> Trace:
    """tr H = E[v^T H v] for E[v v^T] = I (Hutchinson 1989); SE = sample sd / sqrt(probes).

    With `deflate` (k orthonormal rows U, e.g. the top-k Ritz vectors) and their Rayleigh
    quotients `deflate_values` (u^T H u: for Lanczos Ritz vectors, the Ritz values):
    tr H = sum_i u_i^T H u_i + E[z^T H z], z = (I - U^T U) v, since tr H = tr(P H) + tr(P_perp H P_perp)
    for the projector P = U^T U. The variance of a Rademacher estimate is 2 sum_{i != j} H_ij^2;
    deflating the outliers removes most of it when they carry most of |H|_F^2.
    """
    if probes < 2:
        raise UsageError("probes", f"must be >= 2 (two samples give a spread), got {probes}")
    if (deflate is None) != (deflate_values is None):
        raise ValueError("deflate and deflate_values go together")
    gen = torch.Generator(device="cpu").manual_seed(seed)
    samples = []
    for _ in range(probes):
        v = _probe(n, probe, gen).to(device=device, dtype=dtype)
        if deflate is not None:
            v = v - deflate.T.to(v.dtype) @ (deflate.to(v.dtype) @ v)
        samples.append(float(v @ hvp(v)))
    t = torch.tensor(samples, dtype=torch.float64)
    exact = float(deflate_values.sum()) if deflate_values is not None else 0.0
    return Trace(exact + float(t.mean()), float(t.std() / math.sqrt(probes)), probes, exact)


def top_space_fraction(g: torch.Tensor, vectors: torch.Tensor) -> float:
    """|P_k g|^2 / |g|^2 for the projector onto the span of the orthonormal rows of `vectors`
    (Gur-Ari, Roberts, Dyer 2018: close to 1 for the top-k Hessian eigenvectors, k ~ classes,
    after the first steps of training). 0 for a zero gradient."""
    g = g.to(vectors.dtype)
    total = float(g @ g)
    return float((vectors @ g).pow(2).sum()) / total if total > 0 else 0.0


OUTLIER_GAP = 1.25  # an outlier sits above a relative gap of at least 25 % (see count_outliers)


@dataclass
class Outliers:
    """count: eigenvalues above the bulk; bulk_edge: the largest eigenvalue counted in the bulk;
    saturated: every gap-separated value of the list was counted (k may be too small to reach
    the bulk); rule: the rule in words."""

    count: int
    bulk_edge: float | None
    saturated: bool
    rule: str


def count_outliers(values: torch.Tensor | list[float], gap: float = OUTLIER_GAP) -> Outliers:
    """How many of the top-k eigenvalues (descending) stand out of the bulk.

    Rule: the bulk's top is dense (neighbouring eigenvalues of a bulk of thousands differ by far
    less than a percent), an outlier is separated from it by a gap (Sagun et al. 2017; Papyan
    2019). Walking down the list, the lowest relative gap lambda_i >= `gap` x lambda_{i+1} (i < k)
    marks the bulk's top: count = the largest such i, 0 if there is none; every eigenvalue above
    it counts, including those separated only from each other by smaller gaps. Only positive
    values enter. A list that is still gapped at its end (count = k - 1) may not have reached the
    bulk: `saturated`, and ask for a larger k.
    """
    vals = [float(v) for v in values]
    pos = [v for v in vals if v > 0]
    count = 0
    for i in range(len(pos) - 1):
        if pos[i] >= gap * pos[i + 1]:
            count = i + 1
    edge = pos[count] if count < len(pos) else None
    rule = (f"eigenvalues above the lowest gap lambda_i >= {gap:g} lambda_(i+1) in the top-{len(vals)} list; "
            f"the bulk begins below it")
    return Outliers(count, edge, len(pos) >= 2 and count == len(pos) - 1, rule)
