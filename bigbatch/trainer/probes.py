"""The online probes: what the training loop measures while it trains (GNS, tail index,
sharpness), calling the pure estimators of `bigbatch.measure`. They measure; the batch is decided
by `bigbatch.trainer.batching`, which the loop tells what they measured.

The loop holds one `Probes` and calls it at a few marked places:

    measures = Probes(cfg, env, model, bundle, loss_fn)   # model: the unwrapped module
    measures.begin_step(step)                                                # before the micro-batches
    measures.after_backward(global_batch, per_device, accum, scaler.get_scale)  # before optimizer.step
    measures.after_step(steps_done)                                          # after zero_grad
    plan.observe(steps_done, measures.b_simple)                              # the batch plan reads B_simple
    row.update(measures.metrics())                                           # log rows
    metrics.update(measures.at_eval())                                       # eval rows

`validate(cfg, world_size)` checks the measure settings before any work starts.

Online gradient noise scale (McCandlish et al. 2018, appendix A.1): two squared gradient norms at
two batch sizes per step. The small batches are the micro-batches of every rank (per_device
examples each: gradient accumulation's micro-batches, and under DDP each rank's own): a hook on
each parameter sees a micro-batch's gradient before autograd accumulates it into `.grad` (before,
under DDP, the reducer copies it into a bucket and all-reduces it) and takes its fp32 norm. The
big batch is the global batch: the accumulated `.grad` after backward, under DDP all-reduced. Each
rank keeps EMAs of its own small-batch norms, averaged over ranks only when read (see
`OnlineGNS`). A measured step costs a norm per parameter, one fused norm of `.grad` and no host
sync; on other steps (measure.gns_every) the hooks return at once, and no Python comm hook
replaces DDP's built-in all-reduce.
The loop divides every micro-batch loss by `accum`, and the AMP GradScaler multiplies it by its
scale; both are undone here so the norms are of mean gradients.
"""

from __future__ import annotations

from typing import Any, Callable

import torch
import torch.distributed as dist
from torch import nn

from bigbatch.errors import ConfigError
from bigbatch.measure.gns import GradNormTap, norms_of, sum_of_squares
from bigbatch.measure.modes import measuring
from bigbatch.measure.noise import GNSEstimator
from bigbatch.measure.sharpness import hessian_top_eigs
from bigbatch.measure.tails import probe_tail_index
from bigbatch.trainer.data import tensor_batch


def validate(cfg, world_size: int) -> None:
    """ConfigError for measure settings that cannot work, before any work starts."""
    accum = cfg.batch.accum_steps or 1
    if cfg.measure.gns and world_size == 1 and accum == 1:
        # One gradient per step gives one batch size: the two-batch estimator is undefined
        # (AdaptDL issue 98). Micro-batches or ranks supply the small batch.
        raise ConfigError("measure.gns", "needs two batch sizes per step: in one process set batch.accum_steps >= 2 "
                          "(the micro-batches are the small batches), or train on >= 2 ranks")
    # the probes draw their own examples: they need the in-memory datasets (image folders stream
    # through a DataLoader)
    if cfg.data.name == "imagefolder":
        for key, on in (("measure.tail_every", cfg.measure.tail_every), ("measure.sharpness", cfg.measure.sharpness)):
            if on:
                raise ConfigError(key, "needs an in-memory dataset (mnist1d, digits, synthetic, cifar10), not imagefolder")


def validate_data(cfg, in_memory: bool) -> None:
    """The same check once the data is built: a "module:function" dataset that is map-style (read
    through a DataLoader) cannot feed the tail and sharpness probes either."""
    for key, on in (("measure.tail_every", cfg.measure.tail_every), ("measure.sharpness", cfg.measure.sharpness)):
        if on and not in_memory:
            raise ConfigError(key, f"needs an in-memory dataset; {cfg.data.name} is map-style (return (x, y) tensors instead)")


