"""`bigbatch study`: the main job with an embedded default sweep.

A critical-batch-size study of the MNIST-1D CNN on this CPU (no download): 8 global batch sizes
from 16 to 2048, each trained to 95 % test accuracy at its own best lr with 3 seeds, the fit
S(B) = S_min (1 + B_crit / B) with 95 % bootstrap intervals, B_simple at the target, and a gap
phase (Keskar et al. 2016) at 5 batch sizes, ending in a report with plots. Sized for <= 300 s on
2 cores: constant lr (the schedule does not depend on the step budget), one torch thread per
trial, two trials at a time, and an adaptive plan (`bigbatch.study.adaptive`) instead of the
full grid: seed 0 on 3 lr multipliers (1x first), racing (a trial at 1.5x the steps of its
batch's best finished trial stops as `slower`), the grid extended at an edge that is best, then
seeds 1 and 2 at the best lr and at its neighbours within 1.25x of its steps. B = 8 (~5,000 steps
per trial, ~10 trials) and B = 4096 (~350k examples per trial) would each take a fifth to a third
of the budget: the batches are 16..2048 (2048 is already >= 4 B_crit, maximal data parallelism).

Why these choices:
- lr grid: multipliers 0.5, 1, 2 of a square-root scaling rule from 0.1 at batch 128, extended by
  up to two more (x2 or /2) where the best sits at an edge (Shallue et al. 2018: compare batch
  sizes only at their own best lr; they too found the best at the edge of a search space).
- target 95 %: reached by every batch size in 1-25 epochs of the 45k training set; steps-to-95 %
  span ~2,300 (B = 16) to ~90 (B = 2048), so the fit sees both regimes.
- steps to target: the crossing interpolated between the evaluations around it; within 10
  points of the target the loop evaluates every 2.5 % more steps (train.eval_fine) on the first
  2,000 test examples (data.eval_subset), so crossings are resolved to <= 3 %; every trial's
  final numbers are on the full 5k test set.
- gap phase: the best lr of 64, 128, 512, 1024, 2048, seeds 0 and 1, trained on the first 5,000
  training examples until training accuracy >= 99 % on them (cap 60 epochs), so the criterion is
  reachable in seconds; then train/test accuracy and loss on the full sets and the top Hessian
  eigenvalue of the training loss with train-mode BatchNorm (1,024 examples).
- Hessian outliers: the same Lanczos run goes on to the top 13 (classes + 3) at micro-batch 64 for
  every gap batch, with the gradient's share of their space (gap.spectrum_k): ~40 products,
  ~2.8 s more per gap trial than the top eigenvalue alone, cheap enough to be on by default.
"""

from __future__ import annotations

import argparse
import copy
from pathlib import Path
from typing import Any

from bigbatch.errors import UsageError
from bigbatch.study import spec as spec_mod
from bigbatch.study.sweep import default_out, run_and_report

# The training config every trial starts from (configs/mnist1d-cnn.toml, with a constant lr).
BASE: dict[str, Any] = {
    "name": "study-mnist1d-cnn",
    # eval_subset: evaluations during training on the first 2,000 test (and training-subset)
    # examples; the final numbers of every trial on the full 5k test set.
    "data": {"name": "mnist1d", "num_samples": 50000, "test_fraction": 0.1, "train_eval_samples": 5000,
             "eval_subset": 2000},
    "model": {"name": "cnn1d", "channels": 32},
    "batch": {"global_batch": 128},
    "optim": {"name": "sgd", "base_lr": 0.1, "base_batch": 128, "scaling": "sqrt", "momentum": 0.9,
              "weight_decay": 5e-4},
    "schedule": {"name": "constant"},
    # eval_fine: within 10 points of the target, evaluate every 2.5 % more steps, so the
    # interpolated crossing is resolved to <= 3 % at every batch size.
    "train": {"seed": 0, "eval_fine": 0.025, "eval_fine_within": 0.10},
}

DEFAULT_SWEEP: dict[str, Any] = {
    "name": "study-mnist1d-cnn",
    "base": BASE,
    "batch_sizes": [16, 32, 64, 128, 256, 512, 1024, 2048],
    "lr_multipliers": [0.5, 1.0, 2.0],   # extended by up to 2 more at an edge that is best
    "seeds": [0, 1, 2],                  # at each batch's best lr and its neighbours
    "target": {"test_acc": 0.95},
    "trial": {
        "max_steps": 20000,          # B = 16 needs ~2,500
        "max_examples": 2_000_000,   # B = 2048 needs ~200k; caps trials whose lr is far off
        "eval_every_examples": 8192,
        "torch_threads": 1,
        "cpus_per_worker": 1.0,
        "b_simple_samples": 1024,
    },
    "search": {"adaptive": True, "neighbours": 1, "extend": 2, "race": 1.5, "close": 1.25},
    "gap": {"batch_sizes": [64, 128, 512, 1024, 2048], "seeds": [0, 1], "train_acc": 0.99, "train_samples": 5000,
            "max_epochs": 60.0, "eval_every_epochs": 1.0},
}


def default_sweep() -> dict[str, Any]:
    return copy.deepcopy(DEFAULT_SWEEP)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--out", help="study folder (default sweeps/study-mnist1d-cnn-<time>)")
    parser.add_argument("--resume", action="store_true", help="continue an interrupted study in --out")
    parser.add_argument("--num-cpus", type=int, help="CPUs for the local Ray (default all: trials run 1 per CPU)")
    parser.add_argument("--print-config", action="store_true", help="print the embedded sweep config (TOML) and exit")


def main(args: argparse.Namespace) -> int:
    spec_dict = default_sweep()
    if args.print_config:
        import tomli_w

        print(tomli_w.dumps(spec_dict), end="")
        return 0
    if args.resume and not args.out:
        raise UsageError("--resume", "needs --out STUDY_DIR (the folder of the study to continue)")
    spec = spec_mod.from_dict(spec_dict)
    out = Path(args.out) if args.out else default_out(spec.name)
    return run_and_report(spec, spec_dict, out, args.resume, None, args.num_cpus, "bigbatch study")
