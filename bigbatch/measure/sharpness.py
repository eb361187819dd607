"""Sharpness: the top eigenvalues of the loss Hessian, from Hessian-vector products only.

Lanczos with full reorthogonalisation on HVPs (Pearlmutter's trick via double backward), so the
Hessian is never formed: memory is (iterations + 2) parameter-sized vectors. Measured on the
training loss by default (BatchNorm in train mode with the training micro-batch; see modes.py).
Keskar et al. 2016 and Sagun et al. 2017: large batches end in minima with larger top eigenvalues.
"""

from __future__ import annotations

from typing import Callable

import torch

from bigbatch.errors import UsageError
from bigbatch.measure.modes import measuring, micro_batch_loss


class HessianOperator:
    """v -> H v for the Hessian H of the loss on one batch, by double backward (Pearlmutter).

    The loss graph is built once, at construction, in the model's current mode; each `hvp` is
    one backward pass through it. With `micro_batch`, the loss is the mean over micro-batches
    of that size (`modes.micro_batch_loss`): in train mode that is the training loss at
    micro-batch b. Build it inside `modes.measuring(model, mode)`, which restores the BatchNorm
    buffers its forward pass updates.
    """

    def __init__(self, model: torch.nn.Module, loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
                 x: torch.Tensor, y: torch.Tensor, micro_batch: int | None = None):
        self.params = [p for p in model.parameters() if p.requires_grad]
        self.num_params = sum(p.numel() for p in self.params)
        self.examples = x.shape[0] if micro_batch is None else (x.shape[0] // micro_batch) * micro_batch
        # the graph holds its own copy of the buffers: a later train-mode forward (which updates
        # BatchNorm running statistics in place) or `measuring` restoring them must not break it
        state = {**dict(model.named_parameters()), **{k: v.clone() for k, v in model.named_buffers()}}

        def forward(inputs: torch.Tensor) -> torch.Tensor:
            return torch.func.functional_call(model, state, (inputs,))

        loss = micro_batch_loss(forward, loss_fn, x, y, micro_batch)
        grads = torch.autograd.grad(loss, self.params, create_graph=True, allow_unused=True)
        # a parameter the loss does not touch has a zero row and column in H
        self._flat_grad = torch.cat([(g if g is not None else torch.zeros_like(p)).reshape(-1)
                                     for g, p in zip(grads, self.params)])
        self._used = [g is not None and g.requires_grad for g in grads]

    @property
    def dtype(self) -> torch.dtype:
        return self._flat_grad.dtype

    @property
    def device(self) -> torch.device:
        return self._flat_grad.device

    def hvp(self, v: torch.Tensor) -> torch.Tensor:
        """H v for a flat vector v (any float dtype; the product comes back in v's dtype)."""
        if not any(self._used):
            return torch.zeros_like(v)
        hv = torch.autograd.grad(self._flat_grad, self.params, grad_outputs=v.to(self.dtype),
                                 retain_graph=True, allow_unused=True)
        flat = torch.cat([(h if h is not None else torch.zeros_like(p)).reshape(-1) for h, p in zip(hv, self.params)])
        return flat.detach().to(v.dtype)

    def top_eigs(self, k: int = 1, iters: int = 100, tol: float = 1e-4, seed: int = 0) -> list[float]:
        """The k largest (algebraic) eigenvalues of H, descending (Lanczos, see `lanczos_top_eigs`)."""
        return lanczos_top_eigs(self.hvp, self.num_params, self.dtype, self.device, k, iters, tol, seed)


def hessian_top_eigs(
    model: torch.nn.Module,
    loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
    x: torch.Tensor,
    y: torch.Tensor,
    k: int = 1,
    iters: int = 100,
    tol: float = 1e-4,
    seed: int = 0,
    mode: str = "train",
    micro_batch: int | None = None,
) -> list[float]:
    """The k largest (algebraic) eigenvalues of the Hessian of the loss on (x, y), descending.

    `mode` "train" (the default) measures the loss that is trained: BatchNorm normalises each
    micro-batch of `micro_batch` examples by its own statistics (pass the training micro-batch
    size; None = all of x as one batch). "eval" uses the running statistics, a different loss:
    only when asked for. BatchNorm buffers, the module's mode and the RNG are restored.

    Runs at most min(iters, P) Lanczos steps (P = trainable parameters) and stops early once the
    top-k Ritz values change by less than `tol` (relative) between steps.
    """
    n_params = sum(p.numel() for p in model.parameters() if p.requires_grad)
    _check_lanczos_args(k, iters, n_params)
    with measuring(model, mode):
        return HessianOperator(model, loss_fn, x, y, micro_batch).top_eigs(k, iters, tol, seed)


def _check_lanczos_args(k: int, iters: int, n_params: int) -> None:
    if not 1 <= k <= n_params:
        raise UsageError("k", f"must be between 1 and the number of parameters ({n_params}), got {k}")
    if iters < 1:
        raise UsageError("iters", f"must be >= 1, got {iters}")


def lanczos_top_eigs(hvp: Callable[[torch.Tensor], torch.Tensor], n_params: int, dtype: torch.dtype,
                     device: torch.device, k: int = 1, iters: int = 100, tol: float = 1e-4, seed: int = 0) -> list[float]:
    """Top-k eigenvalues of the symmetric operator `hvp` on R^n_params (Lanczos with full
    reorthogonalisation), descending."""
    _check_lanczos_args(k, iters, n_params)
    gen = torch.Generator(device="cpu").manual_seed(seed)
    q = torch.randn(n_params, generator=gen, dtype=torch.float64).to(device=device, dtype=dtype)
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
