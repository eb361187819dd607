"""`bigbatch sweep CONFIG`: a Ray Tune sweep over global batch size x learning rate (x any
training-config axes, `bigbatch.study.axes`: a width sweep, `bigbatch.study.width`).

Every trial is one ordinary training run in SWEEP/runs/<trial>/ (`bigbatch.study.trial`),
trained to the target or to its budget; evaluation rows are reported to Ray Tune as they come.
The records it leaves are read and written by `bigbatch.study.records`.

A trial that raises is recorded as failed and the others go on; a diverged trial (non-finite
loss) is stopped and recorded as diverged. With `[search] adaptive = true` the trials are not a
fixed grid: a Ray Tune searcher (`bigbatch.study.search`) asks the trial queue (`bigbatch.study.adaptive`)
for each next trial as others finish (lr-grid extension at an edge, seeds at the deciding lrs,
racing, the gap phase). An interrupted sweep continues with `--resume` (a grid: Tuner.restore;
adaptive: the queue replayed, finished trials answering from their trial.json): finished trials
are not run again, an unfinished one restarts from its last checkpoint when it has one.

Output folder (file names: `bigbatch.folders`):
    sweep.json        the sweep config as run (self-contained: the base config read in)
    runs/<trial>/     each trial's run folder (config.toml, metrics.jsonl, summary.json, ...)
    tune/             Ray Tune's experiment state (what --resume restores)
    race/             steps of finished trials that racing trials compare against (adaptive)
    trials.jsonl      one line per trial (see `trial_record`)
    critical.json     the critical-batch-size fit and gap table (`bigbatch.study.critical.analyse`);
                      with axes: per combination of axis values, and the width section (`axes_report`)
    report.md, report.html, *.png   (`bigbatch.study.report`)
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import socket
import sys
import time
from datetime import datetime
from pathlib import Path
from typing import Any, Callable

from bigbatch import config as config_mod
from bigbatch import folders
from bigbatch.distributed.env import usable_cpus
from bigbatch.errors import UsageError
from bigbatch.study import adaptive, axes_report, critical, search
from bigbatch.study import spec as spec_mod
from bigbatch.study.records import CRITICAL, RUNS_DIR, TRIAL_RECORD, TRIALS, headline, trial_record
from bigbatch.study.report import write_report
from bigbatch.study.spec import SweepSpec

TUNE_DIR = "tune"


class Interrupted(Exception):
    """The sweep was stopped (Ctrl-C / SIGINT) before every trial finished; Ray Tune saved its state."""


# --- the driver ------------------------------------------------------------------------------


def check_ray_address(address: str, timeout_s: float = 3.0) -> None:
    """Fail fast (exit 2) when nothing answers at a Ray address, before ray.init waits on it."""
    if address == "auto":
        return
    hostport = address.split("://", 1)[-1]
    host, sep, port = hostport.rpartition(":")
    if not sep or not host or not port.isdigit():
        raise UsageError("--ray-address", f"expected HOST:PORT (or ray://HOST:PORT, or auto), got {address!r}")
    try:
        with socket.create_connection((host, int(port)), timeout=timeout_s):
            pass
    except OSError as e:
        raise UsageError("--ray-address", f"no Ray cluster answers at {address} ({e.strerror or e})") from None


def init_ray(address: str | None, num_cpus: int | None = None) -> None:
    """Local Ray (no dashboard, no token auth) by default; a running cluster with `address`."""
    import logging

    import ray

    # Ray Tune's own progress tables and INFO lines would bury the one line per trial printed here.
    os.environ.setdefault("RAY_AIR_NEW_OUTPUT", "0")
    logging.getLogger("ray.tune").setLevel(logging.WARNING)
    env_vars = {"RAY_TRAIN_HEALTH_CHECK_INTERVAL_S": os.environ.get("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "0.2"),
                "PYTHONWARNINGS": "ignore::DeprecationWarning"}
    os.environ.update(env_vars)
    if address:
        ray.init(address=address, runtime_env={"env_vars": env_vars}, log_to_driver=False)
    else:
        os.environ.setdefault("RAY_AUTH_MODE", "disabled")
        # Ray starts its workers at niceness 15 (to favour the raylet); here the workers are the
        # study, and on a shared machine niced trials starve behind every other process.
        os.environ.setdefault("RAY_worker_niceness", "0")
        ray.init(num_cpus=num_cpus or usable_cpus(), include_dashboard=False, log_to_driver=False,
                 runtime_env={"env_vars": env_vars})


def _progress_callback(spec: SweepSpec, total: Callable[[], int], concurrency: int):
    from ray import tune

    class Progress(tune.Callback):
        """One line per finished trial on the driver's stdout, with the elapsed time and an ETA.

        ETA = the mean wall time per finished trial x the trials still planned / the trials run at
        once; an adaptive study plans more trials as it goes, so its ETA can grow."""

        def __init__(self) -> None:
            self.done = 0
            self.t0 = time.perf_counter()
            self.trial_s: list[float] = []

        def _line(self, trial, text: str) -> None:
            self.done += 1
            elapsed = time.perf_counter() - self.t0
            r = trial.last_result or {}
            if r.get("wall_s"):
                self.trial_s.append(r["wall_s"])
            n = total()
            eta = ""
            if self.trial_s and n > self.done:
                eta = f", ETA {sum(self.trial_s) / len(self.trial_s) * (n - self.done) / concurrency:.0f} s"
            print(f"[{self.done}/{n}] {spec.trial_name(trial.config['point'])}: {text}  ({elapsed:.0f} s{eta})", flush=True)

        def on_trial_complete(self, iteration, trials, trial, **info):
            r = trial.last_result or {}
            s = r.get("steps_to_target")
            if r.get("steps_lower_bound") is not None:
                text = f"slower (> {int(r['steps_lower_bound'])} steps, raced)"
            elif s is not None:
                text = f"{s:.1f} steps to target"
            else:
                text = "target not reached"
            if r.get("test_acc") is not None:
                text += f", test_acc {r['test_acc']:.4f}"
            if r.get("train_acc") is not None and trial.config["point"].get("phase") == "gap":
                text += f", train_acc {r['train_acc']:.4f}"
            self._line(trial, text)

        def on_trial_error(self, iteration, trials, trial, **info):
            self._line(trial, "FAILED")

    return Progress()


def run_sweep(spec: SweepSpec, spec_dict: dict[str, Any], out_dir: Path, *, resume: bool = False,
              ray_address: str | None = None, num_cpus: int | None = None, quiet: bool = False) -> dict[str, Any]:
    """Run (or resume) the sweep into `out_dir`; returns the critical-batch analysis."""
    import ray
    from ray import tune

    from bigbatch.study.trial import run_trial  # torch and the trainer: only when trials run

    out_dir = out_dir.resolve()
    tune_dir = out_dir / TUNE_DIR
    if ray_address:
        check_ray_address(ray_address)
    if resume:
        if not tune.Tuner.can_restore(str(tune_dir)):
            raise UsageError("--resume", f"no sweep to resume in {str(out_dir)!r}")
    elif tune_dir.exists():
        raise UsageError("--out", f"{str(out_dir)!r} already holds a sweep: pass --resume to continue it, or another --out")
    out_dir.mkdir(parents=True, exist_ok=True)
    folders.SweepFolder(out_dir).write_spec(spec_dict)

    owns_ray = not ray.is_initialized()  # a caller's Ray session (a notebook, a test) is used as it is
    if owns_ray:
        init_ray(ray_address, num_cpus)
    queue = adaptive.TrialQueue(spec) if spec.search.adaptive else None
    try:
        t = spec.trial
        resources = {"cpu": t.cpus_per_worker, "gpu": t.gpus_per_worker}
        if t.workers_per_trial > 1:
            # The trial itself only starts the TorchTrainer; its workers hold the real resources.
            resources = {"cpu": 0.01}
        trainable = tune.with_resources(
            tune.with_parameters(run_trial, spec_dict=spec_dict, out_dir=str(out_dir)), resources)
        points = spec.points()
        concurrency = t.max_concurrent or max(1, int(ray.cluster_resources().get("CPU", 1) // max(t.cpus_per_worker, 1e-9)))
        total = queue.planned if queue else (lambda: len(points))
        callbacks = [] if quiet else [_progress_callback(spec, total, concurrency)]
        names = dict(trial_name_creator=lambda tr: spec.trial_name(tr.config["point"]),
                     trial_dirname_creator=lambda tr: spec.trial_name(tr.config["point"]))
        run_config = tune.RunConfig(name=TUNE_DIR, storage_path=str(out_dir), verbose=0, callbacks=callbacks,
                                    failure_config=tune.FailureConfig(max_failures=0))
        if queue is not None:
            # Adaptive: the queue decides trial by trial. A resumed study replays the queue: finished
            # trials report their trial.json at once, so only the unfinished ones train again.
            if resume:
                shutil.rmtree(tune_dir)
            searcher = search.queue_searcher(queue, lambda p: read_record(spec, out_dir, p))
            tuner = tune.Tuner(trainable, run_config=run_config, tune_config=tune.TuneConfig(
                search_alg=searcher, num_samples=-1, max_concurrent_trials=t.max_concurrent or None,
                reuse_actors=True, **names))
        elif resume:
            tuner = tune.Tuner.restore(str(tune_dir), trainable, resume_unfinished=True, resume_errored=False)
        else:
            tuner = tune.Tuner(
                trainable,
                param_space={"point": tune.grid_search(points)},
                tune_config=tune.TuneConfig(max_concurrent_trials=t.max_concurrent or None, reuse_actors=True, **names),
                run_config=run_config,
            )
        results = tuner.fit()
        errors = {spec.trial_name(r.config["point"]): r.error for r in results if r.error is not None}
    finally:
        if owns_ray:
            ray.shutdown()
    if queue is not None:
        points = list(queue.issued.values())
    unfinished = [spec.trial_name(p) for p in points
                  if spec.trial_name(p) not in errors and not (out_dir / RUNS_DIR / spec.trial_name(p) / TRIAL_RECORD).is_file()]
    if unfinished:  # Tune returns normally after SIGINT, with the state saved for Tuner.restore
        raise Interrupted(f"{len(points) - len(unfinished)} of {len(points)} trials finished")
    return finalise(spec, out_dir, points, errors, num_cpus)  # after Ray's workers are gone: the measurements get the CPUs


def finalise(spec: SweepSpec, out_dir: Path, points: list[dict[str, Any]] | None = None,
             errors: dict[str, BaseException] | None = None, num_cpus: int | None = None) -> dict[str, Any]:
    """What every sweep ends with, whoever ran its trials (Ray here, a SLURM job array in
    `bigbatch slurm collect`): the noise scales at the target measured on the trials the headline
    reads them from (`bigbatch.study.at_target`), trials.jsonl, critical.json and the report."""
    from bigbatch.study.at_target import measure_at_target  # torch: only once there are trials

    points = points if points is not None else spec.points()
    errors = errors or {}
    records = [read_record(spec, out_dir, p, errors.get(spec.trial_name(p))) for p in points]
    # B_simple at the target is read per batch's best lr: pooled over axis values it would mix
    # experiments, so a sweep with axes measures none
    measure_at_target(records, 0 if spec.axes else spec.trial.b_simple_samples, spec.trial.torch_threads, num_cpus)
    analysis = collect(spec, out_dir, errors, points)
    write_report(out_dir)
    return analysis


def read_record(spec: SweepSpec, out_dir: Path, point: dict[str, Any], error: BaseException | None = None) -> dict[str, Any]:
    """A trial's trials.jsonl record: its trial.json, or a `failed` record when it has none."""
    name = spec.trial_name(point)
    path = out_dir / RUNS_DIR / name / TRIAL_RECORD
    if path.is_file() and error is None:
        rec = json.loads(path.read_text())
    else:
        message = _first_line(error) if error is not None else "no result (the trial did not finish)"
        rows = folders.SweepFolder(out_dir).run(name).read_metrics()
        rec = trial_record(point, None, rows, spec.trial.gap_epochs, "failed", message)
    rec["trial"] = name
    return rec


