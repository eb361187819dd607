"""`bigbatch slurm`: render and submit sbatch jobs for training, Ray sweeps and job-array sweeps.

    bigbatch slurm render CONFIG --nodes 2 --gpus-per-node 8      print the sbatch script
    bigbatch slurm submit CONFIG --nodes 2 --gpus-per-node 8      submit it, print the job id
    bigbatch slurm submit-sweep SWEEP --nodes 4                   Ray head + workers, `bigbatch sweep`
    bigbatch slurm array SWEEP                                    one trial per array task + a collector
    bigbatch slurm status [JOB...] / cancel JOB... [--signal USR2]

The scripts come from the templates in bigbatch/launch/templates/ (train.sbatch, sweep.sbatch),
shipped with the package. Every value that
reaches the shell part of a script is quoted with `shlex.quote`; values that reach `#SBATCH`
lines (which sbatch reads without a shell) must match a strict pattern, checked here. Bad input
(nodes < 1, a malformed time limit, a partition sbatch rejects, no sbatch) is a `UsageError`:
one line, exit 2, before anything is submitted.

The config as submitted: `render`/`submit` load the config with its --set overrides and write the
resolved config into the script itself, which SLURM keeps with the job; the job writes it to
RUN_DIR/submitted-config.toml and trains from that, at its first start and at every requeue. An
edit of the config file after `submit` changes nothing queued.

Preemption (train.sbatch): SLURM sends `--signal` (USR2, 90 s before the time limit by default)
to the batch script, which passes SIGTERM to the training processes (SIGTERM to the script
itself too); they checkpoint and exit with code 3, and the script requeues the job whenever the
training ended with 3 and the job was not cancelled. The requeued job runs the same
`bigbatch train RUN_DIR/submitted-config.toml --out RUN_DIR --auto-resume`, which resumes from
RUN_DIR/checkpoint.pt.
"""

from __future__ import annotations

import argparse
import json
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

from bigbatch import config as config_mod
from bigbatch import folders
from bigbatch.errors import UsageError
from bigbatch.launch.jobspec import (JOB_ID, SIGNALS, JobSpec, abs_path, assign, cpus_per_proc, fill,
                                     heredoc, match_pattern, render_collector)

TORCHRUN_GRACE_S = 30  # torchrun kills its workers this long after it passed them a SIGTERM
SNAPSHOT = "submitted-config.toml"  # in the run folder: the config the job trains, as submitted

# --- training job ----------------------------------------------------------------------------


def render_train(config_path: str, overrides: list[str], job: JobSpec, out: str | None) -> str:
    """The sbatch script of one (multi-node) training run; the config is loaded and validated here."""
    import bigbatch.trainer.preflight as preflight  # deferred: torch

    cfg = config_mod.load(config_path, overrides)
    preflight.check(cfg, job.world_size, job.procs_per_node, check_paths=False)  # the files are on the cluster
    limit = min(job.signal_time, TORCHRUN_GRACE_S)
    if cfg.checkpoint.stop_within_s >= limit:
        raise UsageError("checkpoint.stop_within_s", f"{cfg.checkpoint.stop_within_s:g} s leaves no time to write the "
                         f"checkpoint before the ranks are killed ({limit} s: torchrun's grace after SIGTERM, or "
                         "--signal-time); keep it well below")
    if out is not None:
        run_dir = assign("RUN_DIR", abs_path(out))
    else:  # stable across requeues: the job id does not change
        run_dir = f'RUN_DIR="$SLURM_SUBMIT_DIR"/runs/{shlex.quote(cfg.name)}-"$SLURM_JOB_ID"'
    settings = [
        run_dir, f'CONFIG="$RUN_DIR"/{SNAPSHOT}', assign("NPROC_PER_NODE", job.procs_per_node),
        assign("PYTHON", job.python), assign("STOP_SIGNAL", job.signal), assign("MAX_REQUEUES", job.max_requeues),
        "TRAIN_ARGS=()", job.srun_args(),
    ]
    snapshot = ("# The config as submitted (with its --set overrides), kept with the job by SLURM: this job and\n"
                "# every requeue of it train exactly this, whatever happens to the file it came from.\n"
                + heredoc('"$CONFIG"', config_mod.dumps(cfg)))
    return fill("train.sbatch", {"header": job.header(), "settings": "\n".join(settings), "user_env": job.user_env(),
                                 "config_snapshot": snapshot})


# --- sweeps ------------------------------------------------------------------------------------


