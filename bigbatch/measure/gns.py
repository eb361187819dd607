"""The gradient noise scale in your own training loop: `GradientNoiseScale`.

B_simple = tr(Sigma) / |G|^2 (McCandlish, Kaplan, Amodei 2018), from the squared norms of the
gradient at two batch sizes in every step (appendix A.1), with no extra forward or backward pass:

- DDP (a `DistributedDataParallel` model on >= 2 ranks): the small batch is this rank's batch,
  read inside DDP's comm hook before the all-reduce (bigbatch's hook,
  `bigbatch.distributed.hooks`, with a tap; it joins the hook bigbatch's own trainer registered);
  the big batch is the global batch, the averaged gradient DDP leaves in `.grad`. Gradient
  accumulation under `no_sync()` is fine: the rank's batch is then its micro-batches together.
- One process with gradient accumulation (`accum_steps >= 2`): each micro-batch is a small
  batch, read by a hook on every parameter before it is added into `.grad`; the big batch is the
  accumulated step. The loss of each micro-batch must be divided by `accum_steps` (the usual
  convention: `.grad` is then the mean gradient of the step).

    gns = GradientNoiseScale(ddp_model, batch_size=per_device_batch)   # or (model, micro, accum_steps=4)
    for x, y in loader:
        loss = loss_fn(ddp_model(x), y)
        scaler.scale(loss).backward()
        gns.update(scaler)                 # after the backward, before scaler.step / zero_grad
        scaler.step(optimizer); scaler.update(); optimizer.zero_grad()
    print(gns.b_simple, gns.grad_sq, gns.trace_sigma)

The AMP loss scale: both norms are of scaled gradients; `update(scaler)` (or `update(scale=s)`)
divides them by scale^2, and a step whose norms overflowed (the GradScaler skips it) is skipped
here too. Call `update` before `scaler.unscale_` / `scaler.step` (they unscale `.grad` in place).

The estimate is the EMA of both quantities (`GNSEstimator`, bias-corrected), the ratio taken last.
Under DDP every rank holds the same estimate: the rank's small-batch norm is averaged over ranks
with one asynchronous all-reduce of a scalar per measured step, waited for at the next update or
read. Read the estimate on every rank (or call `remove()`) before `destroy_process_group`: a rank
that never waits for the last step's all-reduce is aborted by gloo when its group is destroyed.
Nothing converts a device tensor to a float inside the step that measured it.

`GradNormTap` and `grad_sq_norm` (the two norms) are shared with the trainer's online probe.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from bigbatch.distributed.hooks import CommHookState, allreduce_mean_hook
from bigbatch.measure.noise import GNSEstimator


class GradNormTap:
    """Collects the L2 norm of every gradient it is shown while enabled: one fp32 reduction per
    tensor (no float64 copy of a bucket), kept as a 0-d tensor; `take` squares and sums them in
    float64, `take_norms` hands them over unsquared so a caller can defer that (and the host sync)
    to when the estimate is read.

    keep_buffers=True (DDP): the tap is shown each bucket before its all-reduce and keeps the
    bucket; after the backward the same buffer holds the averaged gradient, whose norm is the big
    batch's (`norms_of`): one pass per bucket instead of one norm per parameter.
    """

    def __init__(self, keep_buffers: bool = False) -> None:
        self.enabled = False
        self.keep_buffers = keep_buffers
        self.norms: list[torch.Tensor] = []
        self.buffers: list[torch.Tensor] = []

    def __call__(self, grad: torch.Tensor) -> None:
        if not self.enabled or grad is None:
            return
        self.norms.append(torch.linalg.vector_norm(grad))
        if self.keep_buffers:
            self.buffers.append(grad)

    def take_norms(self) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        """(norms, kept buffers) since the last take; the tap starts empty."""
        norms, buffers = self.norms, self.buffers
        self.norms, self.buffers = [], []
        return norms, buffers

    def take(self) -> torch.Tensor | None:
        """The sum of the squared norms, float64 (None when nothing was shown)."""
        norms, _ = self.take_norms()
        return torch.stack(norms).double().square().sum() if norms else None


def norms_of(tensors: list[torch.Tensor]) -> list[torch.Tensor]:
    """fp32 L2 norms (0-d tensors) of `tensors`, one fused call."""
    return list(torch._foreach_norm(tensors)) if tensors else []


def sum_of_squares(values: list[float]) -> float:
    """Squared norms summed in float64, in order."""
    total = 0.0
    for v in values:
        total += v * v
    return total


def grad_sq_norm(params: list[nn.Parameter]) -> torch.Tensor | None:
    """Squared L2 norm of all `.grad`s, float64 (None when no parameter has a gradient)."""
    grads = [p.grad for p in params if p.grad is not None]
    if not grads:
        return None
    return torch.stack(torch._foreach_norm(grads)).double().square().sum()


def attach_tap(ddp_model: nn.Module, tap: GradNormTap, world_size: int, group=None) -> None:
    """Put `tap` into ddp_model's comm hook: join bigbatch's hook when one is registered (DDP allows
    one per model), else register it with the backend's own all-reduce."""
    registered = getattr(ddp_model, "_comm_hooks", [])
    for _, state in registered:
        if isinstance(state, CommHookState):
            state.local_grad_tap = tap
            return
    if registered:
        raise ValueError("another DDP comm hook is registered; the noise-scale tap needs bigbatch's "
                         "(register the GradientNoiseScale before your own hook, or use bigbatch.distributed.hooks)")
    ddp_model.register_comm_hook(CommHookState("builtin", world_size, local_grad_tap=tap, group=group),
                                 allreduce_mean_hook)


