"""The training loop: one run, on one process or data-parallel over many.

Reading order: `run` builds the run's components (`bigbatch.trainer.components.build`) and hands
them to `train`, which restores them from a checkpoint when resuming and calls `train_step` until
a step ends the run. `train_step` reads top to bottom, one call per concern:

    the step's batch and lr       bigbatch.trainer.batching.BatchSchedule      [batch]
    forward/backward/optimizer    bigbatch.trainer.step.StepRunner             [train] amp, compile
    what is measured meanwhile    bigbatch.trainer.probes.Probes               [measure]
    log rows                      bigbatch.trainer.metrics.MetricsLogger       [train] log_every, [track]
    evaluation and the target     bigbatch.trainer.evaluator.Evaluator         [target], [train] eval_*
    when the run stops            bigbatch.trainer.stopper.Stopper             signals, divergence, target, racing
    checkpoints                   bigbatch.trainer.checkpointer.Checkpointer   [checkpoint]

Each component is given its config section (not the whole config), decides its own cadence and
keeps its own state under its own key of the checkpoint. Every run ends through its summary, with
a status: completed, target_reached, diverged, preempted, or the status of a caller's stop rule
(a sweep's racing: slower).

The loss of every micro-batch is its mean divided by the number of micro-batches, and DDP averages
over ranks, so the gradient is the mean over the global batch whatever the world size and
accumulation (Goyal et al. 2017: normalise by the global batch, not per worker).
"""

from __future__ import annotations

import logging
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from bigbatch.config import Config
from bigbatch.distributed import env as dist_env
from bigbatch.trainer import components, preflight
from bigbatch.trainer.checkpointer import select_checkpoint
from bigbatch.trainer.components import Components
from bigbatch.trainer.rundir import default_run_dir, open_run_dir

log = logging.getLogger("bigbatch")

Row = dict[str, Any]
StopRule = Callable[[Row], "dict[str, Any] | None"]


@dataclass
class Progress:
    """How far the run is: what the loop carries across steps (and checkpoints, as "progress")."""

    step: int = 0  # completed optimizer steps
    examples: int = 0  # examples consumed (the example stream's position)
    train_time_s: float = 0.0  # time in training steps (excludes logging, evaluation and checkpoints)
    wall_s: float = 0.0  # wall time of earlier segments of a resumed run
    last: bool = False  # this is the run's last step (set by the batch schedule; not saved)
    started: float = field(default_factory=time.perf_counter, repr=False)

    def state_dict(self) -> dict[str, Any]:
        return {"step": self.step, "examples": self.examples, "train_time_s": self.train_time_s,
                "wall_s": self.wall_s + time.perf_counter() - self.started}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.step, self.examples = int(state["step"]), int(state["examples"])
        self.train_time_s, self.wall_s = float(state["train_time_s"]), float(state["wall_s"])


def run(cfg: Config, out_dir: str | Path | None = None, *, resume: bool = False,
        reporter: Callable[[Row], None] | None = None, stop_rule: StopRule | None = None,
        init_from: str | Path | None = None) -> dict[str, Any]:
    """Train one run; returns the summary (also written to OUT/summary.json on rank 0).

    resume=True: `out_dir` holds a checkpoint and training continues from it. `reporter(row)` is
    called on rank 0 with every metrics row (Ray Tune). `stop_rule(row)` may end the run: it returns
    None or {"status": ..., ...details} (a sweep's racing), agreed across ranks before the run stops.
    `init_from`: a checkpoint to branch from (weights, optimizer state, example-stream position;
    this config's batch, lr and optimizer settings; steps counted from 0).
    Raises ConfigError on bad input before creating anything.
    """
    env = dist_env.init(cfg.dist.backend, cfg.dist.timeout_s)
    preflight.check(cfg, env.world_size, env.local_world_size)  # before generating or loading data
    prepared = components.prepare(cfg, env)  # data, schedule, model: bad input fails before any folder exists
    path = Path(out_dir) if out_dir is not None else None
    if path is None:
        path = dist_env.broadcast_object(default_run_dir(cfg) if env.is_main else None)
    run_dir = open_run_dir(path, env.is_main, cfg.checkpoint.keep)
    saved = select_checkpoint(path, env) if resume else None  # nothing in the folder changes before this
    run_dir.create(cfg)
    dist_env.barrier()
    run_dir.start_logging()
    try:
        c = components.build(cfg, env, prepared, run_dir, reporter, stop_rule)
        return train(c, Progress(), saved, init_from)
    except Exception as e:
        run_dir.log_traceback(f"rank {env.rank}: run failed:\n{traceback.format_exc()}")
        e.run_dir = path  # for the one-line message: where the traceback is
        raise


def train(c: Components, p: Progress, saved: dict[str, Any] | None = None,
          init_from: str | Path | None = None) -> dict[str, Any]:
    """Restore the components (a resumed run) or branch from a checkpoint, then step until a step
    ends the run; the summary."""
    c.checkpointer.restore(saved, p)
    if init_from is not None:
        c.checkpointer.branch_from(init_from, p)
    c.start(p)  # the derived numbers, logged once; a run resumed at its end takes no step
    with c.stopper, c.peer_watch(lambda: p.step), c.metrics.tracker:
        status = c.evaluator.resume(p, c.batches)  # an evaluation a stop signal interrupted, first
        if status is None and p.last:  # resumed at its end (stopped at the last step): no step left
            status = "completed"
        while status is None:
            status = train_step(c, p) or ("completed" if p.last else None)
        c.checkpointer.at_end(p, status, c.stopper.check.signum)  # the final (or stop-signal) checkpoint; none after a divergence
        c.evaluator.at_end(p, status)  # the full sets, when evaluations used a subset
    return c.finish(p, status)


def train_step(c: Components, p: Progress) -> str | None:
    """One optimizer step and what is due after it; a status when the run ends here."""
    batch = c.batches.at(p.step)  # (global batch, per-device batch, accumulation steps, lr) of this step
    c.stepper.run(p, batch)  # forward/backward over this rank's micro-batches, the optimizer step, the probes
    c.batches.after_step(p, c.probes)  # the adaptive batch reads B_simple when due; p.last at the run's end
    return (c.metrics.after_step(p, batch)  # a log row when due: "diverged" on a non-finite loss
            or c.evaluator.after_step(p, batch)  # an evaluation when due: "target_reached" (train.stop_at_target)
            or c.stopper.after_step(p)  # a stop signal or a stop rule, agreed by all ranks
            or c.checkpointer.after_step(p))  # a periodic checkpoint (never a stop)
