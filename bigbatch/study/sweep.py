"""`bigbatch sweep CONFIG`: a Ray Tune sweep over global batch size x learning rate.

Every trial is one ordinary training run (`bigbatch.trainer.loop.run`, the function the CLI and
SLURM jobs call) in SWEEP/runs/<trial>/, trained to the target or to its budget. Evaluation rows
are reported to Ray Tune as they come. With `trial.workers_per_trial > 1` the trial starts a Ray
Train TorchTrainer whose workers each call `run`; `bigbatch.distributed.env.init` adopts the gloo
or NCCL process group Ray Train created.

A trial that raises is recorded as failed and the others go on; a diverged trial (non-finite
loss) is stopped and recorded as diverged. An interrupted sweep continues with `--resume`
(Tuner.restore): finished trials are not run again, an unfinished one restarts from its last
checkpoint when it has one.

Output folder:
    sweep.toml        the sweep config as given
    runs/<trial>/     each trial's run folder (config.toml, metrics.jsonl, summary.json, ...)
    tune/             Ray Tune's experiment state (what --resume restores)
    trials.jsonl      one line per trial (see `trial_record`)
    critical.json     the critical-batch-size fit and gap table (`bigbatch.study.critical.analyse`)
    report.md, report.html, *.png   (`bigbatch.study.report`)
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import socket
import sys
import time
from datetime import datetime
from pathlib import Path
from typing import Any

from bigbatch.errors import UsageError
from bigbatch.study import spec as spec_mod
from bigbatch.study.spec import SweepSpec

TRIAL_RECORD = "trial.json"  # written by the trial into its run folder
TRIALS = "trials.jsonl"
CRITICAL = "critical.json"
TUNE_DIR = "tune"
RUNS_DIR = "runs"


class Interrupted(Exception):
    """The sweep was stopped (Ctrl-C / SIGINT) before every trial finished; Ray Tune saved its state."""


class Diverged(Exception):
    """The training loss became non-finite: the trial stops and is recorded as diverged."""


# --- the trial: runs inside a Ray worker ---------------------------------------------------


def _eval_row(row: dict[str, Any]) -> bool:
    return row.get("test_acc") is not None or row.get("test_loss") is not None


def trial_record(point: dict[str, Any], summary: dict[str, Any] | None, rows: list[dict[str, Any]],
                 gap_epochs: float | None, status: str, error: str | None = None,
                 b_simple_exact: float | None = None) -> dict[str, Any]:
    """One line of trials.jsonl from a trial's summary.json and metrics.jsonl rows."""
    s = summary or {}
    evals = [r for r in rows if _eval_row(r)]
    last = evals[-1] if evals else {}

    def value(key: str) -> Any:
        return s.get(key) if s.get(key) is not None else last.get(key)

    rec: dict[str, Any] = {
        "batch": point["batch"], "lr_multiplier": point["lr_multiplier"], "seed": point["seed"],
        "lr": s.get("peak_lr"), "status": status,
        "steps_to_target": s.get("steps_to_target"), "examples_to_target": s.get("examples_to_target"),
        "steps": s.get("steps", rows[-1].get("step") if rows else None),
        "epochs": s.get("epochs", rows[-1].get("epoch") if rows else None),
        "train_loss": value("train_loss"), "test_loss": value("test_loss"),
        "train_acc": value("train_acc"), "test_acc": value("test_acc"),
        "world_size": s.get("world_size"), "wall_s": s.get("wall_s"), "error": error,
    }
    rec["gap"] = _diff(rec["train_acc"], rec["test_acc"])
    rec["loss_gap"] = _diff(rec["test_loss"], rec["train_loss"])
    budget = None
    if gap_epochs is not None:
        within = [r for r in evals if r.get("epoch") is not None and r["epoch"] <= gap_epochs * (1 + 1e-9)]
        # The budget row is only meaningful if the trial actually trained up to the budget.
        if within and (rec["epochs"] or 0) >= gap_epochs * (1 - 1e-9):
            budget = within[-1]
    for k in ("train_acc", "test_acc"):
        rec[f"{k}_at_budget"] = budget.get(k) if budget else None
    rec["gap_at_budget"] = _diff(rec["train_acc_at_budget"], rec["test_acc_at_budget"])
    rec["loss_gap_at_budget"] = _diff(budget.get("test_loss"), budget.get("train_loss")) if budget else None
    # B_simple (measure.gns) nearest the target: the last value logged up to steps_to_target.
    upto = rec["steps_to_target"] if rec["steps_to_target"] is not None else math.inf
    b_simple = [r["gns/b_simple"] for r in rows if r.get("gns/b_simple") is not None and r.get("step", 0) <= upto]
    # The per-example value at the target weights is exact; the online EMA (measure.gns) lags and
    # is noisy, so it is the fallback and is kept beside it.
    rec["b_simple_online_at_target"] = b_simple[-1] if b_simple and rec["steps_to_target"] is not None else None
    rec["b_simple_at_target"] = b_simple_exact if b_simple_exact is not None else rec["b_simple_online_at_target"]
    rec["b_simple_source"] = "per_example" if b_simple_exact is not None else ("online" if b_simple else None)
    sharp = [r["sharpness/top"] for r in rows if r.get("sharpness/top") is not None]
    rec["sharpness"] = sharp[-1] if sharp else None
    return rec


