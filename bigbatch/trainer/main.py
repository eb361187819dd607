"""`bigbatch train`: one run in this process, N local processes (--nproc), or one rank of a
torchrun/SLURM world. Validation happens before anything is launched or written.

The modules that import torch (the loop, the data) are imported inside the functions that need
them, so `bigbatch train --help` and bad-input errors stay fast."""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

from bigbatch import config as config_mod
from bigbatch.errors import EXIT_DIVERGED, EXIT_FAILURE, EXIT_PREEMPTED, ConfigError, UsageError
from bigbatch.trainer import batching


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("config", nargs="?", help="TOML config (not needed with --resume)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="SECTION.KEY=VALUE",
                   help="override a config value (TOML syntax; repeatable)")
    p.add_argument("--out", help="run folder (default runs/<name>-<time>)")
    p.add_argument("--nproc", type=int, default=None, help="launch N local processes through torchrun")
    p.add_argument("--resume", metavar="RUN_DIR", help="continue the run in RUN_DIR from its checkpoint")
    p.add_argument("--auto-resume", action="store_true",
                   help="resume when --out already holds a checkpoint, else start (SLURM requeue)")
    p.add_argument("--dry-run", action="store_true",
                   help="print the derived schedule (peak lr, warmup, batch phases, total steps) without touching data")


def _load(args) -> tuple[config_mod.Config, Path | None, bool]:
    """(config, run folder, resume?) from the arguments."""
    if args.resume:
        run_dir = Path(args.resume)
        if not (run_dir / "config.toml").is_file():
            raise UsageError("--resume", f"{str(run_dir)!r} is not a run folder (no config.toml)")
        if not (run_dir / "checkpoint.pt").is_file():
            raise UsageError("--resume", f"no checkpoint in {str(run_dir)!r}")
        return config_mod.load(run_dir / "config.toml", args.overrides), run_dir, True
    if not args.config:
        raise UsageError("config", "a config file is required (or --resume RUN_DIR)")
    cfg = config_mod.load(args.config, args.overrides)
    run_dir = Path(args.out) if args.out else None
    resume = bool(args.auto_resume and run_dir is not None and (run_dir / "checkpoint.pt").is_file())
    return cfg, run_dir, resume


def dry_run(cfg: config_mod.Config, world_size: int) -> dict:
    """The derived schedule without data: the training-set size comes from the config or a
    known dataset size (ImageNet-1k 1,281,167; CIFAR-10 50,000)."""
    from bigbatch.trainer.data import train_size_hint
    from bigbatch.trainer.recipe import Schedule

    n = train_size_hint(cfg.data)
    if n is None:  # a "module:function" dataset: its size is known only by calling it
        from bigbatch.trainer.data import build_data

        n = len(build_data(cfg.data).train)
    sched = Schedule(cfg, n)
    per_device, accum = batching.derive_batch(sched.batch_at(0), world_size, cfg.batch.accum_steps)
    return {"num_train": n, "world_size": world_size, "per_device_batch": per_device, "accum_steps": accum,
            **sched.summary(), "description": sched.describe()}


def _launch_torchrun(args, cfg: config_mod.Config, run_dir: Path | None) -> int:
    from bigbatch.trainer.rundir import default_run_dir

    cfg.validate(args.nproc)
    batching.validate(cfg, args.nproc)
    run_dir = run_dir or default_run_dir(cfg)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={args.nproc}",
           "-m", "bigbatch", "train"]
    if args.resume:
        cmd += ["--resume", str(run_dir)]
    else:
        cmd += [args.config, "--out", str(run_dir)] + (["--auto-resume"] if args.auto_resume else [])
    for o in args.overrides:
        cmd += ["--set", o]
    env = dict(os.environ)
    env.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // args.nproc)))
    env.setdefault("TORCHELASTIC_ERROR_FILE", str(Path(run_dir).resolve() / "error.json"))
    proc = subprocess.run(cmd, env=env)
    summary = Path(run_dir) / "summary.json"
    if summary.exists():  # a rank that exits non-zero makes torchrun exit 1: the summary says why
        status = json.loads(summary.read_text())["status"]
        return _exit_code(status) if proc.returncode == 0 or status == "diverged" else EXIT_FAILURE
    # every rank stopped on a signal and checkpointed (no summary is written then)
    return EXIT_PREEMPTED if proc.returncode == 0 else EXIT_FAILURE


def _exit_code(status: str) -> int:
    return {"preempted": EXIT_PREEMPTED, "diverged": EXIT_DIVERGED}.get(status, 0)


def main(args: argparse.Namespace) -> int:
    cfg, run_dir, resume = _load(args)
    if args.nproc is not None and args.nproc < 1:
        raise UsageError("--nproc", f"must be >= 1, got {args.nproc}")
    if args.dry_run:
        from bigbatch.distributed.env import world_size_hint

        world = args.nproc or world_size_hint()
        cfg.validate(world, check_paths=False)
        batching.validate(cfg, world)
        info = dry_run(cfg, world)
        print(info.pop("description"))
        print(json.dumps(info, indent=2))
        return 0
    if args.nproc is not None and "RANK" not in os.environ:
        return _launch_torchrun(args, cfg, run_dir)

    from bigbatch.trainer.loop import run

    try:
        summary = run(cfg, run_dir, resume=resume)
    except (UsageError, ConfigError, KeyboardInterrupt):
        raise
    except Exception as e:  # traceback is in the run folder's train.log
        print(f"bigbatch train: run failed: {type(e).__name__}: {e}", file=sys.stderr)
        return EXIT_FAILURE
    finally:
        from bigbatch.distributed import env as dist_env

        dist_env.destroy()
    return _exit_code(summary["status"])
