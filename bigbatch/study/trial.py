"""One trial of a sweep, inside a Ray worker: train one grid point and report its record.

Every trial is one ordinary training run (`bigbatch.trainer.loop.run`, the function the CLI and
SLURM jobs call) in SWEEP/runs/<trial>/. With `trial.workers_per_trial > 1` the trial starts a
Ray Train TorchTrainer whose workers each call `run`; `bigbatch.distributed.env.init` adopts the
gloo or NCCL process group Ray Train created. A trial whose folder holds a checkpoint resumes
from it. However a trial ends, it ends through its run's summary.json: a diverged trial (non-finite
loss) with status "diverged"; in an adaptive study (`search.adaptive`) a trial races
(`bigbatch.study.search`: a stop rule the loop consults) and ends as "slower" once clearly behind
its batch's best lr so far; a rerun of a raced seed (point "race": false) is never raced. Nothing is raised through Ray. A gap-phase trial trains to the training
criterion and ends with the train-mode sharpness. With trial.test_outputs the final network's
test-set softmax outputs are kept in its run folder (`save_test_outputs`, for the width report).
"""

from __future__ import annotations

import shutil
import time
from pathlib import Path
from typing import Any

import torch

from bigbatch import config as config_mod
from bigbatch import folders
from bigbatch.measure.modes import measuring
from bigbatch.measure.sharpness import HessianOperator
from bigbatch.measure.spectrum import count_outliers, top_eigenpairs, top_space_fraction
from bigbatch.study import search
from bigbatch.study import spec as spec_mod
from bigbatch.study.at_checkpoint import training_micro_batch
from bigbatch.study.records import eval_row, record_trial, trial_status
from bigbatch.trainer import checkpoint as ckpt
from bigbatch.trainer.data import build_data, tensor_batch
from bigbatch.trainer.loop import run as loop_run
from bigbatch.trainer.models import build_model
from bigbatch.trainer.objective import TrainingLoss


def _prepare_run_dir(run: folders.RunFolder) -> tuple[bool, dict[str, Any] | None]:
    """(resume?, finished summary) for a trial's run folder, from what an earlier attempt left."""
    summary = run.read_summary()
    if summary is not None:
        return False, summary
    if run.checkpoint.is_file():
        return True, None
    if run.path.is_dir():
        shutil.rmtree(run.path)  # a partial attempt without a checkpoint starts over
    return False, None


def _tune_reporter(row: dict[str, Any]) -> None:
    from ray import tune

    if eval_row(row):
        tune.report({k: v for k, v in row.items() if isinstance(v, (int, float)) and not isinstance(v, bool)})


SHARPNESS_ITERS, SHARPNESS_TOL = 30, 1e-2  # k = 1: 4-6 steps meet the 1 % residual here
SPECTRUM_EXTRA_K = 3  # k = classes + 3 by default: past the ~C outliers Sagun et al. expect
SPECTRUM_MAX_DEFAULT_K = 32  # ... at most: a byte-level LM's 256 "classes" would cost 259+ HVPs per gap trial
SPECTRUM_ITERS = 60  # a cap on the top-k Lanczos steps (k = classes + 3 met 1 % in 34 on the MNIST-1D CNN)