def _diff(a: Any, b: Any) -> float | None:
    return None if a is None or b is None else float(a) - float(b)


def read_rows(path: Path) -> list[dict[str, Any]]:
    rows = []
    if path.exists():
        for line in path.read_text().splitlines():
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError:
                break  # a torn last line
    return rows


def trial_status(summary: dict[str, Any]) -> str:
    """A finished trial's status from its run's summary.json."""
    if summary.get("status") == "diverged":
        return "diverged"
    return "ok" if summary.get("steps_to_target") is not None else "not_reached"


def finish_trial(run_dir: Path, point: dict[str, Any], gap_epochs: float | None, summary: dict[str, Any] | None,
                  status: str, b_simple_exact: float | None = None) -> dict[str, Any]:
    rec = trial_record(point, summary, read_rows(run_dir / "metrics.jsonl"), gap_epochs, status,
                       b_simple_exact=b_simple_exact)
    rec["run_dir"] = str(run_dir)
    tmp = run_dir / (TRIAL_RECORD + ".tmp")
    tmp.write_text(json.dumps(rec) + "\n")
    os.replace(tmp, run_dir / TRIAL_RECORD)
    return rec


def _prepare_run_dir(run_dir: Path) -> tuple[bool, dict[str, Any] | None]:
    """(resume?, finished summary) for a trial's run folder, from what an earlier attempt left."""
    summary_path = run_dir / "summary.json"
    if summary_path.is_file():
        return False, json.loads(summary_path.read_text())
    if (run_dir / "checkpoint.pt").is_file():
        return True, None
    if run_dir.is_dir():
        shutil.rmtree(run_dir)  # a partial attempt without a checkpoint starts over
    return False, None


def exact_b_simple(cfg, run_dir: Path, samples: int) -> float | None:
    """B_simple = tr(Sigma)/|G|^2 from per-example gradients at the run's final weights.

    With train.stop_at_target the final checkpoint is the state at the target, which is where
    McCandlish et al. 2018 compare B_noise with B_crit. Used when the run did not log the online
    estimate (measure.gns); None for data that is not held in memory.

    |mean of n per-example gradients|^2 over-estimates |G|^2 by tr(Sigma)/n, which near a
    target (small |G|) is a large fraction of it: subtract it (McCandlish et al. 2018, A.1).
    """
    import torch
    from torch import nn

    from bigbatch.measure.noise import per_sample_stats
    from bigbatch.trainer import checkpoint as ckpt
    from bigbatch.trainer.data import build_data, tensor_batch
    from bigbatch.trainer.models import build_model

    bundle = build_data(cfg.data)
    if not bundle.in_memory:
        return None
    model = build_model(cfg.model, bundle.input_shape, bundle.num_classes)
    model.load_state_dict(ckpt.load(run_dir / ckpt.FILENAME)["model"])
    model.eval()
    idx = torch.randperm(len(bundle.train), generator=torch.Generator().manual_seed(0))[:samples]
    x, y = tensor_batch(bundle.train, idx, torch.device("cpu"), train=False)
    grad_sq, trace_sigma = per_sample_stats(model, nn.CrossEntropyLoss(label_smoothing=cfg.train.label_smoothing), x, y)
    grad_sq_unbiased = grad_sq - trace_sigma / len(idx)
    return trace_sigma / grad_sq_unbiased if grad_sq_unbiased > 0 else None


