"""Sharpness: the top eigenvalues of the loss Hessian, from Hessian-vector products only.

Lanczos with full reorthogonalisation on HVPs (Pearlmutter's trick via double backward), so the
Hessian is never formed: memory is (iterations + 2) parameter-sized vectors. Measured on the
training loss by default (BatchNorm in train mode with the training micro-batch; see modes.py).
Keskar et al. 2016 and Sagun et al. 2017: large batches end in minima with larger top eigenvalues.
"""

from __future__ import annotations

import contextlib
from typing import Callable, Iterator

import torch
from torch.nn.attention import SDPBackend, sdpa_kernel

from bigbatch.measure.modes import measuring
from bigbatch.measure.spectrum import check_lanczos_args, top_eigenpairs


class HessianOperator:
    """v -> H v for the Hessian H of the loss on (x, y), by double backward (Pearlmutter).

    With `micro_batch`, the loss is the mean over micro-batches of that size
    (`modes.micro_batch_loss`): in train mode that is the training loss at micro-batch b, and H
    the mean of the micro-batches' Hessians. Each `hvp` walks the micro-batches one at a time
    (forward, gradient with its graph, one more backward for H_i v), so memory is one
    micro-batch's graph whatever the number of examples: a Hessian averaged over thousands of
    examples costs time, not memory. The random state (dropout) is replayed for every product,
    so H is the same linear operator in every call; the buffers are the model's at construction
    (a copy: the train-mode forwards here update BatchNorm running statistics, which the
    train-mode loss does not read). Build it inside `modes.measuring(model, mode)`.
    """

    def __init__(self, model: torch.nn.Module, loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
                 x: torch.Tensor, y: torch.Tensor, micro_batch: int | None = None):
        self.model, self.loss_fn = model, loss_fn
        self.params = [p for p in model.parameters() if p.requires_grad]
        self.num_params = sum(p.numel() for p in self.params)
        n = x.shape[0]
        if micro_batch is not None and micro_batch < 1:
            raise ValueError(f"micro_batch must be >= 1, got {micro_batch}")
        b = n if micro_batch is None or micro_batch >= n else micro_batch
        self.micro_batch = b
        self.chunks = [(x[i * b:(i + 1) * b], y[i * b:(i + 1) * b]) for i in range(n // b)]
        self.examples = b * len(self.chunks)  # trailing examples that do not fill a micro-batch are dropped
        self._names = [name for name, p in model.named_parameters() if p.requires_grad]
        self._buffers = {k: v.detach().clone() for k, v in model.named_buffers()}
        self._rng = _rng_state(self.params[0].device if self.params else torch.device("cpu"))
        self._dtype = self.params[0].dtype if self.params else torch.float32
        self.hvps = 0  # products taken (each costs about 2 forward + 3 backward passes per micro-batch)

    def _chunk_grad(self, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, list[bool]]:
        state = {**dict(zip(self._names, self.params)), **{k: v.clone() for k, v in self._buffers.items()}}
        # attention's fused kernels (flash, memory-efficient; CPU and CUDA) have no double backward:
        # the forward of an HVP takes the math kernel, the same function
        with sdpa_kernel(SDPBackend.MATH):
            loss = self.loss_fn(torch.func.functional_call(self.model, state, (x,)), y)
        grads = torch.autograd.grad(loss, self.params, create_graph=True, allow_unused=True)
        # a parameter the loss does not touch has a zero row and column in H
        flat = torch.cat([(g if g is not None else torch.zeros_like(p)).reshape(-1) for g, p in zip(grads, self.params)])
        return flat, [g is not None and g.requires_grad for g in grads]

    @property
    def dtype(self) -> torch.dtype:
        return self._dtype

    @property
    def device(self) -> torch.device:
        return self.params[0].device if self.params else torch.device("cpu")

    def hvp(self, v: torch.Tensor) -> torch.Tensor:
        """H v for a flat vector v (any float dtype; the product comes back in v's dtype)."""
        out = torch.zeros(self.num_params, dtype=torch.float64, device=v.device)
        with _replayed_rng(self._rng):
            for x, y in self.chunks:
                flat, used = self._chunk_grad(x, y)
                if not any(used):
                    continue
                hv = torch.autograd.grad(flat, self.params, grad_outputs=v.to(flat.dtype), allow_unused=True)
                out += torch.cat([(h if h is not None else torch.zeros_like(p)).reshape(-1)
                                  for h, p in zip(hv, self.params)]).double()
        self.hvps += 1
        return (out / max(len(self.chunks), 1)).to(v.dtype)

    def gradient(self) -> torch.Tensor:
        """The gradient of the same loss (mean over the micro-batches, same buffers and replayed
        RNG) as one flat float64 vector: the g whose share of H's top eigenspace is measured."""
        out = torch.zeros(self.num_params, dtype=torch.float64, device=self.device)
        with _replayed_rng(self._rng):
            for x, y in self.chunks:
                flat, _ = self._chunk_grad(x, y)
                out += flat.detach().double()
        return out / max(len(self.chunks), 1)

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
    top-k Ritz pairs have residuals below `tol` (relative; see `lanczos_top_eigs`).
    """
    n_params = sum(p.numel() for p in model.parameters() if p.requires_grad)
    check_lanczos_args(k, iters, n_params)
    with measuring(model, mode):
        return HessianOperator(model, loss_fn, x, y, micro_batch).top_eigs(k, iters, tol, seed)


def lanczos_top_eigs(hvp: Callable[[torch.Tensor], torch.Tensor], n_params: int, dtype: torch.dtype,
                     device: torch.device, k: int = 1, iters: int = 100, tol: float = 1e-4, seed: int = 0) -> list[float]:
    """Top-k eigenvalues of the symmetric operator `hvp` on R^n_params, descending: Lanczos with
    full reorthogonalisation, stopped once every top-k Ritz pair (theta, u) has a residual
    |H u - theta u| <= tol |theta| (`measure.spectrum.top_eigenpairs`, which says why the residual
    and not the change of the Ritz values between steps)."""
    return top_eigenpairs(hvp, n_params, k, iters, tol, seed, dtype, device).values.tolist()


def _rng_state(device: torch.device) -> tuple[torch.Tensor, torch.device, torch.Tensor | None]:
    return torch.get_rng_state(), device, torch.cuda.get_rng_state(device) if device.type == "cuda" else None


@contextlib.contextmanager
def _replayed_rng(state: tuple[torch.Tensor, torch.device, torch.Tensor | None]) -> Iterator[None]:
    """Run with the RNG at `state` (the same dropout masks every time), restoring it afterwards."""
    cpu, device, cuda = state
    with torch.random.fork_rng(devices=[device] if cuda is not None else []):
        torch.set_rng_state(cpu)
        if cuda is not None:
            torch.cuda.set_rng_state(cuda, device)
        yield
