"""The one owner of the global batch: phases, the GNS-driven controller, the per-device /
accumulation split, and every check that a batch divides over the ranks.

The global batch is the quantity the user sets. Per-device batch and accumulation steps are
derived from it and the world size (`derive_batch`), never the other way round
(global_batch = per_device_batch x accum_steps x world_size, exactly).

The loop asks and tells:

    plan = BatchSchedule(cfg, schedule, world_size)
    global_batch, per_device, accum, lr = plan.at(step)  # before the step (lr: the schedule's)
    plan.observe(steps_done, probes.b_simple)             # after it: what the probes measured

Who decides:
- batch.phases: the schedule (`bigbatch.trainer.recipe`, a pure function of the step);
- batch.adaptive = "gns": `GNSBatchController`, from B_simple as the probes measure it.
The measurement code measures; it does not decide the batch.
"""

from __future__ import annotations

import logging
from typing import Any, Callable

from bigbatch.errors import ConfigError

log = logging.getLogger("bigbatch")


def derive_batch(global_batch: int, world_size: int, accum_steps: int | None, key: str = "batch.global_batch") -> tuple[int, int]:
    """(per_device_batch, accum_steps) from the global batch and the world size.

    global_batch = per_device_batch x accum_steps x world_size, exactly; anything else is an
    error before any work starts.
    """
    accum = accum_steps or 1
    if global_batch % (world_size * accum) != 0:
        raise ConfigError(key, f"global batch {global_batch} is not divisible by world size {world_size} x accum_steps {accum}")
    return global_batch // (world_size * accum), accum


def adaptive_range(cfg) -> tuple[int, int]:
    """(smallest, largest) global batch of batch.adaptive."""
    lo = cfg.batch.min if cfg.batch.min is not None else cfg.batch.global_batch
    hi = cfg.batch.max if cfg.batch.max is not None else 64 * cfg.batch.global_batch
    return lo, hi


def validate(cfg, world_size: int) -> None:
    """ConfigError for a batch setting that cannot work on `world_size` ranks, before any work."""
    derive_batch(cfg.batch.global_batch, world_size, cfg.batch.accum_steps, "batch.global_batch")
    for i, (_, b) in enumerate(cfg.batch.phases):
        derive_batch(b, world_size, cfg.batch.accum_steps, f"batch.phases[{i}]")


def validate_adaptive(cfg, world_size: int) -> None:
    """ConfigError for batch.adaptive settings that cannot work (checked with the probes' settings)."""
    if cfg.batch.adaptive == "gns":
        if not cfg.measure.gns:
            raise ConfigError("batch.adaptive", '"gns" steers the batch by the noise scale: set measure.gns = true')
        lo, hi = adaptive_range(cfg)
        if lo > hi:
            raise ConfigError("batch.max", f"must be >= batch.min ({lo}), got {hi}")
        accum = cfg.batch.accum_steps or 1
        unit = world_size * accum
        if lo % unit:
            raise ConfigError("batch.min", f"{lo} is not divisible by world size {world_size} x accum_steps {accum}")
    if cfg.batch.adaptive != "none" and cfg.data.name == "imagefolder":
        # the adaptive batch re-slices the example stream: image folders stream through a DataLoader
        raise ConfigError("batch.adaptive", "needs an in-memory dataset (mnist1d, digits, synthetic, cifar10), not imagefolder")


class GNSBatchController:
    """batch.adaptive = "gns": double the global batch, every batch.adapt_every steps, while the
    measured B_simple is larger than the current batch (between batch.min and batch.max).

    McCandlish et al. 2018: B_crit ~ B_noise, so while B_simple > B a larger batch still buys
    nearly proportionally fewer steps. The lr follows through the loop's scaling rule
    (`Schedule.lr_at(step, global_batch)`).
    """

    def __init__(self, cfg):
        self.lo, self.hi = adaptive_range(cfg)
        self.every = cfg.batch.adapt_every
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
    lr = `schedule.lr_at(step, global_batch)`.

    The loop asks once per step, so the answers come from a block of BLOCK precomputed steps
    (one call and a list lookup per step; on a ~1 ms CPU step the schedule's own arithmetic,
    ~15 us there, is visible). A block is recomputed when the step leaves it and when the
    controller changes the batch or is restored from a checkpoint.
    """

    BLOCK = 512

    def __init__(self, cfg, schedule, world_size: int):
        self.schedule = schedule
        self.world_size = world_size
        self.accum_steps = cfg.batch.accum_steps
        self.controller = GNSBatchController(cfg) if cfg.batch.adaptive == "gns" else None
        self._first, self._block = 0, []  # steps first .. first + len(block) - 1
        # adaptive runs with train.epochs stop at that many epochs of examples (the step count the
        # schedule derived from the first batch would overshoot once the batch grows)
        self.examples_budget = (cfg.train.epochs * schedule.num_train
                                if self.controller is not None and cfg.train.epochs is not None else None)

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

    def observe(self, step: int, b_simple: Callable[[], float | None]) -> None:
        """After `step` completed steps. `b_simple` is read only when a decision is due (under DDP
        reading it is a collective, which every rank reaches at the same step)."""
        c = self.controller
        if c is None or step % c.every:
            return
        new = c.decide(step, b_simple())
        if new is not None:
            self._block = []  # the steps from here on have the new batch
            log.info("batch.adaptive: B_simple %.0f > batch %d at step %d: global batch -> %d",
                     c.changes[-1]["b_simple"], new // 2, step, new)

    def finished(self, examples: int) -> bool:
        return self.examples_budget is not None and examples >= self.examples_budget

    def state_dict(self) -> dict[str, Any] | None:
        return self.controller.state_dict() if self.controller is not None else None

    def load_state_dict(self, state: dict[str, Any] | None) -> None:
        if self.controller is not None and state:
            self.controller.load_state_dict(state)
            self._block = []