def _tune_reporter(row: dict[str, Any]) -> None:
    from ray import tune

    if "loss" in row and (row["loss"] is None or not math.isfinite(row["loss"])):
        raise Diverged(f"non-finite training loss at step {row.get('step')}")
    if _eval_row(row):
        tune.report({k: v for k, v in row.items() if isinstance(v, (int, float)) and not isinstance(v, bool)})


def _single_process_trial(cfg_dict: dict[str, Any], run_dir: Path, resume: bool) -> dict[str, Any]:
    from bigbatch import config as config_mod
    from bigbatch.trainer.loop import run

    return run(config_mod.from_dict(cfg_dict), run_dir, resume=resume, reporter=_tune_reporter)


def _ddp_worker(loop_config: dict[str, Any]) -> None:
    """One Ray Train worker: the same `run`; env.init adopts the process group Ray Train made."""
    import torch

    from bigbatch import config as config_mod
    from bigbatch.trainer.loop import run

    torch.set_num_threads(loop_config["torch_threads"])

    def check(row: dict[str, Any]) -> None:  # rank 0 only: ray.train.report would need every rank
        if "loss" in row and (row["loss"] is None or not math.isfinite(row["loss"])):
            raise Diverged(f"non-finite training loss at step {row.get('step')}")

    run(config_mod.from_dict(loop_config["cfg"]), Path(loop_config["run_dir"]), resume=loop_config["resume"],
        reporter=check)


def _ddp_trial(cfg_dict: dict[str, Any], run_dir: Path, resume: bool, trial: spec_mod.TrialSpec,
               storage: Path) -> dict[str, Any]:
    import ray.train
    from ray.train.torch import TorchTrainer

    resources = {"CPU": trial.cpus_per_worker}
    if trial.gpus_per_worker:
        resources["GPU"] = trial.gpus_per_worker
    trainer = TorchTrainer(
        _ddp_worker,
        train_loop_config={"cfg": cfg_dict, "run_dir": str(run_dir), "resume": resume,
                           "torch_threads": trial.torch_threads},
        scaling_config=ray.train.ScalingConfig(num_workers=trial.workers_per_trial, use_gpu=trial.gpus_per_worker > 0,
                                               resources_per_worker=resources),
        run_config=ray.train.RunConfig(name=run_dir.name, storage_path=str(storage),
                                       failure_config=ray.train.FailureConfig(max_failures=0)),
    )
    try:
        trainer.fit()
    except Exception as e:  # Ray wraps the worker's exception; a divergence is not a failure
        if "Diverged" in f"{type(e).__name__}: {e}":
            raise Diverged(str(e).splitlines()[0]) from None
        raise
    return json.loads((run_dir / "summary.json").read_text())


def run_trial(params: dict[str, Any], *, spec_dict: dict[str, Any], out_dir: str) -> None:
    """The Ray Tune function trainable: train one grid point and report its record."""
    point = params["point"]
    import torch
    from ray import tune

    from bigbatch import config as config_mod

    spec = spec_mod.from_dict(spec_dict)
    torch.set_num_threads(spec.trial.torch_threads)
    run_dir = Path(out_dir) / RUNS_DIR / spec.trial_name(point)
    cfg = spec.trial_config(point)
    resume, summary = _prepare_run_dir(run_dir)
    if summary is None:
        cfg_dict = config_mod.to_dict(cfg)
        try:
            if spec.trial.workers_per_trial > 1:
                summary = _ddp_trial(cfg_dict, run_dir, resume, spec.trial, Path(out_dir) / "train")
            else:
                summary = _single_process_trial(cfg_dict, run_dir, resume)
        except Diverged:
            _close_wandb()
            rec = finish_trial(run_dir, point, spec.trial.gap_epochs, None, "diverged")
            tune.report(_numeric(rec) | {"done": True})
            return
    exact = None
    if spec.trial.b_simple_samples and summary.get("status") == "target_reached":
        exact = exact_b_simple(cfg, run_dir, spec.trial.b_simple_samples)
    rec = finish_trial(run_dir, point, spec.trial.gap_epochs, summary, trial_status(summary), exact)
    tune.report(_numeric(rec) | {"done": True})