class OnlineGNS:
    """Online B_simple from the two-batch estimator; see the module docstring for the batches.

    Nothing here waits on the device or the network inside a step, and a step that is not
    measured costs a Python call per parameter that returns at once: the hooks are registered
    on the first measured step and stay (registering and removing them around every measured
    step added 1-2.5 % to a measured 2-rank MLP step; benchmarks/RESULTS.md, stop 22). The norms
    stay tensors until the next measured step (or a read) turns them into floats. Under DDP there is no collective per step at all: the
    estimator's EMAs are linear in the small-batch norm, and the big-batch norm is the same on
    every rank, so each rank keeps EMAs of its own local norm and the rank-average of those EMAs
    is exactly the EMA of the rank-averaged norm. The average is taken only when the estimate is
    read, which every rank does together: at log rows it rides on the loop's loss all-reduce
    (`local_sums` / `take_rank_sums`), at batch decisions and checkpoints it is one all-reduce of
    two scalars. Read it through `estimator`.
    """

    def __init__(self, cfg, env, model: nn.Module):
        self.every = cfg.measure.gns_every
        self.env = env
        self.params = [p for p in model.parameters() if p.requires_grad]
        self._local = GNSEstimator(cfg.measure.gns_ema)  # this rank's EMAs (the estimate in one process)
        self._synced: GNSEstimator | None = None  # rank average of _local, valid until the next update
        self._pending: list[tuple] = []  # measured steps not yet in the EMAs (norms still tensors)
        self.distributed = env.initialized and env.world_size > 1
        self.tap = GradNormTap()
        self._handles: list[Any] = []  # the tap on every parameter's incoming gradient (gated by tap.enabled)

    @property
    def estimator(self) -> GNSEstimator:
        """The estimate over all ranks. Under DDP a collective: every rank must read it together."""
        self._collect()
        if not self.distributed:
            return self._local
        if self._synced is None:
            t = torch.tensor(self.local_sums(), dtype=torch.float64, device=self.env.device)
            dist.all_reduce(t)
            self.take_rank_sums(t.tolist())
        return self._synced

    def local_sums(self) -> list[float]:
        """This rank's EMAs [|G|^2, tr(Sigma)], to be summed over ranks by a caller's all-reduce
        (the loop folds them into its log row's loss all-reduce: no collective of their own)."""
        self._collect()
        state = self._local.state_dict()
        return [state["grad_sq"], state["trace_sigma"]]

    def take_rank_sums(self, sums: list[float]) -> None:
        """The rank sums of `local_sums()` (read on every rank, after no further update)."""
        state = self._local.state_dict()
        self._synced = GNSEstimator(state["decay"])
        self._synced.load_state_dict({**state, "grad_sq": sums[0] / self.env.world_size,
                                      "trace_sigma": sums[1] / self.env.world_size})

    def load_state_dict(self, state: dict[str, float]) -> None:
        """Every rank starts from the saved rank average (the average of identical states is that
        state, so later averages stay exact)."""
        self._local.load_state_dict(state)
        self._synced = None

    def _collect(self) -> None:
        """Every pending step's norms in one device-to-host copy, then the EMA updates in order."""
        if not self._pending:
            return
        values = torch.stack([t for local, big, *_ in self._pending for t in (*local, *big)]).tolist()
        i = 0
        for local, big, factor, b_small, b_big, scale in self._pending:
            small = factor * sum_of_squares(values[i:i + len(local)])
            i += len(local)
            self._local.update(small, b_small, sum_of_squares(values[i:i + len(big)]), b_big, scale=scale)
            i += len(big)
        self._pending = []
        self._synced = None

    def begin_step(self, step: int) -> None:
        self.tap.take_norms()
        self.tap.enabled = step % self.every == 0
        if self.tap.enabled and not self._handles:
            # a micro-batch's local gradient, before autograd accumulates it into .grad (and, under
            # DDP, before the reducer copies it into a bucket and all-reduces it)
            self._handles = [p.register_hook(self.tap) for p in self.params]

    def after_backward(self, global_batch: int, per_device: int, accum: int,
                       scale: float | Callable[[], float] = 1.0) -> bool:
        """Queue this step's two norms for the estimator; False when the step is not measured.
        `scale`: the AMP loss scale, or a function returning it (called only on measured steps,
        as reading a GPU GradScaler's scale synchronises)."""
        if not self.tap.enabled:
            return False
        self.tap.enabled = False
        local, _ = self.tap.take_norms()
        # the big batch: the accumulated .grad, under DDP all-reduced (the mean over all ranks)
        big = norms_of([p.grad for p in self.params if p.grad is not None])
        if not big or not local or per_device >= global_batch:
            return False
        scale = scale() if callable(scale) else scale
        # The small batches are the micro-batches of every rank (per_device examples each). Each
        # micro-batch gradient carries the loop's 1/accum of the loss, |g_i|^2 = accum^2 |tap_i|^2,
        # so the mean over this rank's accum micro-batches is accum x the tapped sum; under DDP the
        # ranks' EMAs of it are averaged when read.
        self._pending.append((local, big, accum, per_device, global_batch, scale))
        return True

    def metrics(self) -> dict[str, float]:
        return self.estimator.metrics()


class TailProbe:
    """Every `measure.tail_every` steps: alpha of minibatch gradient noise (Simsekli et al. 2019).

    Draws `measure.tail_samples` minibatches of the current micro-batch size from the training set
    (its own generator), takes their gradients with the unwrapped model (no DDP, no tap), and
    measures their noise against their mean, the large-batch reference. BatchNorm buffers and the
    global RNG are restored afterwards so training is not disturbed. Each rank estimates alpha on
    its own draws; the estimates are averaged over ranks (one scalar all-reduce).
    Memory: tail_samples x parameters floats on the device.
    """

    def __init__(self, cfg, env, model: nn.Module, train_data, loss_fn):
        self.every = cfg.measure.tail_every
        self.samples = cfg.measure.tail_samples
        self.env, self.model, self.data, self.loss_fn = env, model, train_data, loss_fn
        self.seed = cfg.train.seed
        self.params = [p for p in model.parameters() if p.requires_grad]

    def due(self, step: int) -> bool:
        return self.every > 0 and step % self.every == 0

    def measure(self, step: int, batch: int) -> float:
        gen = torch.Generator().manual_seed(self.seed * 1_000_003 + step * 101 + self.env.rank)
        n = len(self.data)
        rows = []
        with measuring(self.model, "train"):  # the training loss; BN buffers and RNG restored
            for _ in range(self.samples):
                idx = torch.randint(0, n, (batch,), generator=gen)
                x, y = tensor_batch(self.data, idx, self.env.device, train=True)
                grads = torch.autograd.grad(self.loss_fn(self.model(x), y), self.params, allow_unused=True)
                rows.append(torch.cat([(g if g is not None else torch.zeros_like(p)).reshape(-1).float()
                                       for g, p in zip(grads, self.params)]))
        alpha = probe_tail_index(torch.stack(rows))  # centres the raw samples without the small-N bias
        if self.env.initialized and self.env.world_size > 1:
            t = torch.tensor([alpha], dtype=torch.float64, device=self.env.device)
            dist.all_reduce(t)
            alpha = float(t) / self.env.world_size
        return alpha


