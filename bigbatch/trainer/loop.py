"""The training loop: one run, on one process or data-parallel over many.

Reading order: `run` builds the parts (process group, data, model, optimizer, schedule, tracker)
and hands them to `_train`, a single top-to-bottom loop. Per step it takes the next global batch
from the example stream, runs this rank's micro-batches (gradient accumulation under DDP's
`no_sync`, so gradients are all-reduced once per step), sets the lr from the schedule, steps the
optimizer, and now and then logs, evaluates and checkpoints.

The loss of every micro-batch is its mean divided by the number of micro-batches, and DDP averages
over ranks, so the gradient is the mean over the global batch whatever the world size and
accumulation (Goyal et al. 2017: normalise by the global batch, not per worker).
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import signal
import sys
import time
import traceback
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any, Callable

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from bigbatch import config as config_mod
from bigbatch.config import Config, derive_batch
from bigbatch.distributed import env as dist_env
from bigbatch.errors import ConfigError
from bigbatch.measure import online as measure_online
from bigbatch.track import JSONL, make_tracker, truncate_after
from bigbatch.trainer import checkpoint as ckpt
from bigbatch.trainer.data import (DataBundle, ExampleStream, FolderBatches, build_data, eval_batches, shard,
                                   tensor_batch, train_size_hint)
from bigbatch.trainer.models import build_model
from bigbatch.trainer.optim import build_optimizer
from bigbatch.trainer.recipe import Schedule

log = logging.getLogger("bigbatch")

SUMMARY = "summary.json"
CONFIG = "config.toml"
SIGNAL_CHECK_EVERY = 10  # steps between cross-rank agreement on a pending stop signal (world > 1)


# --- stop signals --------------------------------------------------------------------------


class StopFlag:
    """Set by SIGTERM / SIGUSR2 (SLURM preemption, time limits, torchrun shutdown).

    The handler only sets a flag; the loop checkpoints at the next step boundary where all ranks
    agree, so no rank leaves a collective the others are in.
    """

    def __init__(self) -> None:
        self.signum: int | None = None
        self._old: dict[int, Any] = {}

    def __enter__(self) -> "StopFlag":
        for s in (signal.SIGTERM, signal.SIGUSR2):
            try:
                self._old[s] = signal.signal(s, self._handle)
            except ValueError:  # not the main thread (e.g. inside some Ray workers)
                pass
        return self

    def _handle(self, signum, frame) -> None:
        self.signum = signum

    def __exit__(self, *exc) -> None:
        for s, h in self._old.items():
            signal.signal(s, h)


# --- set-up ---------------------------------------------------------------------------------


def default_run_dir(cfg: Config) -> Path:
    stamp = datetime.now().strftime("%Y%m%d-%H%M%S")
    base = Path("runs") / f"{cfg.name}-{stamp}"
    path, i = base, 1
    while path.exists():
        i += 1
        path = base.with_name(f"{base.name}-{i}")
    return path


def setup_logging(run_dir: Path | None, is_main: bool) -> None:
    log.handlers.clear()
    log.propagate = False
    log.setLevel(logging.INFO if is_main else logging.WARNING)
    fmt = logging.Formatter("%(asctime)s %(message)s", "%H:%M:%S")
    h = logging.StreamHandler(sys.stderr)
    h.setFormatter(fmt)
    log.addHandler(h)
    if run_dir is not None and is_main:
        fh = logging.FileHandler(run_dir / "train.log")
        fh.setFormatter(fmt)
        log.addHandler(fh)


def amp_settings(amp: str, device: torch.device) -> tuple[torch.dtype | None, bool]:
    """(autocast dtype or None, use a grad scaler)."""
    if amp == "auto":
        amp = "bf16" if device.type == "cuda" else "off"
    if amp == "off":
        return None, False
    if amp == "fp16":
        if device.type != "cuda":
            raise ConfigError("train.amp", "fp16 needs a GPU; use bf16 on CPU")
        return torch.float16, True
    return torch.bfloat16, False


def prepare_model(cfg: Config, bundle: DataBundle, env: dist_env.DistEnv) -> nn.Module:
    torch.manual_seed(cfg.train.seed)  # identical initial weights on every rank and world size
    model = build_model(cfg.model, bundle.input_shape, bundle.num_classes)
    if cfg.model.sync_bn and env.world_size > 1:
        if env.device.type != "cuda":
            raise ConfigError("model.sync_bn", "torch's SyncBatchNorm needs GPU inputs; use per-device BatchNorm on CPU")
        model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
    model = model.to(env.device)
    image = len(bundle.input_shape) == 3
    if image and (cfg.model.channels_last == "on" or (cfg.model.channels_last == "auto" and env.device.type == "cuda")):
        model = model.to(memory_format=torch.channels_last)
    return model


def wrap_ddp(model: nn.Module, cfg: Config, env: dist_env.DistEnv) -> nn.Module:
    if not env.initialized:
        return model
    ddp = nn.parallel.DistributedDataParallel(
        model,
        device_ids=[env.device.index] if env.device.type == "cuda" else None,
        bucket_cap_mb=cfg.dist.bucket_cap_mb,
        gradient_as_bucket_view=True,
    )
    if cfg.dist.allreduce != "builtin":  # ring / 2D-torus / hierarchical inside DDP
        from bigbatch.distributed.hooks import install_comm_hook

        install_comm_hook(ddp, cfg.dist, env)
    return ddp


# --- the run ----------------------------------------------------------------------------------


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
    cfg.validate(env.world_size)
    measure_online.validate(cfg, env.world_size)  # measure: GNS / tail / sharpness / adaptive batch
    if cfg.data.backend == "dali":
        from bigbatch.trainer.dali import require_dali

        require_dali()
    if (n_hint := train_size_hint(cfg.data, exact=True)) is not None:
        Schedule(cfg, n_hint)  # schedule errors (warmup > training) before generating or loading data
    bundle = build_data(cfg.data)
    schedule = Schedule(cfg, len(bundle.train))
    model = prepare_model(cfg, bundle, env)

    run_dir = Path(out_dir) if out_dir is not None else None
    if run_dir is None:
        run_dir = dist_env.broadcast_object(default_run_dir(cfg) if env.is_main else None)
    state_file = run_dir / ckpt.FILENAME
    if resume and not state_file.exists():
        raise ConfigError("--resume", f"no checkpoint in {str(run_dir)!r}")
    if env.is_main:
        run_dir.mkdir(parents=True, exist_ok=True)
        config_mod.save(cfg, run_dir / CONFIG)
    dist_env.barrier()
    setup_logging(run_dir, env.is_main)
    try:
        return _train(cfg, env, bundle, schedule, model, run_dir, resume, reporter)
    except Exception:
        log.error("run failed:\n%s", traceback.format_exc())
        raise


def _train(cfg: Config, env: dist_env.DistEnv, bundle: DataBundle, schedule: Schedule, model: nn.Module,
           run_dir: Path, resume: bool, reporter) -> dict[str, Any]:
    t_start = time.perf_counter()
    world, rank = env.world_size, env.rank
    per_device, accum = derive_batch(schedule.batch_at(0), world, cfg.batch.accum_steps)
    amp_dtype, use_scaler = amp_settings(cfg.train.amp, env.device)
    scaler = torch.amp.GradScaler(env.device.type, enabled=use_scaler)
    optimizer = build_optimizer(cfg.optim, model, schedule.lr_at(0))
    ddp_model = wrap_ddp(model, cfg, env)
    train_model = torch.compile(ddp_model) if cfg.train.compile else ddp_model
    loss_fn = nn.CrossEntropyLoss(label_smoothing=cfg.train.label_smoothing)
    measures = measure_online.OnlineMeasures(cfg, env, model, ddp_model, bundle, loss_fn)  # measure: (bigbatch.measure.online)
    autocast = (lambda: torch.autocast(env.device.type, dtype=amp_dtype)) if amp_dtype else contextlib.nullcontext

    st = LoopState()
    stream = ExampleStream(len(bundle.train), cfg.train.seed)
    if resume:
        saved = ckpt.load(run_dir / ckpt.FILENAME, map_location=env.device)
        model.load_state_dict(saved["model"])
        optimizer.load_state_dict(saved["optimizer"])
        scaler.load_state_dict(saved["scaler"])
        st = LoopState(**saved["loop"])
        measures.load_state_dict(saved.get("measure"))  # measure: GNS EMAs, adaptive batch
        stream.position = st.examples
        rngs = saved["rng"]
        ckpt.set_rng_state(rngs[rank] if rank < len(rngs) else rngs[0])
        truncate_after(run_dir / JSONL, st.step) if env.is_main else None
        log.info("resumed from %s at step %d (%d examples)", run_dir / ckpt.FILENAME, st.step, st.examples)

    log.info("%s", schedule.describe())
    log.info("global batch %d = %d rank(s) x %d per device x %d accumulation step(s); device %s, backend %s, amp %s",
             schedule.batch_at(0), world, per_device, accum, env.device, env.backend or "none (1 process)",
             amp_dtype or "off")
    tracker = make_tracker(env.is_main, run_dir, config_mod.to_dict(cfg), cfg.track, schedule.total_steps,
                           st.step, reporter=reporter)

    # Image folders: a DataLoader fed by the example stream (rebuilt when the batch changes), or DALI,
    # which shards and shuffles by itself (data.backend = "dali"; fixed per-device batch).
    folder = None if bundle.in_memory or cfg.data.backend == "dali" else FolderBatches(
        bundle.train, cfg.data.num_workers, env.device.type == "cuda")
    dali_batches = _dali_train_batches(cfg, env, per_device) if cfg.data.backend == "dali" else None
    loader_batch = None

    interval_loss = torch.tensor(st.interval_loss, device=env.device, dtype=torch.float64)

    def save_checkpoint() -> None:
        rngs = [ckpt.rng_state()]
        if env.initialized:
            rngs = [None] * world
            dist.all_gather_object(rngs, ckpt.rng_state())
        measure_state = measures.state_dict()  # on every rank: averaging the GNS EMAs is a collective
        if env.is_main:
            st.interval_loss = interval_loss.item()
            ckpt.save(run_dir / ckpt.FILENAME, {
                "model": ckpt.unwrap(model).state_dict(),
                "optimizer": optimizer.state_dict(),
                "scaler": scaler.state_dict(),
                "loop": {**st.to_dict(), "wall_s": st.wall_s + (time.perf_counter() - t_start)},
                "rng": rngs,
                "measure": measure_state,
            })
        dist_env.barrier()

    status = "completed"
    train_model.train()
    last_log_step, last_log_examples, interval_train_s = st.step, st.examples, 0.0
    with StopFlag() as stop:
        while st.step < schedule.total_steps and not measures.finished(st.examples):
            t0 = time.perf_counter()
            step = st.step
            global_batch = measures.global_batch(step, schedule.batch_at)  # measure: batch.adaptive = "gns"
            per_device, accum = derive_batch(global_batch, world, cfg.batch.accum_steps)
            lr = schedule.lr_at(step, global_batch)
            for group in optimizer.param_groups:
                group["lr"] = lr

            measures.begin_step(step)  # measure
            if folder is not None and global_batch != loader_batch:
                folder.restart(stream, lambda s, b=global_batch: b, st.step, rank, world, lambda s, a=accum: a)
                loader_batch = global_batch
            for i, idx in enumerate(shard(stream.take(global_batch), rank, world, accum)):
                if dali_batches is not None:
                    x, y = next(dali_batches)
                elif folder is not None:
                    x, y = folder.next(env.device)
                else:
                    x, y = tensor_batch(bundle.train, idx, env.device, train=True)
                if x.dim() == 4 and env.device.type == "cuda":
                    x = x.contiguous(memory_format=torch.channels_last)
                # all-reduce only on the last micro-batch: one gradient exchange per step
                sync = i == accum - 1 or not env.initialized
                with contextlib.nullcontext() if sync else ddp_model.no_sync():
                    with autocast():
                        loss = loss_fn(train_model(x), y)
                    scaler.scale(loss / accum if accum > 1 else loss).backward()
                interval_loss.add_(loss.detach(), alpha=len(idx))
            measures.after_backward(global_batch, per_device, accum, scaler.get_scale)  # measure: GNS norms
            scaler.step(optimizer)
            scaler.update()
            optimizer.zero_grad(set_to_none=True)

            st.step += 1
            st.examples += global_batch
            measures.after_step(st.step)  # measure: tail probe, adaptive batch decision
            st.interval_count += per_device * accum
            dt = time.perf_counter() - t0
            st.train_time_s += dt
            interval_train_s += dt

            last = st.step == schedule.total_steps or measures.finished(st.examples)
            epoch = st.examples / len(bundle.train)
            if st.step % cfg.train.log_every == 0 or last:
                loss_mean = _mean_over_ranks(interval_loss, st.interval_count, env)
                interval_loss.zero_()
                st.interval_count = 0
                tracker.log({
                    "step": st.step, "examples": st.examples, "epoch": epoch, "lr": lr,
                    "global_batch": global_batch, "loss": loss_mean,
                    "samples_per_s": (st.examples - last_log_examples) / max(interval_train_s, 1e-9),
                    "time/step(s)": interval_train_s / max(st.step - last_log_step, 1),
                    **measures.metrics(),
                })
                tracker.progress(st.step, f"loss {loss_mean:.4f}")
                last_log_step, last_log_examples, interval_train_s = st.step, st.examples, 0.0
                if not math.isfinite(loss_mean):  # the same all-reduced value on every rank
                    status = "diverged"
                    log.error("training loss is %s at step %d: stopped (lr %.4g); the last checkpoint is kept",
                              loss_mean, st.step, lr)
                    break

            if (cfg.train.eval_every and st.step % cfg.train.eval_every == 0) or last:
                st.last_eval = evaluate(model, bundle, env, cfg)  # the plain module: no DDP collectives
                if st.steps_to_target is None and reached_target(cfg, st.last_eval):
                    st.steps_to_target, st.examples_to_target = st.step, st.examples
                tracker.log({"step": st.step, "examples": st.examples, "epoch": epoch, "lr": lr,
                             "global_batch": global_batch, **st.last_eval, **measures.at_eval()})
                if cfg.train.stop_at_target and st.steps_to_target is not None:
                    status = "target_reached"
                    break

            if stop_requested(stop, st.step, env):
                save_checkpoint()
                status = "preempted"
                log.warning("stop signal %s: checkpointed at step %d; continue with `bigbatch train --resume %s`",
                            stop.signum, st.step, run_dir)
                break
            if cfg.checkpoint.every and st.step % cfg.checkpoint.every == 0 and not last:
                save_checkpoint()
        if status not in ("preempted", "diverged"):
            save_checkpoint()  # the final state: `bigbatch interpolate` and fine-tuning read it

    wall = st.wall_s + time.perf_counter() - t_start
    summary = {
        "status": status,
        "steps": st.step,
        "examples": st.examples,
        "epochs": st.examples / len(bundle.train),
        "global_batch": measures.global_batch(max(st.step - 1, 0), schedule.batch_at),  # measure: adaptive batch
        "world_size": world,
        "peak_lr": schedule.peak_lr(schedule.batch_at(0)),
        **{k: st.last_eval.get(k) for k in ("test_acc", "test_loss", "train_acc", "train_loss")},
        "steps_to_target": st.steps_to_target,
        "examples_to_target": st.examples_to_target,
        "wall_s": wall,
        "train_s": st.train_time_s,
        "samples_per_s": st.examples / max(st.train_time_s, 1e-9),
    }
    if env.is_main and status != "preempted":
        tmp = run_dir / (SUMMARY + ".tmp")
        tmp.write_text(json.dumps(summary, indent=2) + "\n")
        os.replace(tmp, run_dir / SUMMARY)
    tracker.close(exit_code=1 if status in ("preempted", "diverged") else 0)
    log.info("%s after %d steps: test_acc %s, test_loss %s, %.0f samples/s, %.1f s", status, st.step,
             _fmt(summary["test_acc"]), _fmt(summary["test_loss"]), summary["samples_per_s"], wall)
    return summary


# --- helpers ----------------------------------------------------------------------------------


def _fmt(v: float | None) -> str:
    return "n/a" if v is None else f"{v:.4f}"


def _all_reduce_sum(values: list[float] | torch.Tensor, env: dist_env.DistEnv, device: torch.device) -> torch.Tensor:
    t = torch.as_tensor(values, dtype=torch.float64, device=device)
    if env.initialized:
        dist.all_reduce(t)
    return t


def _mean_over_ranks(loss_sum: torch.Tensor, count: int, env: dist_env.DistEnv) -> float:
    """Mean training loss over all examples of all ranks since the last log line."""
    t = torch.stack([loss_sum.double(), torch.tensor(float(count), dtype=torch.float64, device=loss_sum.device)])
    if env.initialized:
        dist.all_reduce(t)
    return (t[0] / t[1].clamp_min(1)).item()


def stop_requested(stop: StopFlag, step: int, env: dist_env.DistEnv) -> bool:
    """True when any rank got a stop signal; ranks agree every SIGNAL_CHECK_EVERY steps."""
    if not env.initialized:
        return stop.signum is not None
    if step % SIGNAL_CHECK_EVERY:
        return False
    flag = _all_reduce_sum([1.0 if stop.signum is not None else 0.0], env, env.device)
    return bool(flag.item() > 0)


def _dali_train_batches(cfg: Config, env: dist_env.DistEnv, per_device: int):
    """Endless (images, labels) micro-batches of this rank's DALI shard, epoch after epoch."""
    from bigbatch.trainer.dali import build_dali_loader

    loader = build_dali_loader(cfg.data.root, cfg.data.image_size, per_device, env.rank, env.world_size,
                               cfg.train.seed, train=True, num_threads=max(cfg.data.num_workers, 1))
    while True:
        yield from loader


