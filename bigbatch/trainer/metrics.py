"""Log rows: every [train] log_every steps (and at the last step), the training loss averaged over
all ranks' examples since the previous row, the lr and batch, throughput (examples/s, and tokens/s
for sequences) and MFU, where the step's time went, and the probes' values; into metrics.jsonl,
W&B and a caller's reporter (`bigbatch.track`).

The row's mean loss is one all-reduce of (loss sum, example count), on which the probes' rank sums
ride (the GNS EMAs under DDP): one collective per row. The row goes to the stopper, which ends a run
whose loss is not finite (the same all-reduced value on every rank, so every rank stops there).
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.distributed as dist

from bigbatch.distributed.env import DistEnv
from bigbatch.trainer import flops
from bigbatch.trainer.probes import Probes
from bigbatch.trainer.step import StepRunner
from bigbatch.trainer.stopper import Stopper


class MetricsLogger:
    def __init__(self, log_every: int, env: DistEnv, tracker, stepper: StepRunner, probes: Probes, stopper: Stopper,
                 num_train: int, flops_per_example: int | None, peak_tflops: float | None,
                 tokens_per_example: int = 1):
        self.every, self.env, self.tracker = log_every, env, tracker
        self.losses, self.timer = stepper.losses, stepper.timer
        self.probes, self.stopper = probes, stopper
        self.num_train = num_train
        self.flops_per_example, self.peak_tflops = flops_per_example, peak_tflops
        self._mfu = bool(peak_tflops and flops_per_example)
        self.tokens_per_example = tokens_per_example  # sequences: T targets each (tokens and tokens/s logged)
        self._since = (0, 0.0)  # (examples, training seconds) at the previous row (or the start)

    def start(self, p) -> None:
        """Rates in the first row count from here (a resumed run's first row too)."""
        self._since = (p.examples, p.train_time_s)

    def after_step(self, p, batch: tuple[int, int, int, float]) -> str | None:
        """A row when one is due; "diverged" when its loss is not finite."""
        if p.step % self.every and not p.last:
            return None
        global_batch, _, _, lr = batch
        loss_mean, probe_sums = mean_over_ranks(self.losses.total(), self.losses.count(), self.env,
                                                self.probes.row_values())
        self.probes.take_row_sums(probe_sums)  # the GNS EMAs' rank average rode on the loss's all-reduce
        self.losses.reset()
        examples0, seconds0 = self._since
        samples_per_s = (p.examples - examples0) / max(p.train_time_s - seconds0, 1e-9)
        row = {
            "step": p.step, "examples": p.examples, "epoch": p.examples / self.num_train, "lr": lr,
            "global_batch": global_batch, "loss": loss_mean, "samples_per_s": samples_per_s,
            **self.timer.read(),  # time/data, compute, comm_exposed, step (s): per-step means since the last row
            **({"tokens": p.examples * self.tokens_per_example,
                "tokens_per_s": samples_per_s * self.tokens_per_example} if self.tokens_per_example > 1 else {}),
            "flops_per_example": self.flops_per_example,
            **({"mfu": flops.mfu(self.flops_per_example, samples_per_s, self.peak_tflops, self.env.world_size)}
               if self._mfu else {}),
            **self.probes.metrics(),
        }
        self.tracker.log(row)
        self.tracker.progress(p.step, f"loss {loss_mean:.4f}")
        self._since = (p.examples, p.train_time_s)
        return self.stopper.after_row(row, p)

    def state_dict(self) -> dict[str, Any]:
        """Every rank's loss sum since the last row (the next row's mean needs each rank's part: a
        stop can come at any step); a collective under DDP."""
        own = self.losses.state_dict()
        by_rank = [own["loss_sum"]]
        if self.env.initialized:
            by_rank = [None] * self.env.world_size
            dist.all_gather_object(by_rank, own["loss_sum"])
        return {"loss_sum": by_rank, "count": own["count"]}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """This rank's part on the same world size; on another, rank 0 takes the sum of all (the
        next row's mean over ranks stays the same)."""
        by_rank, rank, world = state["loss_sum"], self.env.rank, self.env.world_size
        if len(by_rank) == world:
            own = by_rank[rank]
        else:
            own = math.fsum(by_rank) if rank == 0 else 0.0
        self.losses.load_state_dict({"loss_sum": own, "count": state["count"]})


def mean_over_ranks(loss_sum: float, count: int, env: DistEnv, extra: list[float]) -> tuple[float, list[float]]:
    """Mean training loss over all examples of all ranks since the last log row, and the rank
    sums of `extra` from the same all-reduce (one collective per log row)."""
    if not env.initialized:
        return loss_sum / max(count, 1), extra
    t = torch.tensor([loss_sum, float(count), *extra], dtype=torch.float64, device=env.device)
    dist.all_reduce(t)
    total, n, *sums = t.tolist()
    return total / max(n, 1.0), sums
