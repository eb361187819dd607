"""The components of one run, built from the config: the one place that reads the whole config
and hands each component its own section.

    c = build(cfg, env, run_dir, reporter, stop_rule)
    c.batches       BatchSchedule   the batch and lr of every step           checkpoint key "batch"
    c.stepper       StepRunner      forward, backward, optimizer step        "model", "optimizer", "scaler"
    c.probes        Probes          what is measured while training          "probes"
    c.metrics       MetricsLogger   log rows (metrics.jsonl, W&B, Ray Tune)  "metrics"
    c.evaluator     Evaluator       evaluations, the target                  "evaluator"
    c.stopper       Stopper         stop signals, divergence, target, rules  (nothing to keep)
    c.checkpointer  Checkpointer    saves and restores all of the above      (+ "progress", "rng")

`Components.finish` writes the summary that every run ends with.
"""

from __future__ import annotations

import contextlib
import logging
import time
from dataclasses import dataclass
from typing import Any, Callable

import torch
from torch import nn

from bigbatch.config import Config
from bigbatch.distributed import env as dist_env
from bigbatch.errors import PeerLostError
from bigbatch.trainer import checkpoint as ckpt
from bigbatch.trainer import flops, probes
from bigbatch.trainer.batching import BatchSchedule
from bigbatch.trainer.build import amp_settings, prepare_model, wrap_ddp
from bigbatch.trainer.checkpointer import Checkpointer
from bigbatch.trainer.dali import require_dali
from bigbatch.trainer.data import DataBundle, build_data
from bigbatch.trainer.evaluator import Evaluator
from bigbatch.trainer.metrics import MetricsLogger
from bigbatch.trainer.objective import TrainingLoss, tokens_per_example
from bigbatch.trainer.optim import build_optimizer
from bigbatch.trainer.probes import Probes
from bigbatch.trainer.recipe import Schedule
from bigbatch.trainer.rundir import NullRunDir
from bigbatch.trainer.sources import make_source
from bigbatch.trainer.step import StepRunner
from bigbatch.trainer.stopper import Stopper
from bigbatch.trainer.stream import ExampleStream
from bigbatch.track import make_tracker
from bigbatch import config as config_mod

log = logging.getLogger("bigbatch")


@dataclass
class Components:
    env: dist_env.DistEnv
    run_dir: NullRunDir
    schedule: Schedule
    batches: BatchSchedule
    stepper: StepRunner
    probes: Probes
    metrics: MetricsLogger
    evaluator: Evaluator
    stopper: Stopper
    checkpointer: Checkpointer
    timeout_s: float

    def start(self, p) -> None:
        """Before the first step: the derived numbers, once (nanoGPT prints "tokens per iteration
        will be ..."); whether the run is already over (resumed at its end); rates count from here."""
        p.last = self.batches.done(p)
        self.metrics.start(p)
        global_batch, per_device, accum, _ = self.batches.at(p.step)
        log.info("%s", self.schedule.describe())
        log.info("global batch %d = %d rank(s) x %d per device x %d accumulation step(s); device %s, backend %s, amp %s",
                 global_batch, self.env.world_size, per_device, accum, self.env.device,
                 self.env.backend or "none (1 process)", self.stepper.amp_dtype or "off")

    @contextlib.contextmanager
    def peer_watch(self, step: Callable[[], int]):
        """Turn a collective that failed because a peer rank stopped answering into PeerLostError:
        which step, the timeout, and the checkpoint to resume from."""
        try:
            yield
        except Exception as e:
            kind = dist_env.peer_failure(e) if self.env.world_size > 1 else None
            if kind is None:
                raise
            last = ckpt.latest(self.run_dir.path)
            where = (f"resume from {last.name} with `bigbatch train --resume {self.run_dir.path}`" if last is not None
                     else "no checkpoint was written yet (set checkpoint.every to keep progress)")
            why = (f"a peer rank stopped answering within dist.timeout_s = {self.timeout_s:g} s" if kind == "timeout"
                   else "a peer rank's connection closed (it stopped or died)")
            raise PeerLostError(f"rank {self.env.rank}: collective failed in step {step() + 1}: {why}; {where}") from e

    def finish(self, p, status: str) -> dict[str, Any]:
        """The run's summary (written unless the run stopped to be resumed), trackers closed."""
        self.stepper.close()
        wall = p.wall_s + time.perf_counter() - p.started
        ev = self.evaluator
        summary = {
            "status": status,
            "steps": p.step,
            "examples": p.examples,
            "epochs": p.examples / self.schedule.num_train,
            "global_batch": self.batches.at(max(p.step - 1, 0))[0],
            "world_size": self.env.world_size,
            "peak_lr": self.schedule.peak_lr(self.schedule.batch_at(0)),
            **(dict(zip(("betas", "weight_decay"), self.schedule.adamw_settings())) 
               if self.schedule.optim.beta2_scaling != "none" or self.schedule.optim.timescale is not None else {}),
            **{k: ev.last.get(k) for k in ("test_acc", "test_loss", "train_acc", "train_loss")},
            "steps_to_target": ev.steps_to_target,
            "examples_to_target": ev.examples_to_target,
            "wall_s": wall,
            "train_s": p.train_time_s,
            "samples_per_s": p.examples / max(p.train_time_s, 1e-9),
            "flops_per_example": self.metrics.flops_per_example,
            **({"tokens": p.examples * self.metrics.tokens_per_example,
                "tokens_per_example": self.metrics.tokens_per_example} if self.metrics.tokens_per_example > 1 else {}),
            **({"stopped_by": self.stopper.detail} if self.stopper.detail else {}),
        }
        if status != "preempted":
            self.run_dir.write_summary(summary)
        self.metrics.tracker.close(exit_code=0 if status in ("completed", "target_reached") else 1)
        fmt = lambda v: "n/a" if v is None else f"{v:.4f}"  # noqa: E731
        log.info("%s after %d steps: test_acc %s, test_loss %s, %.0f samples/s, %.1f s", status, p.step,
                 fmt(summary["test_acc"]), fmt(summary["test_loss"]), summary["samples_per_s"], wall)
        return summary


