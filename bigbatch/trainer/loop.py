"""The training loop: one run, on one process or data-parallel over many.

Reading order: `run` builds the parts (process group, data, model, schedule, run folder) and
hands them to `_train`, a single top-to-bottom loop. Per step it asks the batch plan for the
step's batch and lr (the schedule's, from a table), runs this rank's micro-batches from the data
source (gradient accumulation under DDP's `no_sync`, so gradients are all-reduced once per step),
steps the optimizer, tells the probes and the batch plan, and now and then logs, evaluates and
checkpoints. Who owns what:

    bigbatch.trainer.batching   the batch of every step (phases, GNS control, per-device/accum split)
    bigbatch.trainer.recipe     the lr of every step
    bigbatch.trainer.sources    the micro-batches (tensors, image folders, DALI)
    bigbatch.trainer.probes     what is measured while training (GNS, tail index, sharpness)
    bigbatch.trainer.rundir     every file of the run folder (writes only on the logging rank)
    bigbatch.trainer.stop       stop signals, agreed across ranks

The loss of every micro-batch is its mean divided by the number of micro-batches, and DDP averages
over ranks, so the gradient is the mean over the global batch whatever the world size and
accumulation (Goyal et al. 2017: normalise by the global batch, not per worker).
"""

from __future__ import annotations

import contextlib
import logging
import math
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch
import torch.distributed as dist
from torch import nn

from bigbatch import config as config_mod
from bigbatch.config import Config
from bigbatch.distributed import env as dist_env
from bigbatch.errors import ConfigError, PeerLostError
from bigbatch.track import make_tracker
from bigbatch.trainer import flops, preflight, probes
from bigbatch.trainer import checkpoint as ckpt
from bigbatch.trainer.batching import BatchPlan
from bigbatch.trainer.build import amp_settings, prepare_model, wrap_ddp
from bigbatch.trainer.dali import require_dali
from bigbatch.trainer.data import DataBundle, build_data
from bigbatch.trainer.evaluate import evaluate, reached_target
from bigbatch.trainer.optim import build_optimizer
from bigbatch.trainer.recipe import Schedule
from bigbatch.trainer.rundir import NullRunDir, default_run_dir, open_run_dir
from bigbatch.trainer.sources import make_source
from bigbatch.trainer.steptime import StepTimer
from bigbatch.trainer.stream import ExampleStream
from bigbatch.trainer.stop import StopCheck

log = logging.getLogger("bigbatch")


@dataclass
class LoopState:
    """Everything the loop carries across steps (and checkpoints)."""

    step: int = 0  # completed optimizer steps
    examples: int = 0  # examples consumed
    train_time_s: float = 0.0  # time in training steps (excludes evaluation and checkpoints)
    wall_s: float = 0.0  # wall time of earlier segments of a resumed run
    steps_to_target: int | None = None
    examples_to_target: int | None = None
    last_eval: dict[str, float] = field(default_factory=dict)
    last_eval_step: int = 0
    eval_pending: bool = False  # a stop was agreed during this step's evaluation: the resumed run does it first
    interval_loss: float = 0.0  # loss sum (this rank) since the last log line
    interval_count: int = 0

    def to_dict(self) -> dict[str, Any]:
        return dict(self.__dict__)


def run(cfg: Config, out_dir: str | Path | None = None, *, resume: bool = False,
        reporter: Callable[[dict[str, Any]], None] | None = None) -> dict[str, Any]:
    """Train one run; returns the summary (also written to OUT/summary.json on rank 0).

    With resume=True, `out_dir` must hold a checkpoint; training continues from it.
    Raises ConfigError on bad input before creating anything.
    """
    env = dist_env.init(cfg.dist.backend, cfg.dist.timeout_s)
    preflight.check(cfg, env.world_size, env.local_world_size)  # before generating or loading data
    if cfg.data.backend == "dali":
        require_dali()
    bundle = build_data(cfg.data)
    probes.validate_data(cfg, bundle.in_memory)
    schedule = Schedule(cfg, len(bundle.train))
    model = prepare_model(cfg, bundle, env)

    path = Path(out_dir) if out_dir is not None else None
    if path is None:
        path = dist_env.broadcast_object(default_run_dir(cfg) if env.is_main else None)
    run_dir = open_run_dir(path, env.is_main, cfg.checkpoint.keep)
    resume_from = select_checkpoint(path, env) if resume else None  # nothing in the folder changes before this
    run_dir.create(cfg)
    dist_env.barrier()
    run_dir.start_logging()
    try:
        if resume_from is not None:
            run_dir.set_aside(resume_from[2], resume_from[0])  # the ones that did not load: one warning
        return _train(cfg, env, bundle, schedule, model, run_dir, resume_from, reporter)
    except Exception as e:
        run_dir.log_traceback(f"rank {env.rank}: run failed:\n{traceback.format_exc()}")
        e.run_dir = path  # for the one-line message: where the traceback is
        raise