def _load_sweep(path: str):
    # deferred: the sweep modules import torch; `slurm status/cancel/train` must start fast (a
    # USR2 sent through `bigbatch slurm cancel` has to arrive while the job still trains)
    from bigbatch.study import spec as spec_mod
    from bigbatch.study.sweep import load_spec_dict

    spec_dict = load_spec_dict(path)
    return spec_mod.from_dict(spec_dict), spec_dict


def render_sweep(sweep_path: str, job: JobSpec, out: str | None) -> str:
    """Ray head on the first node, workers on the others, then `bigbatch sweep --ray-address`."""
    spec, _ = _load_sweep(sweep_path)
    out_dir = (assign("OUT_DIR", abs_path(out)) if out is not None
               else f'OUT_DIR="$SLURM_SUBMIT_DIR"/sweeps/{shlex.quote(spec.name)}-"$SLURM_JOB_ID"')
    if job.container_image or job.container_mounts:
        raise UsageError("--container-image", "submit-sweep runs Ray on the nodes directly; use an allocation whose "
                                              "nodes have bigbatch installed (or the array path)")
    settings = [assign("SWEEP_CONFIG", abs_path(sweep_path)), out_dir, assign("GPUS_PER_NODE", job.gpus_per_node),
                assign("PYTHON", job.python), assign("STOP_SIGNAL", job.signal), assign("MAX_REQUEUES", job.max_requeues)]
    return fill("sweep.sbatch", {"header": job.header(), "settings": "\n".join(settings), "user_env": job.user_env()})


ARRAY_DIR = "slurm"  # inside the sweep folder: one config per trial and the index -> trial table


def prepare_array(sweep_path: str, out: str) -> tuple[int, list[str]]:
    """Write SWEEP/slurm/trial-<i>.toml and trials.txt (line i+1: trial i's name); returns (n, names).

    Each array task trains one grid point with plain `bigbatch train`, so it is checkpointed and
    requeued like any training job; `bigbatch slurm collect SWEEP` then writes trials.jsonl,
    critical.json and the report the way `bigbatch sweep` does.
    """
    spec, spec_dict = _load_sweep(sweep_path)
    d = Path(out) / ARRAY_DIR
    d.mkdir(parents=True, exist_ok=True)
    folders.SweepFolder(out).write_spec(spec_dict)
    names = []
    for i, point in enumerate(spec.points()):
        config_mod.save(spec.trial_config(point), d / f"trial-{i}.toml")
        names.append(spec.trial_name(point))
    (d / "trials.txt").write_text("".join(f"{n}\n" for n in names))
    return len(names), names


def render_array(out: str, n_trials: int, job: JobSpec, max_parallel: int | None) -> str:
    """One `bigbatch train` per array task, config and run folder picked by SLURM_ARRAY_TASK_ID."""
    if max_parallel is not None and max_parallel < 1:
        raise UsageError("--max-parallel", f"must be >= 1, got {max_parallel}")
    array = f"0-{n_trials - 1}" + (f"%{max_parallel}" if max_parallel else "")
    sweep_dir = abs_path(out)
    settings = [
        assign("SWEEP_DIR", sweep_dir),
        'CONFIG="$SWEEP_DIR"/slurm/trial-"$SLURM_ARRAY_TASK_ID".toml',
        'RUN_DIR="$SWEEP_DIR"/runs/"$(sed -n "$(( SLURM_ARRAY_TASK_ID + 1 ))p" "$SWEEP_DIR"/slurm/trials.txt)"',
        assign("NPROC_PER_NODE", job.procs_per_node), assign("PYTHON", job.python),
        assign("STOP_SIGNAL", job.signal), assign("MAX_REQUEUES", job.max_requeues), "TRAIN_ARGS=()", job.srun_args(),
    ]
    snapshot = "# The trial configs were written into SWEEP_DIR/slurm/ when the array was submitted."
    return fill("train.sbatch", {"header": job.header(array), "settings": "\n".join(settings), "user_env": job.user_env(),
                                 "config_snapshot": snapshot})