def reached_target(cfg: Config, metrics: dict[str, float]) -> bool:
    if cfg.target.test_acc is not None and metrics["test_acc"] >= cfg.target.test_acc:
        return True
    return cfg.target.test_loss is not None and metrics["test_loss"] <= cfg.target.test_loss


@torch.no_grad()
def evaluate(model: nn.Module, bundle: DataBundle, env: dist_env.DistEnv, cfg: Config, batch_size: int = 1024) -> dict[str, float]:
    """Test loss/accuracy and train loss/accuracy (on a fixed training subset).

    Every rank evaluates its shard; the sums are all-reduced. Plain cross-entropy (no label
    smoothing), BatchNorm in eval mode.
    """
    model.eval()
    sums = []
    for data, limit in ((bundle.test, 0), (bundle.train, cfg.data.train_eval_samples)):
        loss_sum = torch.zeros((), dtype=torch.float64, device=env.device)
        correct = torch.zeros((), dtype=torch.float64, device=env.device)
        count = 0
        for x, y in eval_batches(data, env.rank, env.world_size, batch_size, env.device, limit, cfg.data.num_workers):
            if x.dim() == 4 and env.device.type == "cuda":
                x = x.contiguous(memory_format=torch.channels_last)
            out = model(x).float()
            loss_sum += F.cross_entropy(out, y, reduction="sum").double()
            correct += (out.argmax(1) == y).sum().double()
            count += len(y)
        sums.append(torch.stack([loss_sum, correct, torch.tensor(float(count), dtype=torch.float64, device=env.device)]))
    t = torch.stack(sums)
    if env.initialized:
        dist.all_reduce(t)
    t = t.cpu()
    model.train()
    return {
        "test_loss": (t[0, 0] / t[0, 2]).item(), "test_acc": (t[0, 1] / t[0, 2]).item(),
        "train_loss": (t[1, 0] / t[1, 2]).item(), "train_acc": (t[1, 1] / t[1, 2]).item(),
    }
