"""The gradient noise scale while training: `GradientNoiseScale`, the one online estimator.

B_simple = tr(Sigma) / |G|^2 (McCandlish, Kaplan, Amodei 2018), from the squared norms of the
gradient at two batch sizes in every measured step (appendix A.1), with no extra forward or
backward pass. `bigbatch train`'s probe (`bigbatch.trainer.probes`) wraps this class; use it in
your own loop the same way:

    gns = GradientNoiseScale(ddp_model, batch_size=micro_batch, accum_steps=accum)
    for x, y in loader:                  # accum micro-batches per step, each loss divided by accum
        scaler.scale(loss_fn(ddp_model(x), y) / accum).backward()
        ...
        gns.update(scaler)               # after the step's last backward, before scaler.step / zero_grad
        scaler.step(optimizer); scaler.update(); optimizer.zero_grad()
    print(gns.b_simple, gns.grad_sq, gns.trace_sigma)

The two batch sizes, the same in one process and under DDP:
- small: one micro-batch of one rank (`batch_size` examples). A hook on every parameter sees
  the micro-batch's gradient before autograd adds it into `.grad` (and, under DDP, before the
  reducer copies it into a bucket): one fused-norm per parameter, no comm hook, so any DDP comm
  hook (bigbatch's ring or yours) keeps working.
- big: the step's gradient in `.grad` after the last backward: the accumulated micro-batches,
  under DDP also all-reduced, i.e. the mean over `batch_size x accum_steps x world_size` examples.
So one process needs accum_steps >= 2 (one gradient per step is one batch size: the estimator is
undefined, AdaptDL issue 98); under DDP one micro-batch per rank is enough.

Each micro-batch's loss carries the loop's 1/accum, so its gradient is |g_i| = accum |tap_i|:
the small-batch estimate E|g_i|^2 is accum^2 x the mean of the tapped squares = accum x their sum.
The AMP loss scale: both norms are of scaled gradients; `update(scaler)` (or `scale=`) divides
them by scale^2, and a step whose norms are not finite (the GradScaler skips it) is skipped here.

The estimate is the EMA of both quantities (`GNSEstimator`, bias-corrected), the ratio taken last.
Nothing converts a device tensor to a float inside the step that measured it: a measured step's
norms stay tensors until the estimate is read (one device-to-host copy for all pending steps).
Under DDP the ranks' small-batch norms differ and the big-batch norm is the same on every rank;
the EMAs are linear in both, so the rank average of each rank's own EMAs is exactly the EMA of
the rank-averaged norms. When that average is taken is the `sync` policy:
- "step" (default): each measured step starts one asynchronous all-reduce of a scalar (the rank's
  small-batch squared norm), waited for when the estimate is read; every rank then holds the same
  EMAs and any rank may read them alone. Read it (or `remove()`)
  on every rank before `destroy_process_group`: gloo aborts a process whose group is destroyed
  with a collective pending.
- "read": no collective in any step; the average is taken when the estimate is read, which every
  rank must then do together (`bigbatch train` reads it at log rows, where the two EMAs ride on
  the loss's all-reduce: `local_sums` / `take_rank_sums`).
"""

from __future__ import annotations

from typing import Any, Callable

import torch
import torch.distributed as dist
from torch import nn

from bigbatch.measure.noise import GNSEstimator


class GradNormTap:
    """While enabled, keeps the L2 norm (a 0-d fp32 tensor) of every gradient it is shown."""

    def __init__(self) -> None:
        self.enabled = False
        self.norms: list[torch.Tensor] = []

    def __call__(self, grad: torch.Tensor) -> None:
        if self.enabled and grad is not None:
            self.norms.append(torch.linalg.vector_norm(grad))

    def take_norms(self) -> list[torch.Tensor]:
        """The norms since the last take; the tap starts empty."""
        norms, self.norms = self.norms, []
        return norms


def norms_of(tensors: list[torch.Tensor]) -> list[torch.Tensor]:
    """fp32 L2 norms (0-d tensors) of `tensors`, one fused call."""
    return list(torch._foreach_norm(tensors)) if tensors else []