def collect(spec: SweepSpec, out_dir: Path, errors: dict[str, BaseException] | None = None,
            points: list[dict[str, Any]] | None = None) -> dict[str, Any]:
    """trials.jsonl and critical.json from the run folders (a trial without a record failed)."""
    errors = errors or {}
    records = [read_record(spec, out_dir, p, errors.get(spec.trial_name(p))) for p in (points or spec.points())]
    (out_dir / TRIALS).write_text("".join(json.dumps(r) + "\n" for r in records))
    analysis = analyse_records(records, spec)
    (out_dir / CRITICAL).write_text(json.dumps(analysis, indent=2, allow_nan=False) + "\n")
    return analysis


def analyse_records(records: list[dict[str, Any]], spec: SweepSpec) -> dict[str, Any]:
    """critical.json's content from trials.jsonl's records (what `bigbatch report` refits too); a
    sweep with axes: per combination of axis values, and the width section (`axes_report`)."""
    if spec.axes:
        return axes_report.analyse(records, {"name": spec.name, "target": vars(spec.target)})
    analysis = critical.analyse(records)
    analysis["added_batches"] = critical.added_batches(records, spec.batch_sizes)
    analysis["sweep"] = spec.name
    analysis["target"] = {k: v for k, v in vars(spec.target).items() if v is not None}
    return analysis


