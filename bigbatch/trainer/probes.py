"""The online probes: what the training loop measures while it trains (GNS, tail index,
sharpness), calling the estimators of `bigbatch.measure`. They measure; the batch is decided by
`bigbatch.trainer.batching`, which reads B_simple from here.

The step runner calls the probes at three points of a step, the evaluator at evaluations, the
metrics logger at log rows:

    probes.begin_step(step)                                               # before the micro-batches
    probes.after_backward(global_batch, per_device, accum, scaler.get_scale)  # before optimizer.step
    probes.after_step(steps_done)                                         # after zero_grad
    row.update(probes.metrics()); probes.at_eval()                        # log rows, evaluations

B_simple (measure.gns) is `bigbatch.measure.gns.GradientNoiseScale`, the same estimator a user
attaches to their own loop: the small batch is one micro-batch of one rank, the big batch the
step's accumulated (and, under DDP, all-reduced) gradient. Here with sync="read": no collective in
any step; the ranks' EMAs are averaged when read, at log rows on the loss's all-reduce. A measured
step costs a norm per parameter, one fused norm of `.grad` and no host sync; on other steps
(measure.gns_every) the hooks return at once.
"""

from __future__ import annotations

from typing import Any, Callable

import torch
import torch.distributed as dist
from torch import nn

from bigbatch.config import MeasureConfig
from bigbatch.errors import ConfigError
from bigbatch.measure.gns import GradientNoiseScale
from bigbatch.measure.modes import measuring
from bigbatch.measure.sharpness import hessian_top_eigs
from bigbatch.measure.tails import probe_tail_index
from bigbatch.trainer.data import tensor_batch


def validate_data(section: MeasureConfig, data_name: str, in_memory: bool) -> None:
    """Once the data is built: a "module:function" dataset that is map-style (read through a
    DataLoader) cannot feed the tail and sharpness probes (they draw their own examples)."""
    for key, on in (("measure.tail_every", section.tail_every), ("measure.sharpness", section.sharpness)):
        if on and not in_memory:
            raise ConfigError(key, f"needs an in-memory dataset; {data_name} is map-style (return (x, y) tensors instead)")


class TailProbe:
    """Every `measure.tail_every` steps: alpha of minibatch gradient noise (Simsekli et al. 2019).

    Draws `measure.tail_samples` minibatches of the current micro-batch size from the training set
    (its own generator), takes their gradients with the unwrapped model (no DDP, no tap), and
    measures their noise against their mean, the large-batch reference. BatchNorm buffers and the
    global RNG are restored afterwards so training is not disturbed. Each rank estimates alpha on
    its own draws; the estimates are averaged over ranks (one scalar all-reduce).
    Memory: tail_samples x parameters floats on the device.
    """

    def __init__(self, section: MeasureConfig, env, model: nn.Module, train_data, loss_fn, seed: int):
        self.every = section.tail_every
        self.samples = section.tail_samples
        self.env, self.model, self.data, self.loss_fn = env, model, train_data, loss_fn
        self.seed = seed
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

    def __init__(self, section: MeasureConfig, env, model: nn.Module, train_data, loss_fn, subset_seed: int):
        self.env, self.model, self.data, self.loss_fn = env, model, train_data, loss_fn
        self.iters = section.sharpness_iters
        self.mode = section.sharpness_mode
        self.key = "sharpness/top" if self.mode == "train" else "sharpness/top_eval"
        n = min(section.sharpness_samples, len(train_data))
        self.idx = torch.randperm(len(train_data), generator=torch.Generator().manual_seed(subset_seed))[:n]

    def measure(self, micro_batch: int) -> float | None:
        if not self.env.is_main:
            return None
        x, y = tensor_batch(self.data, self.idx, self.env.device, train=False)
        return hessian_top_eigs(self.model, self.loss_fn, x, y, k=1, iters=self.iters, tol=1e-3, mode=self.mode,
                                micro_batch=micro_batch if self.mode == "train" else None)[0]


class Probes:
    """The one object the step runner, the metrics logger and the evaluator talk to."""

    def __init__(self, section: MeasureConfig, env, model: nn.Module, ddp_model: nn.Module, train_data, loss_fn, *,
                 seed: int, subset_seed: int, accum_steps: int = 1):
        m = section
        self.gns = (GradientNoiseScale(ddp_model, accum_steps=accum_steps, decay=m.gns_ema, every=m.gns_every, sync="read")
                    if m.gns else None)
        self.tail = TailProbe(m, env, model, train_data, loss_fn, seed) if m.tail_every else None
        self.sharpness = SharpnessProbe(m, env, model, train_data, loss_fn, subset_seed) if m.sharpness else None
        self._micro: int | None = None  # the training micro-batch, known after the first step
        self._extra: dict[str, float] = {}

    @property
    def active(self) -> bool:
        """Whether any probe is on (without one the step runner skips the per-step calls)."""
        return self.gns is not None or self.tail is not None or self.sharpness is not None

    def begin_step(self, step: int) -> None:
        if self.gns is not None:
            self.gns.begin_step(step)

    def after_backward(self, global_batch: int, per_device: int, accum: int,
                       scale: float | Callable[[], float] = 1.0) -> None:
        self._micro = per_device
        if self.gns is not None:
            self.gns.record(per_device, global_batch, accum, scale)

    def after_step(self, step: int) -> None:
        """After `step` completed optimizer steps (gradients already zeroed)."""
        if self.tail is not None and self.tail.due(step):
            self._extra["noise/alpha"] = self.tail.measure(step, self._micro)

    def b_simple(self) -> float | None:
        """The current B_simple estimate (None without measure.gns). Under DDP a collective."""
        return self.gns.b_simple if self.gns is not None else None

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
        """Under DDP a collective (the GNS EMAs' rank average): every rank saves together."""
        return {"gns": self.gns.state_dict() if self.gns is not None else None}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if state and self.gns is not None and state.get("gns"):
            self.gns.load_state_dict(state["gns"])
