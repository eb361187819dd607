"""One training step: forward and backward over this rank's micro-batches, the optimizer step.

Gradient accumulation runs the micro-batches under DDP's `no_sync` but the last, so gradients are
all-reduced once per step; each micro-batch's mean loss is divided by the number of micro-batches,
so `.grad` is the mean gradient of the global batch. AMP: autocast to [train] amp's dtype, and a
GradScaler for fp16. The probes hook in at three points (before the micro-batches, after the last
backward, after the optimizer step); the step timer marks where the time goes
(`bigbatch.trainer.steptime`).

This is the loop's hot path: on a ~1 ms CPU step every Python call is visible, so the settings are
read once here and the step has no branch that is not needed (benchmarks/trainer_overhead.py).
"""

from __future__ import annotations

import contextlib
import time

import torch
from torch import nn

from bigbatch.config import TrainConfig
from bigbatch.distributed.env import DistEnv
from bigbatch.trainer.probes import Probes
from bigbatch.trainer.sources import TensorSource
from bigbatch.trainer.steptime import StepTimer


class LossSum:
    """The training loss summed over this rank's examples since the last log row. The hot path only
    appends each micro-batch's loss tensor (no tensor op, no host sync per step); `total()` sums them
    in float64 once per log row: on a GPU one stacked copy, on the CPU (no copy) each value read."""

    def __init__(self, device: torch.device, start: float = 0.0, count: int = 0):
        self.start, self.start_count = start, count
        self.on_host = device.type == "cpu"
        self.losses: list[torch.Tensor] = []
        self.counts: list[int] = []

    def add(self, loss: torch.Tensor, n: int) -> None:
        """`loss`: a micro-batch's mean loss over its `n` examples."""
        self.losses.append(loss.detach())
        self.counts.append(n)

    def total(self) -> float:
        if not self.losses:
            return self.start
        values = [t.item() for t in self.losses] if self.on_host else torch.stack(self.losses).tolist()
        return self.start + sum(v * n for v, n in zip(values, self.counts))  # float64; inf and nan pass through

    def count(self) -> int:
        return self.start_count + sum(self.counts)

    def reset(self) -> None:
        self.start, self.start_count = 0.0, 0
        self.losses.clear()
        self.counts.clear()

    def state_dict(self) -> dict[str, float]:
        return {"loss_sum": self.total(), "count": self.count()}

    def load_state_dict(self, state: dict[str, float]) -> None:
        self.reset()
        self.start, self.start_count = float(state["loss_sum"]), int(state["count"])


class StepRunner:
    def __init__(self, section: TrainConfig, env: DistEnv, model: nn.Module, ddp_model: nn.Module, optimizer,
                 scaler: torch.amp.GradScaler, amp_dtype: torch.dtype | None, loss_fn: nn.Module,
                 source: TensorSource, probes: Probes):
        self.model, self.ddp_model, self.optimizer, self.scaler = model, ddp_model, optimizer, scaler
        self.train_model = (torch.compile(ddp_model, backend=section.compile_backend) if section.compile
                            else ddp_model)
        self.amp_dtype, self.use_scaler = amp_dtype, scaler.is_enabled()
        self.loss_fn, self.source, self.probes = loss_fn, source, probes
        self.losses = LossSum(env.device)
        self.no_context = contextlib.nullcontext()  # reusable: entering it does nothing
        self.autocast = ((lambda: torch.autocast(env.device.type, dtype=amp_dtype)) if amp_dtype
                         else (lambda: self.no_context))
        # where the step's time goes (the all-reduce's exposed part only where there is one)
        self.timer = StepTimer(env.device, list(model.parameters()) if env.initialized else None)
        self.measuring, self.distributed = probes.active, env.initialized
        self.train_model.train()

    def run(self, p, batch: tuple[int, int, int, float]) -> None:
        """Step `p.step` at `batch` = (global batch, per-device batch, accumulation steps, lr); `p`
        advances by one step and the global batch's examples."""
        t0 = time.perf_counter()
        timer, probes, measuring = self.timer, self.probes, self.measuring
        timer.start()
        step = p.step
        global_batch, per_device, accum, lr = batch
        for group in self.optimizer.param_groups:
            group["lr"] = lr

        # forward and backward over this rank's micro-batches; all-reduce on the last one only
        if measuring:
            probes.begin_step(step)
        for i, (x, y, n) in enumerate(self.source.micro_batches(step, global_batch, accum)):
            sync = i == accum - 1 or not self.distributed
            timer.data_ready(sync)
            with self.no_context if sync else self.ddp_model.no_sync():
                with self.autocast():
                    loss = self.loss_fn(self.train_model(x), y)
                scaled = loss / accum if accum > 1 else loss
                (self.scaler.scale(scaled) if self.use_scaler else scaled).backward()
            timer.backward_done()
            self.losses.add(loss, n)
        if measuring:
            probes.after_backward(global_batch, per_device, accum, self.scaler.get_scale)
            timer.lap("other")

        # the optimizer step
        if self.use_scaler:
            self.scaler.step(self.optimizer)
            self.scaler.update()
        else:
            self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        timer.lap("compute")
        p.step += 1
        p.examples += global_batch
        if measuring:
            probes.after_step(p.step)
        timer.stop()
        p.train_time_s += time.perf_counter() - t0

    def close(self) -> None:
        self.timer.close()
