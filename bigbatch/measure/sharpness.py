"""Sharpness: the top eigenvalues of the loss Hessian, from Hessian-vector products only.

Lanczos with full reorthogonalisation on HVPs (Pearlmutter's trick via double backward), so the
Hessian is never formed: memory is (iterations + 2) parameter-sized vectors. Keskar et al. 2016
and Sagun et al. 2017: large batches end in minima with larger top eigenvalues.
"""

from __future__ import annotations

from typing import Callable

import torch

from bigbatch.errors import UsageError


def hessian_top_eigs(
    model: torch.nn.Module,
    loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
    x: torch.Tensor,
    y: torch.Tensor,
    k: int = 1,
    iters: int = 100,
    tol: float = 1e-4,
    seed: int = 0,
) -> list[float]:
    """The k largest (algebraic) eigenvalues of the Hessian of loss_fn(model(x), y), descending.

    Runs at most min(iters, P) Lanczos steps (P = trainable parameters) and stops early once the
    top-k Ritz values change by less than `tol` (relative) between steps. The model is used in
    its current mode (eval mode for BatchNorm models gives a deterministic loss).
    """
    params = [p for p in model.parameters() if p.requires_grad]
    n_params = sum(p.numel() for p in params)
    if not 1 <= k <= n_params:
        raise UsageError("k", f"must be between 1 and the number of parameters ({n_params}), got {k}")
    if iters < 1:
        raise UsageError("iters", f"must be >= 1, got {iters}")
    loss = loss_fn(model(x), y)
    grads = torch.autograd.grad(loss, params, create_graph=True)
    flat_grad = torch.cat([g.reshape(-1) for g in grads])

    def hvp(v: torch.Tensor) -> torch.Tensor:
        hv = torch.autograd.grad(flat_grad, params, grad_outputs=v, retain_graph=True)
        return torch.cat([h.reshape(-1) for h in hv]).detach()

    gen = torch.Generator(device="cpu").manual_seed(seed)
    q = torch.randn(n_params, generator=gen, dtype=torch.float64).to(device=flat_grad.device, dtype=flat_grad.dtype)
    q /= q.norm()
    basis = [q]
    alphas: list[float] = []
    betas: list[float] = []
    previous = None
    m = min(iters, n_params)
    for j in range(m):
        w = hvp(basis[j])
        alpha = float(w @ basis[j])
        alphas.append(alpha)
        # Full reorthogonalisation (twice is enough, Kahan/Parlett): keeps the Ritz values clean.
        q_mat = torch.stack(basis)
        for _ in range(2):
            w = w - q_mat.T @ (q_mat @ w)
        ritz = _tridiag_eigs(alphas, betas)
        top = ritz[:k]
        if len(top) == k and previous is not None and all(
            abs(a - b) <= tol * max(abs(a), 1e-12) for a, b in zip(top, previous)
        ):
            return top
        previous = top if len(top) == k else None
        beta = float(w.norm())
        if j == m - 1 or beta <= 1e-10 * max(abs(alpha), 1.0):
            break  # the Krylov space is invariant (or exhausted): the Ritz values are exact
        betas.append(beta)
        basis.append(w / beta)
    ritz = _tridiag_eigs(alphas, betas)
    if len(ritz) < k:  # invariant subspace smaller than k: restarting is not worth it here
        raise UsageError("k", f"the Krylov space has only {len(ritz)} dimensions; ask for fewer eigenvalues")
    return ritz[:k]


def _tridiag_eigs(alphas: list[float], betas: list[float]) -> list[float]:
    n = len(alphas)
    t = torch.diag(torch.tensor(alphas, dtype=torch.float64))
    if n > 1:
        off = torch.tensor(betas[: n - 1], dtype=torch.float64)
        t += torch.diag(off, 1) + torch.diag(off, -1)
    return sorted(torch.linalg.eigvalsh(t).tolist(), reverse=True)