def _close_wandb() -> None:
    """A run stopped by an exception leaves its W&B run open; close it as failed."""
    if "wandb" in sys.modules:
        import wandb

        if wandb.run is not None:
            wandb.finish(exit_code=1)


def _numeric(rec: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in rec.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}


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
        ray.init(num_cpus=num_cpus or os.cpu_count() or 1, include_dashboard=False, log_to_driver=False,
                 runtime_env={"env_vars": env_vars})


def _progress_callback(spec: SweepSpec, total: int):
    from ray import tune

    class Progress(tune.Callback):
        """One line per finished trial on the driver's stdout."""

        def __init__(self) -> None:
            self.done = 0

        def _line(self, trial, text: str) -> None:
            self.done += 1
            print(f"[{self.done}/{total}] {spec.trial_name(trial.config['point'])}: {text}", flush=True)

        def on_trial_complete(self, iteration, trials, trial, **info):
            r = trial.last_result or {}
            s = r.get("steps_to_target")
            text = f"{int(s)} steps to target" if s is not None else "target not reached"
            if r.get("test_acc") is not None:
                text += f", test_acc {r['test_acc']:.4f}"
            self._line(trial, text)

        def on_trial_error(self, iteration, trials, trial, **info):
            self._line(trial, "FAILED")

    return Progress()


def run_sweep(spec: SweepSpec, spec_dict: dict[str, Any], out_dir: Path, *, resume: bool = False,
              ray_address: str | None = None, num_cpus: int | None = None, quiet: bool = False) -> dict[str, Any]:
    """Run (or resume) the sweep into `out_dir`; returns the critical-batch analysis."""
    import ray
    from ray import tune

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
    (out_dir / "sweep.json").write_text(json.dumps(spec_dict, indent=2) + "\n")

    owns_ray = not ray.is_initialized()  # a caller's Ray session (a notebook, a test) is used as it is
    if owns_ray:
        init_ray(ray_address, num_cpus)
    try:
        t = spec.trial
        resources = {"cpu": t.cpus_per_worker, "gpu": t.gpus_per_worker}
        if t.workers_per_trial > 1:
            # The trial itself only starts the TorchTrainer; its workers hold the real resources.
            resources = {"cpu": 0.01}
        trainable = tune.with_resources(
            tune.with_parameters(run_trial, spec_dict=spec_dict, out_dir=str(out_dir)), resources)
        points = spec.points()
        callbacks = [] if quiet else [_progress_callback(spec, len(points))]
        if resume:
            tuner = tune.Tuner.restore(str(tune_dir), trainable, resume_unfinished=True, resume_errored=False)
        else:
            tuner = tune.Tuner(
                trainable,
                param_space={"point": tune.grid_search(points)},
                tune_config=tune.TuneConfig(max_concurrent_trials=t.max_concurrent or None, reuse_actors=True,
                                            trial_name_creator=lambda tr: spec.trial_name(tr.config["point"]),
                                            trial_dirname_creator=lambda tr: spec.trial_name(tr.config["point"])),
                run_config=tune.RunConfig(name=TUNE_DIR, storage_path=str(out_dir), verbose=0, callbacks=callbacks,
                                          failure_config=tune.FailureConfig(max_failures=0)),
            )
        results = tuner.fit()
        errors = {spec.trial_name(r.config["point"]): r.error for r in results if r.error is not None}
    finally:
        if owns_ray:
            ray.shutdown()
    unfinished = [spec.trial_name(p) for p in points
                  if spec.trial_name(p) not in errors and not (out_dir / RUNS_DIR / spec.trial_name(p) / TRIAL_RECORD).is_file()]
    if unfinished:  # Tune returns normally after SIGINT, with the state saved for Tuner.restore
        raise Interrupted(f"{len(points) - len(unfinished)} of {len(points)} trials finished")
    return collect(spec, out_dir, errors)


