"""The one owner of the global batch: phases, the GNS-driven controller, the per-device /
accumulation split, and how long the run is.

The global batch is the quantity the user sets. Per-device batch and accumulation steps are
derived from it and the world size (`derive_batch`), never the other way round
(global_batch = per_device_batch x accum_steps x world_size, exactly; every batch a run can take
is checked to divide before launch, `BatchConfig.check`).

The loop asks and tells:

    batches = BatchSchedule(cfg.batch, schedule, world_size, epochs=cfg.train.epochs)
    global_batch, per_device, accum, lr = batches.at(step)  # before the step (lr: the schedule's)
    batches.after_step(progress, probes)                     # after it: B_simple when a decision is due

Who decides:
- batch.phases: the schedule (`bigbatch.trainer.recipe`, a pure function of the step);
- batch.adaptive = "gns": `GNSBatchController`, from B_simple as the probes measure it.
The measurement code measures; it does not decide the batch.
"""

from __future__ import annotations

import logging
from typing import Any

from bigbatch.config import BatchConfig, derive_batch

__all__ = ["BatchSchedule", "GNSBatchController", "derive_batch"]

log = logging.getLogger("bigbatch")


class GNSBatchController:
    """batch.adaptive = "gns": double the global batch, every batch.adapt_every steps, while the
    measured B_simple is larger than the current batch (between batch.min and batch.max).

    McCandlish et al. 2018: B_crit ~ B_noise, so while B_simple > B a larger batch still buys
    nearly proportionally fewer steps. The lr follows through the loop's scaling rule
    (`Schedule.lr_at(step, global_batch)`).
    """

    def __init__(self, section: BatchConfig):
        self.lo, self.hi = section.adaptive_range()
        self.every = section.adapt_every
        self.batch = self.lo
        self.changes: list[dict[str, Any]] = []

    def decide(self, step: int, b_simple: float | None) -> int | None:
        """After `step` completed steps; returns the new batch when it changes."""
        if step % self.every or b_simple is None or b_simple <= self.batch or self.batch * 2 > self.hi:
            return None
        old, self.batch = self.batch, self.batch * 2
        self.changes.append({"step": step, "from": old, "to": self.batch, "b_simple": b_simple})
        return self.batch

    def state_dict(self) -> dict[str, Any]:
        return {"batch": self.batch, "changes": list(self.changes)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.batch = int(state["batch"])
        self.changes = list(state["changes"])


class BatchSchedule:
    """The batch of every step of one run: `at(step)` -> (global_batch, per_device, accum, lr),
    lr = `schedule.lr_at(step, global_batch)`; and whether a step is the run's last.

    The loop asks once per step, so the answers come from a block of BLOCK precomputed steps
    (one call and a list lookup per step; on a ~1 ms CPU step the schedule's own arithmetic,
    ~15 us there, is visible). A block is recomputed when the step leaves it and when the
    controller changes the batch or is restored from a checkpoint.
    """

    BLOCK = 512

    def __init__(self, section: BatchConfig, schedule, world_size: int, epochs: float | None = None):
        self.schedule = schedule
        self.world_size = world_size
        self.accum_steps = section.accum_steps
        self.controller = GNSBatchController(section) if section.adaptive == "gns" else None
        self._first, self._block = 0, []  # steps first .. first + len(block) - 1
        # adaptive runs with train.epochs stop at that many epochs of examples (the step count the
        # schedule derived from the first batch would overshoot once the batch grows)
        self.examples_budget = epochs * schedule.num_train if self.controller is not None and epochs is not None else None

    def split(self, global_batch: int) -> tuple[int, int]:
        """(per_device, accum) of `global_batch` on this world."""
        return derive_batch(global_batch, self.world_size, self.accum_steps)

    def at(self, step: int) -> tuple[int, int, int, float]:
        i = step - self._first
        if 0 <= i < len(self._block):
            return self._block[i]
        return self._fill(step)

    def _fill(self, step: int) -> tuple[int, int, int, float]:
        steps = range(step, max(min(step + self.BLOCK, self.schedule.total_steps), step + 1))
        c, block = self.controller, []
        for s in steps:
            batch = c.batch if c is not None else self.schedule.batch_at(s)
            block.append((batch, *self.split(batch), self.schedule.lr_at(s, batch)))
        self._first, self._block = step, block
        return block[0]

    def after_step(self, p, probes) -> None:
        """After a step (`p.step` completed): the adaptive batch decides when a decision is due,
        reading B_simple (under DDP a collective, which every rank reaches at the same step);
        `p.last` marks the run's last step."""
        c = self.controller
        if c is not None and p.step % c.every == 0:
            new = c.decide(p.step, probes.b_simple())
            if new is not None:
                self._block = []  # the steps from here on have the new batch
                log.info("batch.adaptive: B_simple %.0f > batch %d at step %d: global batch -> %d",
                         c.changes[-1]["b_simple"], new // 2, p.step, new)
        p.last = self.done(p)

    def done(self, p) -> bool:
        return p.step >= self.schedule.total_steps or (self.examples_budget is not None and p.examples >= self.examples_budget)

    def state_dict(self) -> dict[str, Any] | None:
        return self.controller.state_dict() if self.controller is not None else None

    def load_state_dict(self, state: dict[str, Any] | None) -> None:
        if self.controller is not None and state:
            self.controller.load_state_dict(state)
            self._block = []