def _first_line(err: BaseException) -> str:
    """The root cause of a Ray-wrapped trial error, one line."""
    text = str(err).strip().splitlines()
    lines = [l.strip() for l in text if l.strip()]
    for line in reversed(lines):  # the last "SomeError: message" line is the trial's own exception
        head = line.split(":", 1)[0]
        if head.endswith(("Error", "Exception")) and " " not in head:
            return line
    return lines[-1] if lines else type(err).__name__


def default_out(name: str) -> Path:
    return Path("sweeps") / f"{name}-{datetime.now().strftime('%Y%m%d-%H%M%S')}"


def load_spec_dict(path: str, overrides: list[str] = ()) -> dict[str, Any]:
    """The sweep config as a self-contained dict (the base config read in), for the trials."""
    p = Path(path)
    raw = config_mod.read_toml(p)
    if overrides:
        raw["overrides"] = list(raw.get("overrides", [])) + list(overrides)
    spec = spec_mod.from_dict(raw, p.parent)  # validates everything, names the field on error
    return {**raw, "base": spec.base}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("config", help="sweep config (TOML): base config, batch_sizes, lr_multipliers, seeds, target, trial budget")
    parser.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE",
                        help="override a value of the base training config in every trial (repeatable)")
    parser.add_argument("--out", help="sweep folder (default sweeps/<name>-<time>)")
    parser.add_argument("--resume", action="store_true", help="continue the interrupted sweep in --out (finished trials are kept)")
    parser.add_argument("--ray-address", help="a running Ray cluster (HOST:PORT or auto); default: a local Ray on this machine")
    parser.add_argument("--num-cpus", type=int, help="local Ray: CPUs to use (default all)")