@dataclass
class Prepared:
    """What is built before the run folder exists, so that bad input (a user's dataset or model)
    fails with nothing written."""

    bundle: DataBundle
    schedule: Schedule
    model: nn.Module


def prepare(cfg: Config, env: dist_env.DistEnv) -> Prepared:
    """The data, the schedule and the model on its device."""
    if cfg.data.backend == "dali":
        require_dali()
    bundle = build_data(cfg.data)
    probes.validate_data(cfg.measure, cfg.data.name, bundle.in_memory)
    return Prepared(bundle, Schedule(cfg, len(bundle.train)), prepare_model(cfg, bundle, env))


def build(cfg: Config, env: dist_env.DistEnv, prepared: Prepared, run_dir: NullRunDir, reporter: Callable | None = None,
          stop_rule: Callable | None = None) -> Components:
    """Every component of a run on this rank, each given its own config section."""
    bundle, schedule, model = prepared.bundle, prepared.schedule, prepared.model
    batches = BatchSchedule(cfg.batch, schedule, env.world_size, epochs=cfg.train.epochs)
    amp_dtype, use_scaler = amp_settings(cfg.train.amp, env.device)
    scaler = torch.amp.GradScaler(env.device.type, enabled=use_scaler)
    optimizer = build_optimizer(schedule.optim_config(), model, schedule.lr_at(0))
    ddp_model = wrap_ddp(model, cfg, env)
    loss_fn = TrainingLoss(cfg.train.label_smoothing, cfg.train.ignore_index)
    probe = Probes(cfg.measure, env, model, ddp_model, bundle.train, loss_fn, seed=cfg.train.seed,
                   subset_seed=cfg.data.seed, accum_steps=cfg.batch.accum_steps or 1)
    stream = ExampleStream(len(bundle.train), cfg.train.seed)
    source = make_source(cfg, env, bundle, stream, batches.at(0)[1])
    stepper = StepRunner(cfg.train, env, model, ddp_model, optimizer, scaler, amp_dtype, loss_fn, source, probe)
    tracker = make_tracker(env.is_main, run_dir.path, config_mod.to_dict(cfg), cfg.track, schedule.total_steps,
                           reporter=reporter)
    stopper = Stopper(env, stop_rule, stop_at_target=cfg.train.stop_at_target, within_s=cfg.checkpoint.stop_within_s)
    fpe = flops.train_flops_per_example(model, bundle.input_shape)  # counted once
    metrics = MetricsLogger(cfg.train.log_every, env, tracker, stepper, probe, stopper, len(bundle.train), fpe,
                            flops.resolve_peak_tflops(cfg.train.peak_tflops, env.device, amp_dtype),
                            tokens_per_example(bundle.target_shape))
    evaluator = Evaluator(cfg.target, cfg.train, cfg.data, env, model, bundle, tracker, probe, stopper)
    checkpointer = Checkpointer(cfg.checkpoint, env, run_dir, tracker, stream, {
        "model": model, "optimizer": optimizer, "scaler": scaler, "batch": batches, "probes": probe,
        "metrics": metrics, "evaluator": evaluator})
    return Components(env, run_dir, schedule, batches, stepper, probe, metrics, evaluator, stopper, checkpointer,
                      cfg.dist.timeout_s)