def select_checkpoint(run_dir: Path, env: dist_env.DistEnv) -> tuple[Path, dict[str, Any], list]:
    """(path, state, bad ones) of the newest checkpoint that loads. Rank 0 chooses and every rank
    loads that file; ConfigError("--resume") on every rank when none loads."""
    chosen, error = None, None
    if env.is_main:
        try:
            path, state, bad = ckpt.select(run_dir, map_location=env.device)
            chosen = (str(path), [(str(p), why) for p, why in bad])
        except ckpt.NoCheckpointError as e:
            error = str(e)
    chosen, error = dist_env.broadcast_object((chosen, error))
    if error is not None:
        raise ConfigError("--resume", error)
    if not env.is_main:
        state = ckpt.load(chosen[0], map_location=env.device)
    return Path(chosen[0]), state, [(Path(p), why) for p, why in chosen[1]]


@contextlib.contextmanager
def peer_watch(cfg: Config, env: dist_env.DistEnv, run_dir: Path, step: Callable[[], int]):
    """Turn a collective that failed because a peer rank stopped answering into PeerLostError:
    which step, the timeout, and the checkpoint to resume from."""
    try:
        yield
    except Exception as e:
        kind = dist_env.peer_failure(e) if env.world_size > 1 else None
        if kind is None:
            raise
        last = ckpt.latest(run_dir)
        where = (f"resume from {last.name} with `bigbatch train --resume {run_dir}`" if last is not None
                 else "no checkpoint was written yet (set checkpoint.every to keep progress)")
        why = (f"a peer rank stopped answering within dist.timeout_s = {cfg.dist.timeout_s:g} s" if kind == "timeout"
               else "a peer rank's connection closed (it stopped or died)")
        raise PeerLostError(f"rank {env.rank}: collective failed in step {step() + 1}: {why}; {where}") from e