def main(args: argparse.Namespace) -> int:
    if args.resume and not args.out:
        raise UsageError("--resume", "needs --out SWEEP_DIR (the folder of the sweep to continue)")
    if args.ray_address:
        check_ray_address(args.ray_address)  # before the config's trials are built: seconds, not minutes
    spec_dict = load_spec_dict(args.config, args.set)
    spec = spec_mod.from_dict(spec_dict)
    out = Path(args.out) if args.out else default_out(spec.name)
    command = "bigbatch sweep " + " ".join([args.config] + [f"--set {o}" for o in args.set]
                                           + ([f"--ray-address {args.ray_address}"] if args.ray_address else []))
    return run_and_report(spec, spec_dict, out, args.resume, args.ray_address, args.num_cpus, command)


def run_and_report(spec: SweepSpec, spec_dict: dict[str, Any], out: Path, resume: bool, ray_address: str | None,
           num_cpus: int | None, resume_command: str) -> int:
    """Run the sweep, write the report, print the headline; the exit code."""
    t0 = time.perf_counter()
    try:
        analysis = run_sweep(spec, spec_dict, out, resume=resume, ray_address=ray_address, num_cpus=num_cpus)
    except Interrupted as e:
        print(f"interrupted: {e}; continue with: {resume_command} --out {out} --resume", file=sys.stderr)
        return 130
    report = folders.SweepFolder(out).report_html
    counts = analysis["trials"]
    print(f"sweep {spec.name}: {sum(counts.values())} trials ({', '.join(f'{v} {k}' for k, v in sorted(counts.items()))}) "
          f"in {time.perf_counter() - t0:.0f} s")
    for line in (axes_report.headline(analysis) if spec.axes else headline(analysis)):
        print(line)
    print(f"report: {report}")
    return 0 if counts.get("ok") else 1