def train_mode_hessian(cfg, run_dir: Path, samples: int, micro_batch: int | None = None,
                       k: int | None = 1, top_space: bool = False) -> dict[str, Any] | None:
    """The Hessian of the training loss at the run's final weights: BatchNorm in train mode with
    micro-batch `micro_batch` (default the trial's own b; the loss is the mean over micro-batches
    of that many examples, each normalised by its own statistics), on the first max(`samples`, b)
    training examples, no augmentation. The gap phase passes one micro-batch for every batch
    size, so what it compares across batches is of one loss (with each trial's own b, the trend
    would mix eight losses). None for data not held in memory or `samples` = 0.

    Always `sharpness` (the top eigenvalue, Lanczos on HVPs stopped on a 1 % Ritz residual).
    With `top_space`, the top-k eigenpairs to the same residual (`measure.spectrum`), and:
    `top_eigenvalues`, `outliers` / `bulk_edge` / `outliers_saturated` (the gap rule,
    `count_outliers`), `grad_fraction_top_k` (|P_k g|^2 / |g|^2 of the same loss's gradient,
    Gur-Ari et al. 2018) and `grad_fraction_classes` (the top-C space, C = classes, if k >= C),
    `spectrum_k` (k None: classes + 3), `num_classes`, `spectrum_hvps`, `spectrum_s`: the cost.
    """
    bundle = build_data(cfg.data)
    if not bundle.in_memory or not samples:
        return None
    model = build_model(cfg.model, bundle.input_shape, bundle.num_classes)
    state = ckpt.load(folders.RunFolder(run_dir).checkpoint)
    model.load_state_dict(state["model"])
    b = micro_batch or training_micro_batch(cfg, state, len(bundle.train))[0]
    n = min(max(samples, b), len(bundle.train))
    x, y = tensor_batch(bundle.train, torch.arange(n), torch.device("cpu"), train=False)
    loss_fn = TrainingLoss(cfg.train.label_smoothing, cfg.train.ignore_index)
    t0 = time.perf_counter()
    with measuring(model, "train"):
        op = HessianOperator(model, loss_fn, x, y, micro_batch=min(b, n))
        k = min(k or min(bundle.num_classes + SPECTRUM_EXTRA_K, SPECTRUM_MAX_DEFAULT_K), op.num_params)
        iters = max(SPECTRUM_ITERS, k) if top_space else SHARPNESS_ITERS
        pairs = top_eigenpairs(op.hvp, op.num_params, k, iters, SHARPNESS_TOL, 0, op.dtype, op.device)
        grad = op.gradient() if top_space else None
    values = pairs.values.tolist()
    if grad is None:
        return {"sharpness": values[0]}
    outliers = count_outliers(values)
    classes = bundle.num_classes
    return {"sharpness": values[0], "top_eigenvalues": values, "spectrum_k": k, "num_classes": classes,
            "outliers": outliers.count, "bulk_edge": outliers.bulk_edge, "outliers_saturated": outliers.saturated,
            "grad_fraction_top_k": top_space_fraction(grad, pairs.vectors),
            "grad_fraction_classes": top_space_fraction(grad, pairs.vectors[:classes]) if k >= classes else None,
            "spectrum_lanczos_steps": pairs.steps, "spectrum_hvps": op.hvps, "spectrum_s": time.perf_counter() - t0}


def train_mode_sharpness(cfg, run_dir: Path, samples: int, micro_batch: int | None = None) -> float | None:
    """Top Hessian eigenvalue of the training loss at the run's final weights (`train_mode_hessian`)."""
    measured = train_mode_hessian(cfg, run_dir, samples, micro_batch)
    return None if measured is None else measured["sharpness"]


def save_test_outputs(cfg, run: folders.RunFolder, batch_size: int = 4096) -> dict[str, Any]:
    """The final network's softmax outputs on the whole test set, with the labels, in
    RUN/test_outputs.npz (float32, written whole then renamed): the width report averages them
    over the seeds' networks (an ensemble, Geiger et al. 2019) without a checkpoint or torch.
    Returns the record's fields: parameter count N, training examples and classes."""
    import numpy as np

    bundle = build_data(cfg.data)
    model = build_model(cfg.model, bundle.input_shape, bundle.num_classes)
    model.load_state_dict(ckpt.load(run.checkpoint)["model"])
    probs, labels = [], []
    with measuring(model, "eval"), torch.no_grad():
        for start in range(0, len(bundle.test), batch_size):
            x, y = tensor_batch(bundle.test, torch.arange(start, min(start + batch_size, len(bundle.test))),
                                torch.device("cpu"), train=False)
            probs.append(torch.softmax(model(x).float(), dim=-1))
            labels.append(y)
    tmp = run.test_outputs.with_name("test_outputs.tmp.npz")
    np.savez(tmp, probs=torch.cat(probs).numpy(), labels=torch.cat(labels).numpy())
    tmp.replace(run.test_outputs)
    return {"n_params": sum(p.numel() for p in model.parameters()), "n_train": len(bundle.train),
            "num_classes": bundle.num_classes, "test_outputs": str(run.test_outputs)}


def _ddp_worker(loop_config: dict[str, Any]) -> None:
    """One Ray Train worker: the same `run`; env.init adopts the process group Ray Train made.
    The race rule is read on rank 0 and agreed by the ranks (`bigbatch.trainer.stopper`)."""
    torch.set_num_threads(loop_config["torch_threads"])
    race = loop_config["race"]
    rule = search.racer(Path(race["out_dir"]), race["point"], race["factor"]) if race else None
    loop_run(config_mod.from_dict(loop_config["cfg"]), Path(loop_config["run_dir"]), resume=loop_config["resume"],
             stop_rule=rule)


