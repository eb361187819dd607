"""One trial of a sweep, inside a Ray worker: train one grid point and report its record.

Every trial is one ordinary training run (`bigbatch.trainer.loop.run`, the function the CLI and
SLURM jobs call) in SWEEP/runs/<trial>/. With `trial.workers_per_trial > 1` the trial starts a
Ray Train TorchTrainer whose workers each call `run`; `bigbatch.distributed.env.init` adopts the
gloo or NCCL process group Ray Train created. A diverged trial (non-finite loss) is stopped and
recorded as diverged; a trial whose folder holds a checkpoint resumes from it. In an adaptive
study (`search.adaptive`) a trial also races (`bigbatch.study.search`): stopped as `slower` once
clearly behind its batch's best. A gap-phase trial trains to the training criterion and ends with
the train-mode sharpness.
"""

from __future__ import annotations

import json
import math
import shutil
import sys
from pathlib import Path
from typing import Any, Callable

import torch
from torch import nn

from bigbatch import config as config_mod
from bigbatch.measure.modes import measuring
from bigbatch.measure.sharpness import HessianOperator
from bigbatch.study import search
from bigbatch.study import spec as spec_mod
from bigbatch.study.at_checkpoint import training_micro_batch
from bigbatch.study.records import RUNS_DIR, TRIAL_RECORD, eval_row, record_trial, trial_status
from bigbatch.trainer import checkpoint as ckpt
from bigbatch.trainer.data import build_data, tensor_batch
from bigbatch.trainer.loop import run
from bigbatch.trainer.models import build_model


class Diverged(Exception):
    """The training loss became non-finite: the trial stops and is recorded as diverged."""


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


def _tune_reporter(row: dict[str, Any]) -> None:
    from ray import tune

    if "loss" in row and (row["loss"] is None or not math.isfinite(row["loss"])):
        raise Diverged(f"non-finite training loss at step {row.get('step')}")
    if eval_row(row):
        tune.report({k: v for k, v in row.items() if isinstance(v, (int, float)) and not isinstance(v, bool)})


def _single_process_trial(cfg_dict: dict[str, Any], run_dir: Path, resume: bool,
                          race: Callable[[dict[str, Any]], None] | None = None) -> dict[str, Any]:
    def report(row: dict[str, Any]) -> None:
        _tune_reporter(row)
        if race is not None:
            race(row)

    return run(config_mod.from_dict(cfg_dict), run_dir, resume=resume, reporter=report)


def train_mode_sharpness(cfg, run_dir: Path, samples: int) -> float | None:
    """Top Hessian eigenvalue of the training loss at the run's final weights: BatchNorm in train
    mode with the trial's micro-batch b (the loss is the mean over micro-batches of b examples,
    each normalised by its own statistics, as SGD saw it), Lanczos on HVPs (`measure.sharpness`);
    the first max(`samples`, b) training examples, no augmentation."""
    bundle = build_data(cfg.data)
    if not bundle.in_memory or not samples:
        return None
    model = build_model(cfg.model, bundle.input_shape, bundle.num_classes)
    state = ckpt.load(run_dir / ckpt.FILENAME)
    model.load_state_dict(state["model"])
    b, _, _ = training_micro_batch(cfg, state, len(bundle.train))
    n = min(max(samples, b), len(bundle.train))
    x, y = tensor_batch(bundle.train, torch.arange(n), torch.device("cpu"), train=False)
    loss_fn = nn.CrossEntropyLoss(label_smoothing=cfg.train.label_smoothing)
    with measuring(model, "train"):
        return HessianOperator(model, loss_fn, x, y, micro_batch=min(b, n)).top_eigs(k=1, iters=30)[0]


def _ddp_worker(loop_config: dict[str, Any]) -> None:
    """One Ray Train worker: the same `run`; env.init adopts the process group Ray Train made."""
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


def trial_target(spec: spec_mod.SweepSpec, point: dict[str, Any]) -> dict[str, float]:
    """The metric and value a trial's steps-to-target are counted to."""
    if point.get("phase") == "gap":
        return {"train_acc": spec.gap.train_acc}
    return {k: v for k, v in vars(spec.target).items() if v is not None}


def gap_criterion(spec: spec_mod.SweepSpec) -> str:
    g = spec.gap
    on = f"the first {g.train_samples} training examples" if g.train_samples else "the training set"
    return f"train_acc >= {g.train_acc:g} on {on} (cap {g.max_epochs:g} epochs)"


def run_trial(params: dict[str, Any], *, spec_dict: dict[str, Any], out_dir: str) -> None:
    """The Ray Tune function trainable: train one grid point and report its record."""
    point = params["point"]
    from ray import tune

    spec = spec_mod.from_dict(spec_dict, validate_trials=False)  # the driver checked every trial's config
    torch.set_num_threads(spec.trial.torch_threads)
    run_dir = Path(out_dir) / RUNS_DIR / spec.trial_name(point)
    if (run_dir / TRIAL_RECORD).is_file():  # finished in an earlier attempt (resume)
        tune.report(_numeric(json.loads((run_dir / TRIAL_RECORD).read_text())) | {"done": True})
        return
    cfg = spec.trial_config(point)
    target = trial_target(spec, point)
    gap = point.get("phase") == "gap"
    extra: dict[str, Any] = {"criterion": gap_criterion(spec)} if gap else {}
    resume, summary = _prepare_run_dir(run_dir)
    if summary is None:
        cfg_dict = config_mod.to_dict(cfg)
        race = search.racer(Path(out_dir), point, spec.search.race) if spec.search.adaptive else None
        try:
            if spec.trial.workers_per_trial > 1:
                summary = _ddp_trial(cfg_dict, run_dir, resume, spec.trial, Path(out_dir) / "train")
            else:
                summary = _single_process_trial(cfg_dict, run_dir, resume, race)
        except (Diverged, search.Slower) as e:
            _close_wandb()
            slower = isinstance(e, search.Slower)
            if slower:
                extra |= {"steps_lower_bound": e.step, "raced_against": e.best}
            rec = record_trial(run_dir, point, spec.trial.gap_epochs, None, "slower" if slower else "diverged",
                               target=target, extra=extra)
            tune.report(_numeric(rec) | {"done": True})
            return
    # B_simple / B_noise at the target: measured after the sweep, on the trials read (at_target)
    if gap and summary.get("status") != "diverged":
        extra |= {"sharpness": train_mode_sharpness(cfg, run_dir, spec.gap.sharpness_samples), "sharpness_mode": "train"}
    rec = record_trial(run_dir, point, spec.trial.gap_epochs, summary, trial_status(summary),
                       target=target, extra=extra)
    if spec.search.adaptive and rec["status"] == "ok" and not gap:
        search.record_finish(Path(out_dir), point, rec["steps_to_target"])
    tune.report(_numeric(rec) | {"done": True})


def _close_wandb() -> None:
    """A run stopped by an exception leaves its W&B run open; close it as failed."""
    if "wandb" in sys.modules:
        import wandb

        if wandb.run is not None:
            wandb.finish(exit_code=1)


def _numeric(rec: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in rec.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}