def collect_array(sweep_dir: str) -> dict:
    """trials.jsonl + critical.json + report from the array tasks' run folders."""
    from bigbatch.study import spec as spec_mod  # deferred: torch (see _load_sweep)
    from bigbatch.study.records import record_trial, trial_status
    from bigbatch.study.sweep import finalise
    from bigbatch.study.trial import trial_target

    sweep = folders.SweepFolder(sweep_dir)
    if (spec_dict := sweep.read_spec()) is None:
        raise UsageError("SWEEP_DIR", f"{sweep_dir!r} is not an array sweep folder (no {folders.SWEEP_SPEC})")
    spec = spec_mod.from_dict(spec_dict)
    for point in spec.points():
        run = sweep.run(spec.trial_name(point))
        if (summary := run.read_summary()) is None:
            continue  # the finalisation records it as failed
        # as a Ray trial records itself: steps to target interpolated between the evaluations around it
        record_trial(run.path, point, spec.trial.gap_epochs, summary, trial_status(summary),
                     target=trial_target(spec, point))
    return finalise(spec, sweep.path)


# --- talking to SLURM --------------------------------------------------------------------------


def _slurm_tool(name: str) -> str:
    path = shutil.which(name)
    if path is None:
        raise UsageError(name, "not found on PATH: run on a SLURM login node (Debian/Ubuntu: apt-get install slurm-client)")
    return path


_SBATCH_FIELDS = (("partition", "--partition"), ("account", "--account"), ("time limit", "--time"),
                  ("node count", "--nodes"), ("gres", "--gpus-per-node"), ("gpu", "--gpus-per-node"))


def sbatch(script: str, extra: list[str] | None = None) -> str:
    """Submit a script on stdin; the job id. A rejected submission is a UsageError naming the option."""
    cmd = [_slurm_tool("sbatch"), "--parsable", *(extra or [])]
    proc = subprocess.run(cmd, input=script, capture_output=True, text=True, timeout=120)
    if proc.returncode != 0:
        lines = [l.strip() for l in proc.stderr.splitlines() if l.strip()] or [f"exit code {proc.returncode}"]
        message = re.sub(r"^sbatch: (error|fatal): ", "", lines[-1])
        key = next((opt for word, opt in _SBATCH_FIELDS if word in message.lower()), "sbatch")
        raise UsageError(key, f"sbatch rejected the job: {message}")
    job_id = proc.stdout.strip().split(";")[0]
    if not JOB_ID.fullmatch(job_id):
        raise RuntimeError(f"unexpected sbatch output: {proc.stdout!r}")
    return job_id


def _submit(script: str, job: JobSpec, extra: list[str] | None = None) -> str:
    _slurm_tool("sbatch")  # before anything is written
    log_dir = Path(job.log_dir)
    log_dir.mkdir(parents=True, exist_ok=True)  # SLURM does not create the --output folder
    job_id = sbatch(script, extra)
    (log_dir / f"{job.job_name}-{job_id}.sbatch").write_text(script)
    return job_id


def queue(job_ids: list[str]) -> list[dict]:
    """squeue rows (job_id, name, state, time, time_limit, nodes, reason) for the given jobs, or the user's."""
    fmt = "%i|%j|%T|%M|%l|%D|%R"
    cmd = [_slurm_tool("squeue"), "-h", "-o", fmt]
    cmd += ["-j", ",".join(job_ids)] if job_ids else ["--me"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=60)
    if proc.returncode != 0 and "Invalid job id" not in proc.stderr:
        raise UsageError("squeue", proc.stderr.strip().splitlines()[-1] if proc.stderr.strip() else f"exit {proc.returncode}")
    keys = ("job_id", "name", "state", "time", "time_limit", "nodes", "reason")
    return [dict(zip(keys, line.split("|", 6))) for line in proc.stdout.splitlines() if line.strip()]


# --- command line -------------------------------------------------------------------------------