def _ddp_trial(cfg_dict: dict[str, Any], run: folders.RunFolder, resume: bool, trial: spec_mod.TrialSpec,
               storage: Path, race: dict[str, Any] | None) -> dict[str, Any]:
    import ray.train
    from ray.train.torch import TorchTrainer

    resources = {"CPU": trial.cpus_per_worker}
    if trial.gpus_per_worker:
        resources["GPU"] = trial.gpus_per_worker
    trainer = TorchTrainer(
        _ddp_worker,
        train_loop_config={"cfg": cfg_dict, "run_dir": str(run.path), "resume": resume,
                           "torch_threads": trial.torch_threads, "race": race},
        scaling_config=ray.train.ScalingConfig(num_workers=trial.workers_per_trial, use_gpu=trial.gpus_per_worker > 0,
                                               resources_per_worker=resources),
        run_config=ray.train.RunConfig(name=run.path.name, storage_path=str(storage),
                                       failure_config=ray.train.FailureConfig(max_failures=0)),
    )
    trainer.fit()
    return run.read_summary()


def trial_target(spec: spec_mod.SweepSpec, point: dict[str, Any]) -> dict[str, float]:
    """The metric and value a trial's steps-to-target are counted to."""
    if point.get("phase") == "gap":
        return {"train_acc": spec.gap.train_acc}
    return {k: v for k, v in vars(spec.target).items() if v is not None}


def gap_criterion(spec: spec_mod.SweepSpec) -> str:
    g = spec.gap
    on = f"the first {g.train_samples} training examples" if g.train_samples else "the training set"
    return f"train_acc >= {g.train_acc:g} on {on} (cap {g.max_epochs:g} epochs)"


def gap_hessian(gap: spec_mod.GapSpec, cfg, run_dir: Path, micro_batch: int) -> dict[str, Any]:
    """A gap trial's Hessian at `micro_batch` (one for every gap batch): the sharpness and, unless
    gap.spectrum_k = 0, the top-k outliers and the gradient's share of their space (k: gap.spectrum_k,
    default classes + 3)."""
    k = gap.spectrum_k
    measured = train_mode_hessian(cfg, run_dir, gap.sharpness_samples, micro_batch, k=1 if k == 0 else k, top_space=k != 0)
    return measured or {"sharpness": None}


def run_trial(params: dict[str, Any], *, spec_dict: dict[str, Any], out_dir: str) -> None:
    """The Ray Tune function trainable: train one grid point and report its record."""
    point = params["point"]
    from ray import tune

    spec = spec_mod.from_dict(spec_dict, validate_trials=False)  # the driver checked every trial's config
    torch.set_num_threads(spec.trial.torch_threads)
    run = folders.SweepFolder(out_dir).run(spec.trial_name(point))
    if (rec := run.read_trial_record()) is not None:  # finished in an earlier attempt (resume)
        tune.report(_numeric(rec) | {"done": True})
        return
    cfg = spec.trial_config(point)
    target = trial_target(spec, point)
    gap = point.get("phase") == "gap"
    extra: dict[str, Any] = {"criterion": gap_criterion(spec)} if gap else {}
    resume, summary = _prepare_run_dir(run)
    if summary is None:
        cfg_dict = config_mod.to_dict(cfg)
        races = spec.search.adaptive and bool(spec.search.race) and not gap and point.get("race") is not False
        race = {"out_dir": out_dir, "point": point, "factor": spec.search.race} if races else None
        if spec.trial.workers_per_trial > 1:
            summary = _ddp_trial(cfg_dict, run, resume, spec.trial, Path(out_dir) / "train", race)
        else:
            rule = search.racer(Path(out_dir), point, spec.search.race) if race else None
            summary = loop_run(config_mod.from_dict(cfg_dict), run.path, resume=resume, reporter=_tune_reporter,
                               stop_rule=rule)
    status = trial_status(summary)
    if status == "slower":  # raced: its steps are a lower bound on the steps to target
        stop = summary.get("stopped_by") or {}
        extra |= {"steps_lower_bound": stop.get("steps_lower_bound"), "raced_against": stop.get("raced_against"),
                  "raced_against_lr": stop.get("raced_against_lr")}
    # B_simple / B_noise at the target: measured after the sweep, on the trials read (at_target)
    if gap and status not in ("diverged", "slower"):
        fixed = min(spec.gap.batch_sizes)  # one BatchNorm micro-batch for every gap batch: one loss
        extra |= gap_hessian(spec.gap, cfg, run.path, fixed)
        extra |= {"sharpness_micro_batch": fixed, "sharpness_mode": "train",
                  "sharpness_own_b": train_mode_sharpness(cfg, run.path, spec.gap.sharpness_samples)}
    if spec.trial.test_outputs and status != "diverged":
        extra |= save_test_outputs(cfg, run)
    rec = record_trial(run.path, point, spec.trial.gap_epochs, summary, status, target=target, extra=extra)
    if spec.search.adaptive and not gap:
        search.record_finish(Path(out_dir), point, rec)
    tune.report(_numeric(rec) | {"done": True})


def _numeric(rec: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in rec.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}