class GradientNoiseScale:
    """Online B_simple of a model you train with your own loop (see the module docstring).

    model: your `DistributedDataParallel` model (>= 2 ranks), or the plain module in one process.
    batch_size: examples per micro-batch on this rank (the per-device batch).
    accum_steps: micro-batches per optimizer step (>= 2 in one process: they are the small batches).
    decay: EMA decay of |G|^2 and tr(Sigma). every: measure every N-th step (1 = every step;
    `bigbatch train` defaults to measure.gns_every = 4, where a measured step's cost is measured).
    """

    def __init__(self, model: nn.Module, batch_size: int, *, accum_steps: int = 1, decay: float = 0.95,
                 every: int = 1, process_group=None):
        if batch_size < 1 or accum_steps < 1 or every < 1:
            raise ValueError(f"batch_size, accum_steps and every must be >= 1; got {batch_size}, {accum_steps}, {every}")
        ddp = isinstance(model, nn.parallel.DistributedDataParallel)
        self.world_size = dist.get_world_size(process_group) if ddp and dist.is_initialized() else 1
        self.distributed = self.world_size > 1
        if not self.distributed and accum_steps < 2:
            # one gradient per step is one batch size: the two-batch estimator is undefined
            raise ValueError("one process needs accum_steps >= 2 (the micro-batches are the small batches); "
                             "or pass a DistributedDataParallel model on >= 2 ranks")
        module = model.module if ddp else model
        self.params = [p for p in module.parameters() if p.requires_grad]
        self.batch_size, self.accum_steps, self.every = batch_size, accum_steps, every
        self.group = process_group
        self.estimator = GNSEstimator(decay)
        self.steps = 0  # update() calls
        self.tap = GradNormTap()
        self.tap.enabled = True  # step 0 is measured
        self._pending: tuple | None = None
        self._handles = []
        if self.distributed:
            attach_tap(model, self.tap, self.world_size, process_group)
        else:
            self._handles = [p.register_hook(self.tap) for p in self.params]

    @property
    def b_small(self) -> int:
        return self.batch_size * self.accum_steps if self.distributed else self.batch_size

    @property
    def b_big(self) -> int:
        return self.batch_size * self.accum_steps * self.world_size

    def update(self, scaler: Any = None, *, scale: float | None = None) -> bool:
        """Record this step's two norms (after the backward of its last micro-batch, before the
        optimizer step and zero_grad). `scaler`: a torch.amp.GradScaler (its scale is divided
        out), or pass `scale`. Returns whether this step was measured. Under DDP every rank must
        call it on the same steps (it may start a collective), and every rank must read the
        estimate (or call `remove()`) before `destroy_process_group`: that waits for the last
        step's all-reduce."""
        measured = self.tap.enabled
        self.steps += 1
        local = self.tap.take()
        self.tap.enabled = self.steps % self.every == 0
        if not measured:
            return False
        big = grad_sq_norm(self.params)
        if big is None or (local is None and not self.distributed):
            return False
        self._collect()
        if scale is None:
            scale = scaler.get_scale() if scaler is not None and scaler.is_enabled() else 1.0
        work = None
        if self.distributed:
            # |this rank's mean gradient|^2, averaged over ranks (E over the small batches)
            local = local if local is not None else torch.zeros((), dtype=torch.float64, device=big.device)
            local = local / self.world_size
            work = dist.all_reduce(local, group=self.group, async_op=True)
        else:
            # each micro-batch gradient carries the 1/accum of the loss: |g_i|^2 = accum^2 |tap_i|^2,
            # and the mean over the accum micro-batches is accum x the tapped sum
            local = local * self.accum_steps
        self._pending = (local, big, work, float(scale))
        return True

    def _collect(self) -> None:
        if self._pending is None:
            return
        local, big, work, scale = self._pending
        self._pending = None
        if work is not None:
            work.wait()
        self.estimator.update(float(local), self.b_small, float(big), self.b_big, scale=scale)

    @property
    def b_simple(self) -> float | None:
        """tr(Sigma)/|G|^2 from the EMAs (None before the first measured step)."""
        self._collect()
        return self.estimator.b_simple

    @property
    def grad_sq(self) -> float | None:
        """EMA of |G|^2, the squared norm of the true gradient (bias-corrected)."""
        self._collect()
        return self.estimator.grad_sq

    @property
    def trace_sigma(self) -> float | None:
        """EMA of tr(Sigma), the per-example gradient variance summed over parameters."""
        self._collect()
        return self.estimator.trace_sigma

    def metrics(self) -> dict[str, float]:
        """{'gns/b_simple', 'gns/grad_sq', 'gns/trace_sigma'}: the keys `bigbatch train` logs."""
        self._collect()
        return self.estimator.metrics()

    def state_dict(self) -> dict[str, Any]:
        self._collect()
        return {"estimator": self.estimator.state_dict(), "steps": self.steps}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self._pending = None
        self.estimator.load_state_dict(state["estimator"])
        self.steps = int(state["steps"])
        self.tap.take()
        self.tap.enabled = self.steps % self.every == 0

    def remove(self) -> None:
        """Stop measuring (removes the parameter hooks; a DDP comm hook stays, with the tap off).
        Waits for a pending all-reduce, so the process group can be destroyed after it."""
        self._collect()
        for h in self._handles:
            h.remove()
        self._handles = []
        self.tap.enabled = False
        self.every = 1 << 62