def _train(cfg: Config, env: dist_env.DistEnv, bundle: DataBundle, schedule: Schedule, model: nn.Module,
           run_dir: NullRunDir, resume_from: tuple[Path, dict[str, Any], list] | None, reporter) -> dict[str, Any]:
    t_start = time.perf_counter()
    world, rank = env.world_size, env.rank
    plan = BatchPlan(cfg, schedule, world)
    per_device, accum = plan.split(schedule.batch_at(0))
    amp_dtype, use_scaler = amp_settings(cfg.train.amp, env.device)
    scaler = torch.amp.GradScaler(env.device.type, enabled=use_scaler)
    optimizer = build_optimizer(cfg.optim, model, schedule.lr_at(0))
    ddp_model = wrap_ddp(model, cfg, env)
    train_model = torch.compile(ddp_model, backend=cfg.train.compile_backend) if cfg.train.compile else ddp_model
    loss_fn = nn.CrossEntropyLoss(label_smoothing=cfg.train.label_smoothing)
    measures = probes.OnlineMeasures(cfg, env, model, bundle, loss_fn)
    no_context = contextlib.nullcontext()  # reusable: entering it does nothing
    autocast = (lambda: torch.autocast(env.device.type, dtype=amp_dtype)) if amp_dtype else (lambda: no_context)
    # where the step's time goes (the all-reduce's exposed part only where there is one), and MFU
    timer = StepTimer(env.device, list(model.parameters()) if env.initialized else None)
    flops_per_example = flops.train_flops_per_example(model, bundle.input_shape)  # counted once
    peak_tflops = flops.resolve_peak_tflops(cfg.train.peak_tflops, env.device, amp_dtype)

    st = LoopState()
    stream = ExampleStream(len(bundle.train), cfg.train.seed)
    if resume_from is not None:
        resumed_path, saved, _ = resume_from
        model.load_state_dict(saved["model"])
        optimizer.load_state_dict(saved["optimizer"])
        scaler.load_state_dict(saved["scaler"])
        st = LoopState(**saved["loop"])
        st.interval_loss = own_interval_loss(saved, rank, world)
        measures.load_state_dict(saved.get("measure"))  # GNS EMAs
        plan.load_state_dict((saved.get("measure") or {}).get("controller"))  # the adaptive batch
        stream.position = st.examples
        rngs = saved["rng"]
        ckpt.set_rng_state(rngs[rank] if rank < len(rngs) else rngs[0])
        run_dir.truncate_metrics(st.step)
        log.info("resumed from %s at step %d (%d examples)", resumed_path, st.step, st.examples)

    log.info("%s", schedule.describe())
    log.info("global batch %d = %d rank(s) x %d per device x %d accumulation step(s); device %s, backend %s, amp %s",
             schedule.batch_at(0), world, per_device, accum, env.device, env.backend or "none (1 process)",
             amp_dtype or "off")
    tracker = make_tracker(env.is_main, run_dir.path, config_mod.to_dict(cfg), cfg.track, schedule.total_steps,
                           st.step, reporter=reporter)
    source = make_source(cfg, env, bundle, stream, per_device)
    interval_loss = LossSum(st.interval_loss, env.device)

    def save_checkpoint() -> None:
        tracker.flush()  # metrics.jsonl holds every row up to the checkpoint: a resume truncates it there
        rngs = [ckpt.rng_state()]
        if env.initialized:
            rngs = [None] * world
            dist.all_gather_object(rngs, ckpt.rng_state())
        # on every rank: averaging the GNS EMAs is a collective
        measure_state = {**measures.state_dict(), "controller": plan.state_dict()}
        st.interval_loss = interval_loss.total()
        by_rank = [st.interval_loss]  # each rank's part of the next log row's loss (a stop comes at any step)
        if env.initialized:
            by_rank = [None] * world
            dist.all_gather_object(by_rank, st.interval_loss)
        error = run_dir.save_checkpoint(st.step, {
            "model": ckpt.unwrap(model).state_dict(),
            "optimizer": optimizer.state_dict(),
            "scaler": scaler.state_dict(),
            "loop": {**st.to_dict(), "wall_s": st.wall_s + (time.perf_counter() - t_start)},
            "rng": rngs,
            "interval_loss": by_rank,
            "measure": measure_state,
        })
        if (error := dist_env.broadcast_object(error)) is not None:  # full disk, unwritable: every rank stops
            raise ckpt.CheckpointWriteError(error)

    def evaluate_now(global_batch: int, lr: float) -> bool:
        """The evaluation of step st.step: recorded, logged, the target checked. False when the ranks
        agreed to stop during it (then st.eval_pending tells the resumed run to do it first)."""
        # the plain module: no DDP collectives; data.eval_subset: the first N examples only
        evaluated = evaluate(model, bundle, env, cfg, limit=cfg.data.eval_subset, stop=stop)
        st.eval_pending = evaluated is None
        if evaluated is not None:
            st.last_eval, st.last_eval_step = evaluated, st.step
            if st.steps_to_target is None and reached_target(cfg, st.last_eval):
                st.steps_to_target, st.examples_to_target = st.step, st.examples
            tracker.log({"step": st.step, "examples": st.examples, "epoch": st.examples / n_train, "lr": lr,
                         "global_batch": global_batch, **st.last_eval, **measures.at_eval(),
                         **({"eval_set": "subset"} if cfg.data.eval_subset else {})})
        return evaluated is not None

    status = "completed"
    # read once: the per-step Python is a visible part of a ~1 ms CPU step (no probe: none is called per step)
    measuring, adaptive, distributed = measures.active, plan.controller is not None, env.initialized
    total_steps, n_train, eval_fine = schedule.total_steps, len(bundle.train), cfg.train.eval_fine
    log_every, eval_every, ckpt_every = cfg.train.log_every, cfg.train.eval_every, cfg.checkpoint.every
    train_model.train()
    last_log_examples, interval_train_s = st.examples, 0.0
    with StopCheck(env, cfg.checkpoint.stop_within_s) as stop, peer_watch(cfg, env, run_dir.path, lambda: st.step), tracker:
        if st.eval_pending:  # resumed from a stop during this step's evaluation: that evaluation first
            global_batch, _, _, lr = plan.at(st.step - 1)
            if evaluate_now(global_batch, lr) and cfg.train.stop_at_target and st.steps_to_target is not None:
                status = "target_reached"
        while status == "completed" and not stop.agreed and st.step < total_steps and not plan.finished(st.examples):
            # the batch and the lr of this step
            t0 = time.perf_counter()
            timer.start()
            step = st.step
            global_batch, per_device, accum, lr = plan.at(step)
            for group in optimizer.param_groups:
                group["lr"] = lr

            # forward and backward over this rank's micro-batches; all-reduce on the last one only
            if measuring:
                measures.begin_step(step)
            for i, (x, y, n) in enumerate(source.micro_batches(step, global_batch, accum)):
                sync = i == accum - 1 or not distributed
                timer.data_ready(sync)
                with no_context if sync else ddp_model.no_sync():
                    with autocast():
                        loss = loss_fn(train_model(x), y)
                    scaled = loss / accum if accum > 1 else loss
                    (scaler.scale(scaled) if use_scaler else scaled).backward()
                timer.backward_done()
                interval_loss.add(loss, n)
            if measuring:
                measures.after_backward(global_batch, per_device, accum, scaler.get_scale)
                timer.lap("other")

            # the optimizer step
            if use_scaler:
                scaler.step(optimizer)
                scaler.update()
            else:
                optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            timer.lap("compute")
            st.step += 1
            st.examples += global_batch

            # the probes, and the batch plan told what they measured
            if measuring:
                measures.after_step(st.step)
            if adaptive:
                plan.observe(st.step, measures.b_simple)
            st.interval_count += per_device * accum
            timer.stop()
            dt = time.perf_counter() - t0
            st.train_time_s += dt
            interval_train_s += dt

            # log, evaluate, checkpoint or stop
            last = st.step == total_steps or plan.finished(st.examples)
            epoch = st.examples / n_train
            if st.step % log_every == 0 or last:
                loss_mean, probe_sums = _mean_over_ranks(interval_loss.total(), st.interval_count, env,
                                                         measures.row_values())
                measures.take_row_sums(probe_sums)  # the GNS EMAs' rank average rode on the loss's all-reduce
                interval_loss.reset()
                st.interval_count = 0
                samples_per_s = (st.examples - last_log_examples) / max(interval_train_s, 1e-9)
                tracker.log({
                    "step": st.step, "examples": st.examples, "epoch": epoch, "lr": lr,
                    "global_batch": global_batch, "loss": loss_mean, "samples_per_s": samples_per_s,
                    **timer.read(),  # time/data, compute, comm_exposed, step (s): per-step means since the last line
                    "flops_per_example": flops_per_example,
                    **({"mfu": flops.mfu(flops_per_example, samples_per_s, peak_tflops, world)}
                       if peak_tflops and flops_per_example else {}),
                    **measures.metrics(),
                })
                tracker.progress(st.step, f"loss {loss_mean:.4f}")
                last_log_examples, interval_train_s = st.examples, 0.0
                if not math.isfinite(loss_mean):  # the same all-reduced value on every rank
                    status = "diverged"
                    log.error("training loss is %s at step %d: stopped (lr %.4g); the last checkpoint is kept",
                              loss_mean, st.step, lr)
                    break

            if (eval_every and st.step % eval_every == 0) or last or (eval_fine and fine_eval_due(cfg, st)):
                if evaluate_now(global_batch, lr) and cfg.train.stop_at_target and st.steps_to_target is not None:
                    status = "target_reached"
                    break

            if stop.requested(st.step):  # True on every rank at the same step (also after a stopped evaluation)
                break
            if ckpt_every and st.step % ckpt_every == 0 and not last:
                save_checkpoint()
        if stop.agreed and status == "completed":
            save_checkpoint()
            status = "preempted"
            log.warning("stop signal %s: checkpointed at step %d; continue with `bigbatch train --resume %s`",
                        stop.signum, st.step, run_dir.path)
        if status not in ("preempted", "diverged"):
            save_checkpoint()  # the final state: `bigbatch interpolate` and fine-tuning read it
            if cfg.data.eval_subset:  # the run's numbers on the full test and training-evaluation sets
                st.last_eval = evaluate(model, bundle, env, cfg)
                tracker.log({"step": st.step, "examples": st.examples, "epoch": st.examples / len(bundle.train),
                             **st.last_eval, "eval_set": "full"})

    timer.close()
    wall = st.wall_s + time.perf_counter() - t_start
    summary = {
        "status": status,
        "steps": st.step,
        "examples": st.examples,
        "epochs": st.examples / len(bundle.train),
        "global_batch": plan.at(max(st.step - 1, 0))[0],
        "world_size": world,
        "peak_lr": schedule.peak_lr(schedule.batch_at(0)),
        **{k: st.last_eval.get(k) for k in ("test_acc", "test_loss", "train_acc", "train_loss")},
        "steps_to_target": st.steps_to_target,
        "examples_to_target": st.examples_to_target,
        "wall_s": wall,
        "train_s": st.train_time_s,
        "samples_per_s": st.examples / max(st.train_time_s, 1e-9),
        "flops_per_example": flops_per_example,
    }
    if status != "preempted":
        run_dir.write_summary(summary)
    tracker.close(exit_code=1 if status in ("preempted", "diverged") else 0)
    log.info("%s after %d steps: test_acc %s, test_loss %s, %.0f samples/s, %.1f s", status, st.step,
             _fmt(summary["test_acc"]), _fmt(summary["test_loss"]), summary["samples_per_s"], wall)
    return summary