def _job_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--nodes", type=int, default=1, help="nodes (default 1)")
    p.add_argument("--gpus-per-node", type=int, default=0, help="GPUs per node (0 = a CPU-only partition)")
    p.add_argument("--procs-per-node", type=int, help="training processes per node (default: GPUs per node, or 1)")
    p.add_argument("--cpus-per-task", type=int,
                   help="CPUs of each node's task (default: processes per node x (1 + data.num_workers when the data "
                        "goes through DataLoader workers or DALI threads))")
    p.add_argument("--mem", help="memory per node, a SLURM size such as 256G (default: 0 = all of it on GPU jobs, "
                                 "the site's default on CPU jobs)")
    p.add_argument("--sbatch-opt", action="append", default=[], metavar="NAME[=VALUE]",
                   help="any other sbatch option, e.g. qos=high, constraint=a100, exclusive, reservation=r1; repeatable")
    p.add_argument("--partition", help="SLURM partition")
    p.add_argument("--account", help="SLURM account")
    p.add_argument("--time", help="time limit: minutes, HH:MM:SS, D-HH:MM, ...")
    p.add_argument("--job-name", help="job name (default: the config's name)")
    p.add_argument("--signal", default="USR2", choices=SIGNALS, help="preemption signal sent to the batch script (default USR2)")
    p.add_argument("--signal-time", type=int, default=90, help="seconds before the time limit to send it (default 90)")
    p.add_argument("--max-requeues", type=int, default=20, help="requeue at most this many times (default 20)")
    p.add_argument("--log-dir", default="slurm-logs", help="folder of the job's output files, named by job id (default slurm-logs)")
    p.add_argument("--python", default="python3", help="Python interpreter on the nodes (default python3)")
    p.add_argument("--container-image", help="pyxis/enroot: run the training steps in this image, e.g. "
                                              "nvcr.io#nvidia/pytorch:24.10-py3 or a .sqsh file (see docker/Dockerfile)")
    p.add_argument("--container-mounts", help="pyxis: SRC:DST[,SRC:DST...] to mount (data and run folders)")
    p.add_argument("--env", action="append", default=[], metavar="NAME=VALUE",
                   help="export a variable in the job (e.g. NCCL_SOCKET_IFNAME=ib0); repeatable")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    sub = parser.add_subparsers(dest="action", metavar="ACTION", required=True)
    for name, help_ in (("render", "print the sbatch script of a training run"),
                        ("submit", "submit a training run; prints the job id")):
        p = sub.add_parser(name, help=help_, description=help_)
        p.add_argument("config", help="training config (TOML)")
        p.add_argument("--set", dest="overrides", action="append", default=[], metavar="SECTION.KEY=VALUE",
                       help="config override passed to `bigbatch train --set` (repeatable)")
        p.add_argument("--out", help="run folder (default $SLURM_SUBMIT_DIR/runs/<name>-<job id>)")
        _job_arguments(p)
    p = sub.add_parser("submit-sweep", help="a Ray sweep inside one allocation (head on the first node)",
                       description="Ray head on the first node, workers on the others, then `bigbatch sweep --ray-address`.")
    p.add_argument("config", help="sweep config (TOML)")
    p.add_argument("--out", help="sweep folder (default $SLURM_SUBMIT_DIR/sweeps/<name>-<job id>)")
    p.add_argument("--print", dest="print_only", action="store_true", help="print the script, submit nothing")
    _job_arguments(p)
    p = sub.add_parser("array", help="a sweep as a job array: one trial per task, then a collector job",
                       description="One `bigbatch train` per array task; a dependent job writes trials.jsonl, "
                                   "critical.json and the report (`bigbatch slurm collect`).")
    p.add_argument("config", help="sweep config (TOML)")
    p.add_argument("--out", required=True, help="sweep folder (trial configs are written there before submitting)")
    p.add_argument("--max-parallel", type=int, help="array tasks running at once (--array=0-N%%K)")
    p.add_argument("--print", dest="print_only", action="store_true", help="print the array script, submit nothing")
    _job_arguments(p)
    p = sub.add_parser("collect", help="trials.jsonl, critical.json and report from an array sweep folder")
    p.add_argument("sweep_dir", metavar="SWEEP_DIR")
    p = sub.add_parser("status", help="state of jobs (squeue)")
    p.add_argument("job_ids", nargs="*", metavar="JOB_ID", help="job ids (default: your jobs)")
    p.add_argument("--json", action="store_true", help="one JSON object per job")
    p = sub.add_parser("cancel", help="cancel jobs (scancel), or signal them to checkpoint and requeue")
    p.add_argument("job_ids", nargs="+", metavar="JOB_ID")
    p.add_argument("--signal", choices=SIGNALS, help="send this signal to the batch script instead of cancelling: "
                                                      "the job checkpoints and requeues (what preemption does)")


def _parse_env(items: list[str]) -> list[tuple[str, str]]:
    env = []
    for item in items:
        name, sep, value = item.partition("=")
        if not sep:
            raise UsageError("--env", f"expected NAME=VALUE, got {item!r}")
        env.append((name, value))
    return env


def _parse_sbatch_opts(items: list[str]) -> list[tuple[str, str | None]]:
    opts = []
    for item in items:
        name, sep, value = item.partition("=")
        opts.append((name.removeprefix("--"), value if sep else None))
    return opts


