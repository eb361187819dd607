"""`bigbatch train`: one run in this process, N local processes (--nproc), or one rank of a
torchrun/SLURM world. Validation happens before anything is launched or written.

Failures end in one line on stderr (the traceback is in the run folder's train.log) and an exit
code (bigbatch.errors): 1 a failure during the run (a checkpoint that could not be written says
which earlier one is intact), 2 bad input, 3 stopped by a signal after checkpointing, 4 diverged,
5 a peer rank stopped answering within dist.timeout_s (the line names the step and the
checkpoint to resume from). With --nproc the launcher keeps torchrun's own report in
RUN/launcher.log and prints the one line of the rank that failed first (a root cause before the
ranks that lost it as a peer).

The modules that import torch (the loop, the data, checkpoints) are imported inside the functions
that need them, so `bigbatch train --help` and bad-input errors stay fast.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import re
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

from bigbatch import config as config_mod
from bigbatch import folders
from bigbatch.errors import (EXIT_DIVERGED, EXIT_FAILURE, EXIT_PEER_LOST, EXIT_PREEMPTED, EXIT_USAGE, ConfigError,
                             PeerLostError, UsageError)

STATUS_DIR_ENV = "BIGBATCH_STATUS_DIR"  # set by the --nproc launcher: each rank leaves rank<R>.json there
_LOG_LINE = re.compile(r"^\d\d:\d\d:\d\d ")  # the ranks' log format (trainer.loop.setup_logging)


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("config", nargs="?", help="TOML config (not needed with --resume)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="SECTION.KEY=VALUE",
                   help="override a config value (TOML syntax; repeatable)")
    p.add_argument("--out", help="run folder (default runs/<name>-<time>)")
    p.add_argument("--nproc", type=int, default=None, help="launch N local processes through torchrun")
    p.add_argument("--nnodes", type=int, default=1,
                   help="with --nproc: nodes of the run, one such launcher on each (the SLURM job runs it so)")
    p.add_argument("--rdzv-endpoint", metavar="HOST:PORT", help="with --nnodes > 1: the c10d rendezvous (torchrun's)")
    p.add_argument("--rdzv-id", help="with --nnodes > 1: the rendezvous id, the same on every node (a job id)")
    p.add_argument("--resume", metavar="RUN_DIR", help="continue the run in RUN_DIR from its newest checkpoint that loads")
    p.add_argument("--auto-resume", action="store_true",
                   help="resume when --out already holds a checkpoint, else start (SLURM requeue)")
    p.add_argument("--dry-run", action="store_true",
                   help="print the derived schedule (peak lr, warmup, batch phases, total steps) without touching data")


def _load(args) -> tuple[config_mod.Config, Path | None, bool]:
    """(config, run folder, resume?) from the arguments."""
    if args.resume:
        run_dir = Path(args.resume)
        if not folders.RunFolder(run_dir).is_run():
            raise UsageError("--resume", f"{str(run_dir)!r} is not a run folder (no {folders.CONFIG})")
        import bigbatch.trainer.checkpoint as ckpt

        if ckpt.latest(run_dir) is None:
            raise UsageError("--resume", f"no checkpoint in {str(run_dir)!r}")
        return config_mod.load(folders.RunFolder(run_dir).config, args.overrides), run_dir, True
    if not args.config:
        raise UsageError("config", "a config file is required (or --resume RUN_DIR)")
    cfg = config_mod.load(args.config, args.overrides)
    run_dir = Path(args.out) if args.out else None
    resume = False
    if args.auto_resume and run_dir is not None:
        import bigbatch.trainer.checkpoint as ckpt

        resume = ckpt.latest(run_dir) is not None
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
    per_device, accum = config_mod.derive_batch(sched.batch_at(0), world_size, cfg.batch.accum_steps)
    return {"num_train": n, "world_size": world_size, "per_device_batch": per_device, "accum_steps": accum,
            **sched.summary(), "description": sched.describe()}


# --- the --nproc launcher ------------------------------------------------------------------------


def _launch_torchrun(args, cfg: config_mod.Config, run_dir: Path | None, resume: bool) -> int:
    """Validate for N ranks, start torchrun, pass the ranks' log lines through, keep the rest
    (torchrun's report, rank tracebacks) in RUN/launcher.log, and end with one line and one code."""
    import bigbatch.trainer.checkpoint as ckpt
    import bigbatch.trainer.preflight as preflight
    from bigbatch.distributed.env import usable_cpus
    from bigbatch.trainer.rundir import default_run_dir

    preflight.check(cfg, args.nproc * args.nnodes, args.nproc)
    if resume:
        try:
            ckpt.select(run_dir, mmap=True)
        except ckpt.NoCheckpointError as e:
            raise UsageError("--resume", str(e)) from None
    run_dir = run_dir or default_run_dir(cfg)
    if args.nnodes == 1:
        rendezvous = ["--standalone"]
    else:  # one such launcher per node; --max-restarts=0: a failed rank ends the run with its own code
        rendezvous = [f"--nnodes={args.nnodes}", "--max-restarts=0", "--rdzv-backend=c10d",
                      f"--rdzv-endpoint={args.rdzv_endpoint}", f"--rdzv-id={args.rdzv_id}"]
    cmd = [sys.executable, "-m", "torch.distributed.run", *rendezvous, f"--nproc-per-node={args.nproc}",
           "-m", "bigbatch", "train"]
    if args.resume:
        cmd += ["--resume", str(run_dir)]
    else:
        cmd += [args.config, "--out", str(run_dir)] + (["--auto-resume"] if args.auto_resume else [])
    for o in args.overrides:
        cmd += ["--set", o]
    env = dict(os.environ)
    env.setdefault("OMP_NUM_THREADS", str(max(1, usable_cpus() // args.nproc)))
    with tempfile.TemporaryDirectory(prefix="bigbatch-launch-") as status_dir:
        env[STATUS_DIR_ENV] = status_dir
        raw_log = Path(status_dir) / folders.LAUNCHER_LOG
        with raw_log.open("w") as raw:
            rc = _supervise(cmd, env, Path(status_dir), raw)
        reports = [json.loads(p.read_text()) for p in sorted(Path(status_dir).glob("rank*.json"))]
        if Path(run_dir).is_dir():  # appended: a resumed run keeps the earlier segments' reports
            with (Path(run_dir) / folders.LAUNCHER_LOG).open("a") as f:
                f.write(raw_log.read_text())
    code, line = launch_outcome(rc, reports, args.nproc, Path(run_dir) / folders.LAUNCHER_LOG)
    if line:
        print(f"bigbatch train: {line}", file=sys.stderr)
    return code


FAILED_GRACE_S = 5.0  # after a rank reported a failure, the others get this long to exit before they are killed


def _supervise(cmd: list[str], env: dict[str, str], status_dir: Path, raw) -> int:
    """Run torchrun in its own process group; its stderr goes to `raw`, the ranks' log lines also
    to our stderr. SIGTERM and SIGUSR2 go to the ranks themselves (they checkpoint; torchrun is
    not asked to stop, which would start its 30 s clock before it kills them), Ctrl-C and any
    signal before a rank has started to torchrun's group. Once a rank has reported a failure the
    run is over: ranks that have not exited FAILED_GRACE_S later (a stopped or hung peer, which
    torchrun would wait 30 s more for) are killed. When torchrun has ended (a SIGTERM to every
    process of a SLURM step reaches it too), the ranks still writing a checkpoint are waited for."""
    proc = subprocess.Popen(cmd, env=env, stderr=subprocess.PIPE, text=True, errors="replace", bufsize=1,
                            start_new_session=True)

    def pump() -> None:
        for line in proc.stderr:
            raw.write(line)
            if _LOG_LINE.match(line):
                sys.stderr.write(line)
                sys.stderr.flush()

    def forward(signum, frame) -> None:
        ranks = _rank_pids(status_dir) if signum != signal.SIGINT else []
        for pid in ranks:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signum)
        if not ranks:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signum)

    reader = threading.Thread(target=pump, daemon=True)
    reader.start()
    old = {s: signal.signal(s, forward) for s in (signal.SIGINT, signal.SIGTERM, signal.SIGUSR2)}
    failed_at = None
    try:
        while proc.poll() is None:
            time.sleep(0.2)
            if failed_at is None and any(json.loads(p.read_text())["code"] not in (0, EXIT_PREEMPTED, EXIT_DIVERGED)
                                         for p in status_dir.glob("rank*.json")):
                failed_at = time.monotonic()
            if failed_at is not None and time.monotonic() - failed_at > FAILED_GRACE_S:
                _kill_ranks(status_dir)  # torchrun starts each rank in a session of its own
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
        deadline = time.monotonic() + RANK_EXIT_WAIT_S
        while any(_alive(pid) for pid in _rank_pids(status_dir)) and time.monotonic() < deadline:
            time.sleep(0.2)
    finally:
        for s, h in old.items():
            signal.signal(s, h)
        reader.join(timeout=10)
    return proc.returncode


RANK_EXIT_WAIT_S = 120.0  # after torchrun ended: how long ranks may still take to checkpoint and exit


def _rank_pids(status_dir: Path) -> list[int]:
    pids = []
    for f in status_dir.glob("pid*"):
        with contextlib.suppress(ValueError, OSError):
            pids.append(int(f.read_text()))
    return pids


def _alive(pid: int) -> bool:
    """Running (a zombie, dead but not yet reaped by its new parent, is not)."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except (OSError, IndexError):
        return False


def _kill_ranks(status_dir: Path) -> None:
    for pid in _rank_pids(status_dir):
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)


# a rank's own failure is the cause; the ranks that then lost it as a peer come after
_PRIORITY = {EXIT_FAILURE: 0, EXIT_USAGE: 0, EXIT_PEER_LOST: 1, EXIT_DIVERGED: 2, EXIT_PREEMPTED: 3, 0: 4}


def launch_outcome(returncode: int, reports: list[dict], nproc: int, log_path: Path) -> tuple[int, str]:
    """(exit code, line to print) from torchrun's exit code and the ranks' reports."""
    reports = sorted(reports, key=lambda r: (_PRIORITY.get(r["code"], 0), r["rank"]))
    if reports and reports[0]["code"] != 0:
        return reports[0]["code"], reports[0]["line"]
    if returncode != 0 or len(reports) < nproc:
        silent = sorted(set(range(nproc)) - {r["rank"] for r in reports})
        who = f"rank(s) {', '.join(map(str, silent))}" if silent else "torchrun"
        return EXIT_FAILURE, (f"{who} stopped without a report (killed by a signal or out of memory?); "
                              f"torchrun's report is in {log_path}")
    return 0, ""


# --- one rank (or the only process) ----------------------------------------------------------------


def _exit_code(status: str) -> int:
    return {"preempted": EXIT_PREEMPTED, "diverged": EXIT_DIVERGED}.get(status, 0)


def _report(name: str, text: str) -> None:
    """For the --nproc launcher: a file in its status folder (written whole, then renamed)."""
    folder = os.environ.get(STATUS_DIR_ENV)
    if not folder:
        return
    tmp = Path(folder) / f".{name}.tmp"
    tmp.write_text(text)
    os.replace(tmp, Path(folder) / name)


def _report_exit(code: int, line: str) -> None:
    from bigbatch.distributed.env import launcher_world

    rank = launcher_world()[0]
    _report(f"rank{rank}.json", json.dumps({"rank": rank, "code": code, "line": line}))


def failure_line(e: BaseException) -> tuple[int, str]:
    """(exit code, one line) for an exception out of `trainer.loop.run`."""
    from bigbatch.trainer.checkpoint import CheckpointWriteError

    if isinstance(e, PeerLostError):
        return EXIT_PEER_LOST, str(e)
    if isinstance(e, CheckpointWriteError):
        return EXIT_FAILURE, f"{e}; the run stopped"
    first = (str(e).strip().splitlines() or [""])[0][:300]
    run_dir = getattr(e, "run_dir", None)
    where = f" (traceback in {folders.RunFolder(run_dir).log})" if run_dir is not None else ""
    return EXIT_FAILURE, f"run failed: {type(e).__name__}: {first}{where}"


def _run_here(cfg: config_mod.Config, run_dir: Path | None, resume: bool) -> int:
    from bigbatch.distributed import env as dist_env
    from bigbatch.trainer import stop
    from bigbatch.trainer.loop import run

    stop.install()  # a stop signal during start-up (data, model) is kept for the loop's first check
    _report(f"pid{dist_env.launcher_world()[0]}", str(os.getpid()))  # the launcher kills what is left of a failed run
    peer_lost = grouped = False
    try:
        try:
            summary = run(cfg, run_dir, resume=resume)
        finally:
            # no signal left over for a later run in this process; the handlers stay: a late SIGTERM
            # (torchrun passing one on as it shuts down) must not kill the rank before it reports its code
            stop.forget()
        code, line = _exit_code(summary["status"]), ""
    except (UsageError, ConfigError) as e:
        _report_exit(EXIT_USAGE, f"error: {e}")
        raise
    except KeyboardInterrupt:
        raise
    except Exception as e:
        code, line = failure_line(e)
        peer_lost = code == EXIT_PEER_LOST
    finally:
        if not peer_lost:  # tearing down a group whose peer is gone can block: the process exits instead
            grouped = dist_env.destroy()
    if line:
        print(f"bigbatch train: {line}", file=sys.stderr)
    _report_exit(code, line)
    if grouped or peer_lost:
        _end_rank(code)
    return code


def _end_rank(code: int) -> None:
    """End a rank that had a process group here without the interpreter's finalization
    (`bigbatch.distributed.env.exit_now` says why); a failed run's W&B run is closed first."""
    from bigbatch.distributed.env import exit_now

    if "wandb" in sys.modules:  # a run that failed left its W&B run open
        import wandb

        if wandb.run is not None:
            wandb.finish(exit_code=1 if code else 0)
    exit_now(code)


def _check_launch(args: argparse.Namespace) -> None:
    """--nproc/--nnodes/--rdzv-* make sense together; a SLURM task that is no rank is refused."""
    from bigbatch.distributed.env import slurm_misfire

    if args.nproc is not None and args.nproc < 1:
        raise UsageError("--nproc", f"must be >= 1, got {args.nproc}")
    if args.nnodes < 1:
        raise UsageError("--nnodes", f"must be >= 1, got {args.nnodes}")
    if args.nnodes > 1 and (args.nproc is None or not args.rdzv_endpoint or not args.rdzv_id):
        raise UsageError("--nnodes", "a multi-node launch needs --nproc, --rdzv-endpoint HOST:PORT and --rdzv-id")
    if args.nproc is None and not args.dry_run and (why := slurm_misfire()):
        raise UsageError("SLURM_NTASKS", why)


def main(args: argparse.Namespace) -> int:
    _check_launch(args)
    cfg, run_dir, resume = _load(args)
    if args.dry_run:
        from bigbatch.distributed.env import world_size_hint
        import bigbatch.trainer.preflight as preflight

        world = args.nproc or world_size_hint()
        preflight.check(cfg, world, check_paths=False)
        info = dry_run(cfg, world)
        print(info.pop("description"))
        print(json.dumps(info, indent=2))
        return 0
    if args.nproc is not None and "RANK" not in os.environ:
        return _launch_torchrun(args, cfg, run_dir, resume)
    return _run_here(cfg, run_dir, resume)