class SharpnessProbe:
    """Top Hessian eigenvalue of the training loss at each evaluation, on a fixed subset of
    `measure.sharpness_samples` training examples. measure.sharpness_mode "train" (default): the
    loss that is trained, BatchNorm normalising each micro-batch of the current training
    micro-batch size by its own statistics (logged as sharpness/top); "eval": running statistics,
    only when asked for (logged as sharpness/top_eval). Computed on rank 0 only (the replicas are
    identical); other ranks get nothing to log."""

    def __init__(self, cfg, env, model: nn.Module, train_data, loss_fn):
        self.env, self.model, self.data, self.loss_fn = env, model, train_data, loss_fn
        self.iters = cfg.measure.sharpness_iters
        self.mode = cfg.measure.sharpness_mode
        self.key = "sharpness/top" if self.mode == "train" else "sharpness/top_eval"
        n = min(cfg.measure.sharpness_samples, len(train_data))
        self.idx = torch.randperm(len(train_data), generator=torch.Generator().manual_seed(cfg.data.seed))[:n]

    def measure(self, micro_batch: int) -> float | None:
        if not self.env.is_main:
            return None
        x, y = tensor_batch(self.data, self.idx, self.env.device, train=False)
        return hessian_top_eigs(self.model, self.loss_fn, x, y, k=1, iters=self.iters, tol=1e-3, mode=self.mode,
                                micro_batch=micro_batch if self.mode == "train" else None)[0]


class Probes:
    """The one object the training loop talks to (see the module docstring for the call sites)."""

    def __init__(self, cfg, env, model: nn.Module, bundle, loss_fn):
        m = cfg.measure
        self.gns = OnlineGNS(cfg, env, model) if m.gns else None
        self.tail = TailProbe(cfg, env, model, bundle.train, loss_fn) if m.tail_every else None
        self.sharpness = SharpnessProbe(cfg, env, model, bundle.train, loss_fn) if m.sharpness else None
        self._micro: int | None = None  # the training micro-batch, known after the first step
        self._extra: dict[str, float] = {}

    @property
    def active(self) -> bool:
        """Whether any probe is on (without one the loop skips the per-step calls)."""
        return self.gns is not None or self.tail is not None or self.sharpness is not None

    def begin_step(self, step: int) -> None:
        if self.gns is not None:
            self.gns.begin_step(step)

    def after_backward(self, global_batch: int, per_device: int, accum: int,
                       scale: float | Callable[[], float] = 1.0) -> None:
        self._micro = per_device
        if self.gns is not None:
            self.gns.after_backward(global_batch, per_device, accum, scale)

    def after_step(self, step: int) -> None:
        """After `step` completed optimizer steps (gradients already zeroed)."""
        if self.tail is not None and self.tail.due(step):
            self._extra["noise/alpha"] = self.tail.measure(step, self._micro)

    def b_simple(self) -> float | None:
        """The current B_simple estimate (None without measure.gns). Under DDP a collective."""
        return self.gns.estimator.b_simple if self.gns is not None else None

    def row_values(self) -> list[float]:
        """Values the log row's all-reduce sums over ranks for the probes (the GNS EMAs under DDP)."""
        return self.gns.local_sums() if self.gns is not None and self.gns.distributed else []

    def take_row_sums(self, sums: list[float]) -> None:
        if sums:
            self.gns.take_rank_sums(sums)

    def metrics(self) -> dict[str, float]:
        """For a log row: the GNS EMAs, and a probe's value once (at the first row after it ran)."""
        out = dict(self.gns.metrics()) if self.gns is not None else {}
        out.update(self._extra)
        self._extra = {}
        return out

    def at_eval(self) -> dict[str, float]:
        if self.sharpness is None:
            return {}
        top = self.sharpness.measure(self._micro)
        return {} if top is None else {self.sharpness.key: top}

    def state_dict(self) -> dict[str, Any]:
        return {"gns": self.gns.estimator.state_dict() if self.gns is not None else None}

    def load_state_dict(self, state: dict[str, Any] | None) -> None:
        if state and self.gns is not None and state.get("gns"):
            self.gns.load_state_dict(state["gns"])