def collect(spec: SweepSpec, out_dir: Path, errors: dict[str, BaseException] | None = None) -> dict[str, Any]:
    """trials.jsonl and critical.json from the run folders (a trial without a record failed)."""
    from bigbatch.study import critical

    errors = errors or {}
    records = []
    for point in spec.points():
        name = spec.trial_name(point)
        path = out_dir / RUNS_DIR / name / TRIAL_RECORD
        if path.is_file() and name not in errors:
            rec = json.loads(path.read_text())
        else:
            err = errors.get(name)
            message = _first_line(err) if err is not None else "no result (the trial did not finish)"
            rec = trial_record(point, None, read_rows(out_dir / RUNS_DIR / name / "metrics.jsonl")
                               if (out_dir / RUNS_DIR / name).is_dir() else [], spec.trial.gap_epochs,
                               "failed", message)
        rec["trial"] = name
        records.append(rec)
    (out_dir / TRIALS).write_text("".join(json.dumps(r) + "\n" for r in records))
    analysis = critical.analyse(records)
    analysis["sweep"] = spec.name
    analysis["target"] = {k: v for k, v in vars(spec.target).items() if v is not None}
    (out_dir / CRITICAL).write_text(json.dumps(analysis, indent=2, allow_nan=False) + "\n")
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


def headline(analysis: dict[str, Any]) -> list[str]:
    """The numbers a study ends with, one per line."""
    from bigbatch.study.report import fmt

    lines = [
        f"B_crit = {fmt(analysis['b_crit'])}   S_min = {fmt(analysis['s_min'])} steps   "
        f"E_min = {fmt(analysis['e_min'])} examples   (fit r2 = {fmt(analysis['r2'], 3)})",
        f"B_simple at target = {fmt(analysis['b_simple_at_target'])}"
        + (f"   B_crit / B_simple = {fmt(analysis['b_crit_over_b_simple'], 2)}"
           if analysis.get("b_crit_over_b_simple") is not None else "")
        + (f"   (online EMA at target: {fmt(analysis['b_simple_online_at_target'])})"
           if analysis.get("b_simple_online_at_target") is not None else ""),
    ]
    trend = analysis.get("gap_trend_per_doubling")
    if trend is not None:
        lines.append(f"train-test accuracy gap at target: {100 * trend:+.2f} points per doubling of the batch")
    trend_b = analysis.get("gap_at_budget_trend_per_doubling")
    if trend_b is not None:
        lines.append(f"train-test accuracy gap at the epoch budget: {100 * trend_b:+.2f} points per doubling")
    if analysis.get("note"):
        lines.append(f"note: {analysis['note']}")
    return lines


def default_out(name: str) -> Path:
    return Path("sweeps") / f"{name}-{datetime.now().strftime('%Y%m%d-%H%M%S')}"


def load_spec_dict(path: str, overrides: list[str] = ()) -> dict[str, Any]:
    """The sweep config as a self-contained dict (the base config read in), for the trials."""
    from bigbatch import config as config_mod

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
    return finish(spec, spec_dict, out, args.resume, args.ray_address, args.num_cpus, command)


def finish(spec: SweepSpec, spec_dict: dict[str, Any], out: Path, resume: bool, ray_address: str | None,
           num_cpus: int | None, resume_command: str) -> int:
    """Run the sweep, write the report, print the headline; the exit code."""
    from bigbatch.study.report import write_report

    t0 = time.perf_counter()
    try:
        analysis = run_sweep(spec, spec_dict, out, resume=resume, ray_address=ray_address, num_cpus=num_cpus)
    except Interrupted as e:
        print(f"interrupted: {e}; continue with: {resume_command} --out {out} --resume", file=sys.stderr)
        return 130
    report = write_report(out)
    counts = analysis["trials"]
    print(f"sweep {spec.name}: {sum(counts.values())} trials ({', '.join(f'{v} {k}' for k, v in sorted(counts.items()))}) "
          f"in {time.perf_counter() - t0:.0f} s")
    for line in headline(analysis):
        print(line)
    print(f"report: {report}")
    return 0 if counts.get("ok") else 1