def job_from_args(args: argparse.Namespace, default_name: str, data_cfg=None) -> JobSpec:
    return JobSpec(job_name=args.job_name or default_name, nodes=args.nodes, gpus_per_node=args.gpus_per_node,
                   procs_per_node=args.procs_per_node, cpus_per_task=args.cpus_per_task,
                   cpus_per_proc=cpus_per_proc(data_cfg) if data_cfg is not None else 1, mem=args.mem,
                   sbatch_opts=_parse_sbatch_opts(args.sbatch_opt), partition=args.partition,
                   account=args.account, time=args.time, signal=args.signal, signal_time=args.signal_time,
                   max_requeues=args.max_requeues, log_dir=args.log_dir, python=args.python, env=_parse_env(args.env),
                   container_image=args.container_image, container_mounts=args.container_mounts)


def _check_ids(ids: list[str]) -> list[str]:
    for i in ids:
        match_pattern(JOB_ID, i, "JOB_ID", "a job id such as 1234 or 1234_5")
    return ids


def _print_or_submit(script: str, job: JobSpec, print_only: bool) -> int:
    if print_only:
        sys.stdout.write(script)
    else:
        print(_submit(script, job))
    return 0


def _train(args: argparse.Namespace) -> int:
    cfg = config_mod.load(args.config, args.overrides)
    job = job_from_args(args, cfg.name, cfg.data)
    return _print_or_submit(render_train(args.config, args.overrides, job, args.out), job, args.action == "render")


def _submit_sweep(args: argparse.Namespace) -> int:
    spec, _ = _load_sweep(args.config)
    job = job_from_args(args, spec.name)
    return _print_or_submit(render_sweep(args.config, job, args.out), job, args.print_only)


def _array_sweep(args: argparse.Namespace) -> int:
    spec, _ = _load_sweep(args.config)
    if args.procs_per_node is None:
        args.procs_per_node = spec.trial.workers_per_trial
    job = job_from_args(args, spec.name, spec.trial_config(spec.points()[0]).data)
    if job.nodes != 1:
        raise UsageError("--nodes", "an array task trains one trial on one node; use submit-sweep for multi-node trials")
    import bigbatch.trainer.preflight as preflight  # deferred: torch

    for point in spec.points():  # every trial must work on the task's processes
        preflight.check(spec.trial_config(point), job.world_size, job.procs_per_node, check_paths=False)
    script = render_array(args.out, len(spec.points()), job, args.max_parallel)
    if args.print_only:
        return _print_or_submit(script, job, True)
    _slurm_tool("sbatch")
    prepare_array(args.config, args.out)
    array_id = _submit(script, job)
    collect_id = sbatch(render_collector(job, f"afterany:{array_id}", args.out))
    print(array_id)
    print(f"collector job {collect_id} writes {abs_path(args.out)}/trials.jsonl when the array ends", file=sys.stderr)
    return 0


def _collect(args: argparse.Namespace) -> int:
    analysis = collect_array(args.sweep_dir)
    print(json.dumps({"trials": analysis.get("trials"), "b_crit": analysis.get("b_crit")}))
    return 0


def _status(args: argparse.Namespace) -> int:
    rows = queue(_check_ids(args.job_ids))
    seen = {r["job_id"] for r in rows}
    for r in rows:
        print(json.dumps(r) if args.json else f"{r['job_id']:>10} {r['state']:<11} {r['time']:>10} {r['name']} ({r['reason']})")
    for j in args.job_ids:
        if j not in seen:
            print(json.dumps({"job_id": j, "state": "NOT_IN_QUEUE"}) if args.json
                  else f"{j:>10} not in the queue (finished, cancelled or unknown)")
    return 0


def _cancel(args: argparse.Namespace) -> int:
    cmd = [_slurm_tool("scancel")]
    if args.signal:  # to the batch script, which checkpoints and requeues (train.sbatch)
        cmd += ["--batch", f"--signal={args.signal}"]
    proc = subprocess.run(cmd + _check_ids(args.job_ids), capture_output=True, text=True, timeout=60)
    if proc.returncode != 0:
        raise UsageError("JOB_ID", proc.stderr.strip().splitlines()[-1] if proc.stderr.strip() else f"scancel exit {proc.returncode}")
    return 0


ACTIONS = {"render": _train, "submit": _train, "submit-sweep": _submit_sweep, "array": _array_sweep,
           "collect": _collect, "status": _status, "cancel": _cancel}


def main(args: argparse.Namespace) -> int:
    return ACTIONS[args.action](args)