def sum_of_squares(values: list[float]) -> float:
    """Squared norms summed in float64, in order."""
    total = 0.0
    for v in values:
        total += v * v
    return total


class GradientNoiseScale:
    """Online B_simple of a model (see the module docstring for the two batches and `sync`).

    model: the `DistributedDataParallel` model (>= 2 ranks) or the plain module.
    batch_size: examples per micro-batch on this rank. accum_steps: micro-batches per optimizer
    step (>= 2 in one process). decay: EMA decay of |G|^2 and tr(Sigma). every: measure every
    N-th step (1 = every step; `bigbatch train` defaults to measure.gns_every = 4).

    `update()` counts steps itself. A caller that knows its step number and batch sizes per step
    (`bigbatch train`, whose batch may grow) drives the same measurement with `begin_step(step)`
    before the step's micro-batches and `record(...)` after its last backward.
    """

    def __init__(self, model: nn.Module, batch_size: int = 1, *, accum_steps: int = 1, decay: float = 0.95,
                 every: int = 1, process_group=None, sync: str = "step"):
        if batch_size < 1 or accum_steps < 1 or every < 1:
            raise ValueError(f"batch_size, accum_steps and every must be >= 1; got {batch_size}, {accum_steps}, {every}")
        if sync not in ("step", "read"):
            raise ValueError(f'sync must be "step" or "read", got {sync!r}')
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
        self.group, self.sync = process_group, sync
        self._local = GNSEstimator(decay)  # this rank's EMAs (the estimate itself in one process)
        self._synced: GNSEstimator | None = None  # the rank average of _local, valid until the next update
        self._pending: list[tuple] = []  # measured steps not yet in the EMAs (norms still tensors)
        self.steps = 0  # update() calls
        self.tap = GradNormTap()
        self._handles: list[Any] = []
        self.begin_step(0)

    # --- driving the measurement ------------------------------------------------------------------

    def begin_step(self, step: int) -> None:
        """Before step `step`'s micro-batches: the tap is on when the step is measured. The hooks
        are registered on the first measured step and stay (gated by the tap), since registering
        and removing them around every measured step cost 1-2.5 % of a measured 2-rank MLP step
        (benchmarks/RESULTS.md, stop 22)."""
        self.tap.take_norms()
        self.tap.enabled = step % self.every == 0
        if self.tap.enabled and not self._handles:
            self._handles = [p.register_hook(self.tap) for p in self.params]

    def record(self, b_small: int, b_big: int, accum: int,
               scale: float | Callable[[], float] = 1.0) -> bool:
        """After a measured step's last backward (before the optimizer step): queue its two norms.
        `scale`: the AMP loss scale, or a function returning it (called only on measured steps,
        as reading a GPU GradScaler's scale synchronises). False when the step is not measured."""
        if not self.tap.enabled:
            return False
        self.tap.enabled = False
        small = self.tap.take_norms()
        big = norms_of([p.grad for p in self.params if p.grad is not None])
        if not big or not small or b_small >= b_big:
            return False
        scale = float(scale() if callable(scale) else scale)
        work = None
        if self.sync == "step" and self.distributed:
            # the rank average of this rank's small-batch sum of squares, in flight until the next read
            sq = torch.stack(small).double().square().sum() / self.world_size
            work = dist.all_reduce(sq, group=self.group, async_op=True)
            small = [sq]
        self._pending.append((small, big, work, accum, b_small, b_big, scale))
        self._synced = None
        return True

    def update(self, scaler: Any = None, *, scale: float | None = None) -> bool:
        """For your own loop: record this step (after its last backward, before the optimizer step
        and zero_grad) and count it. `scaler`: a torch.amp.GradScaler (its scale is divided out),
        or pass `scale`. Returns whether the step was measured. Under DDP every rank calls it on
        the same steps."""
        if scale is None:
            scale = scaler.get_scale() if scaler is not None and scaler.is_enabled() else 1.0
        b = self.batch_size
        measured = self.record(b, b * self.accum_steps * self.world_size, self.accum_steps, scale)
        self.steps += 1
        self.begin_step(self.steps)
        return measured

    # --- the estimate -----------------------------------------------------------------------------

    def _collect(self) -> None:
        """Every pending step's norms in one device-to-host copy, then the EMA updates in order."""
        if not self._pending:
            return
        norms, reduced = [], []  # fp32 norms; sync="step": the rank-averaged small-batch sums (fp64)
        for small, big, work, *_ in self._pending:
            if work is not None:
                work.wait()
                reduced.append(small[0])
                norms += big
            else:
                norms += small + big
        values = torch.stack(norms).tolist()
        sums = torch.stack(reduced).tolist() if reduced else []
        i = j = 0
        for small, big, work, accum, b_small, b_big, scale in self._pending:
            # E|g_i|^2 = accum x the tapped sum of squares (module docstring)
            if work is not None:
                sq_small, j = accum * sums[j], j + 1
            else:
                sq_small, i = accum * sum_of_squares(values[i:i + len(small)]), i + len(small)
            self._local.update(sq_small, b_small, sum_of_squares(values[i:i + len(big)]), b_big, scale=scale)
            i += len(big)
        self._pending = []
        self._synced = None

    @property
    def estimator(self) -> GNSEstimator:
        """The estimate over all ranks. sync="read" under DDP: a collective (every rank reads together)."""
        self._collect()
        if not self.distributed or self.sync == "step":  # sync="step": _local already holds rank averages
            return self._local
        if self._synced is None:
            t = torch.tensor(self.local_sums(), dtype=torch.float64, device=self.params[0].device)
            dist.all_reduce(t, group=self.group)
            self.take_rank_sums(t.tolist())
        return self._synced

    def local_sums(self) -> list[float]:
        """This rank's EMAs [|G|^2, tr(Sigma)], for a caller's all-reduce to sum over ranks."""
        self._collect()
        state = self._local.state_dict()
        return [state["grad_sq"], state["trace_sigma"]]

    def take_rank_sums(self, sums: list[float]) -> None:
        """The rank sums of `local_sums()` (taken on every rank, with no update in between)."""
        state = self._local.state_dict()
        self._synced = GNSEstimator(state["decay"])
        self._synced.load_state_dict({**state, "grad_sq": sums[0] / self.world_size,
                                      "trace_sigma": sums[1] / self.world_size})

    @property
    def b_simple(self) -> float | None:
        """tr(Sigma)/|G|^2 from the EMAs (None before the first measured step)."""
        return self.estimator.b_simple

    @property
    def grad_sq(self) -> float | None:
        """EMA of |G|^2, the squared norm of the true gradient (bias-corrected)."""
        return self.estimator.grad_sq

    @property
    def trace_sigma(self) -> float | None:
        """EMA of tr(Sigma), the per-example gradient variance summed over parameters."""
        return self.estimator.trace_sigma

    def metrics(self) -> dict[str, float]:
        """{'gns/b_simple', 'gns/grad_sq', 'gns/trace_sigma'}: the keys `bigbatch train` logs."""
        return self.estimator.metrics()

    # --- checkpoints and teardown -----------------------------------------------------------------

    def state_dict(self) -> dict[str, Any]:
        """The rank-averaged EMAs and the update count (under DDP every rank calls it together)."""
        return {"estimator": self.estimator.state_dict(), "steps": self.steps}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Every rank starts from the saved rank average (the average of identical states is that
        state, so later averages stay exact)."""
        self._pending, self._synced = [], None
        self._local.load_state_dict(state["estimator"])
        self.steps = int(state["steps"])
        self.begin_step(self.steps)

    def remove(self) -> None:
        """Stop measuring: removes the hooks and waits for a pending all-reduce, so the process
        group can be destroyed after it."""
        self._collect()
        for h in self._handles:
            h.remove()
        self._handles = []
        self.tap.enabled = False
        self.every = 1 << 62