class LossSum:
    """The training loss summed over this rank's examples since the last log line. The hot path only
    appends each micro-batch's loss tensor (no tensor op, no host sync per step); `total()` sums them
    in float64 once per log line: on a GPU one stacked copy, on the CPU (no copy) each value read."""

    def __init__(self, start: float, device: torch.device):
        self.start = start
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

    def reset(self) -> None:
        self.start = 0.0
        self.losses.clear()
        self.counts.clear()


def own_interval_loss(saved: dict[str, Any], rank: int, world: int) -> float:
    """This rank's loss sum since the last log row, from a checkpoint: its own when the world is the
    same; otherwise the sum of all on rank 0 (the next row's mean over ranks stays the same).
    Checkpoints from before "interval_loss" was kept hold rank 0's only (the value in "loop")."""
    by_rank = saved.get("interval_loss")
    if not by_rank:
        return saved["loop"]["interval_loss"]
    if len(by_rank) == world:
        return by_rank[rank]
    return math.fsum(by_rank) if rank == 0 else 0.0


def _fmt(v: float | None) -> str:
    return "n/a" if v is None else f"{v:.4f}"


def _mean_over_ranks(loss_sum: float, count: int, env: dist_env.DistEnv,
                     extra: list[float]) -> tuple[float, list[float]]:
    """Mean training loss over all examples of all ranks since the last log line, and the rank
    sums of `extra` from the same all-reduce (one collective per log row)."""
    if not env.initialized:
        return loss_sum / max(count, 1), extra
    t = torch.tensor([loss_sum, float(count), *extra], dtype=torch.float64, device=env.device)
    dist.all_reduce(t)
    total, n, *sums = t.tolist()
    return total / max(n, 1.0), sums


def fine_eval_due(cfg: Config, st: LoopState) -> bool:
    """train.eval_fine: near the target, evaluate once the steps grew by that fraction since the last evaluation."""
    if (not cfg.train.eval_fine or not st.last_eval or st.steps_to_target is not None
            or not reached_target(cfg, st.last_eval, cfg.train.eval_fine_within)):
        return False
    return st.step - st.last_eval_step >= max(1, math.floor(cfg.train.eval_fine * st.step))
