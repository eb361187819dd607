"""The noise scales at the target, measured once the sweep has finished, on the trials they are
read from.

The headline's B_simple and B_noise at the target are medians over the best learning rate of
every batch size (`critical.b_simple_at_target`). Measuring every trial that reached the target
spent most of the measurement on trials that are not read (other learning rates, other seeds),
and a measurement at a large batch costs as much as a large part of its trial (K >= 32 micro-batch
gradients of b examples each). So the sweep measures after its last trial: per batch size, the
best learning rate's lowest seed that reached the target, one `bigbatch measure` each (BatchNorm in
train mode at one fixed micro-batch for every batch size, the smallest batch measured, so the
values compared across batches are of one loss; B_simple at the trial's own micro-batch b is kept
as a second column, own_b), at the final checkpoint, which is the state at the target since
trials stop there, in parallel worker processes, largest batch first. Each value carries its
standard error and interval; a failed estimate is a lower bound with its reason (measure.train_mode). The values go
into the trial's trial.json, so trials.jsonl and a refit (`bigbatch report`) see them; a resumed
sweep measures only what is still missing.
"""

from __future__ import annotations

import multiprocessing
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Any

import torch

from bigbatch import config as config_mod
from bigbatch import folders
from bigbatch.distributed.env import usable_cpus
from bigbatch.errors import UsageError
from bigbatch.study import critical
from bigbatch.study.at_checkpoint import measure_checkpoint
from bigbatch.study.records import set_measured


HESSIAN_SAMPLES = 64  # HVPs for B_noise per trial (4 per jackknife group), each ~3 gradients' cost
BUDGET_S = 10.0  # seconds of gradients per measurement (K stops growing there): the study's default stays in budget


def chosen_trials(records: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Per batch size, the best lr's lowest seed that reached the target (critical phase only),
    skipping trials already measured; largest batch first (the slowest measurement starts first)."""
    best = critical.best_per_batch([r for r in records if critical.phase_of(r) == "critical"])
    chosen = []
    for batch in sorted(best, reverse=True):
        reached = [t for t in best[batch]["trials"] if t.get("run_dir")]
        if not reached:
            continue
        first = min(reached, key=lambda t: t["seed"])
        if first.get("b_simple_source") != "train_mode":
            chosen.append(first)
    return chosen


def _measure(run_dir: str, samples: int, threads: int, micro_batch: int | None = None) -> dict[str, Any] | None:
    """In a worker process: `bigbatch measure` of one trial's final checkpoint (None when its data
    is not held in memory), at BatchNorm micro-batch `micro_batch` (one value for every batch
    size of the sweep, so the values compared across batches are of one loss) and, as a second
    column, B_simple at the trial's own micro-batch b (`own_b`)."""
    torch.set_num_threads(threads)
    cfg = config_mod.load(folders.RunFolder(run_dir).config)
    try:
        fixed = measure_checkpoint(cfg, Path(run_dir), samples=lambda b: max(32, min(256, samples // b)),
                                   hessian_examples=lambda b: max(512, b), sharpness=False, micro_batch=micro_batch,
                                   hessian_samples=HESSIAN_SAMPLES, budget_s=BUDGET_S)
        own = fixed if micro_batch is None or micro_batch == fixed["train_micro_batch"] else measure_checkpoint(
            cfg, Path(run_dir), samples=lambda b: max(32, min(256, samples // b)), hessian_examples=0, sharpness=False,
            budget_s=BUDGET_S / 2)
    except UsageError:
        return None
    fixed["own_b"] = {k: own.get(k) for k in ("micro_batch", "b_simple", "b_simple_interval", "b_simple_lower_bound")}
    return fixed


def measure_at_target(records: list[dict[str, Any]], samples: int, threads: int = 1,
                      workers: int | None = None) -> int:
    """Measure the chosen trials (see the module docstring) and write the values into their
    trial.json; returns how many were measured. `samples`: trial.b_simple_samples (0 = off)."""
    chosen = chosen_trials(records) if samples else []
    if not chosen:
        return 0
    workers = max(1, min(len(chosen), workers or usable_cpus() // max(1, threads)))
    with ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn")) as pool:
        # the fixed BatchNorm micro-batch: the smallest batch measured (every trial can be measured at it)
        micro_batch = min(t["batch"] for t in chosen)
        futures = [(t, pool.submit(_measure, t["run_dir"], samples, threads, micro_batch)) for t in chosen]
        measured = 0
        for trial, future in futures:
            m = future.result()
            if m is None:
                continue
            run = folders.RunFolder(trial["run_dir"])
            run.write_trial_record(set_measured(run.read_trial_record(), m))
            measured += 1
    return measured
