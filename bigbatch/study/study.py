"""`bigbatch study`: the main job with an embedded default sweep.

A critical-batch-size study of the MNIST-1D CNN on this CPU (no download): 10 global batch sizes
from 8 to 4096 x 5 learning rates each, every trial trained to 95 % test accuracy and stopped
there, then the fit S(B) = S_min (1 + B_crit / B), B_simple at the target and the train/test gap,
ending in a report with plots. Sized to finish in a few minutes on 2 cores: constant lr (so the
schedule does not depend on the step budget), evaluation every 4,096 examples on a 5k test set
and a 5k training subset, one torch thread per trial, two trials at a time.

Why these choices:
- lr grid: multipliers 1/8..2 of a square-root scaling rule from 0.1 at batch 128. Linear
  scaling from the same point diverges at the largest batches and square root is too hot at the
  smallest, so a grid of 5 multipliers around sqrt brackets the best lr at every batch
  (Shallue et al. 2018: compare batch sizes only at their own best lr).
- target 95 %: reached by every batch size in 1-25 epochs of the 45k training set; steps-to-95 %
  measured here span 5,000+ (B = 8) to ~70 (B >= 2048), so the fit sees both regimes.
"""

from __future__ import annotations

import argparse
import copy
from pathlib import Path
from typing import Any

from bigbatch.errors import UsageError
from bigbatch.study import spec as spec_mod
from bigbatch.study.sweep import default_out, finish

# The training config every trial starts from (configs/mnist1d-cnn.toml, with a constant lr).
BASE: dict[str, Any] = {
    "name": "study-mnist1d-cnn",
    "data": {"name": "mnist1d", "num_samples": 50000, "test_fraction": 0.1, "train_eval_samples": 5000},
    "model": {"name": "cnn1d", "channels": 32},
    # Two micro-batches per step give the online gradient noise scale (measure.gns: the small and
    # the big batch of the two-batch estimator) for the "B_simple during training" plot.
    "batch": {"global_batch": 128, "accum_steps": 2},
    "optim": {"name": "sgd", "base_lr": 0.1, "base_batch": 128, "scaling": "sqrt", "momentum": 0.9,
              "weight_decay": 5e-4},
    "schedule": {"name": "constant"},
    "train": {"seed": 0},
    "measure": {"gns": True},
}

DEFAULT_SWEEP: dict[str, Any] = {
    "name": "study-mnist1d-cnn",
    "base": BASE,
    "batch_sizes": [8, 16, 32, 64, 128, 256, 512, 1024, 2048, 4096],
    "lr_multipliers": [0.125, 0.25, 0.5, 1.0, 2.0],
    "seeds": [0],
    "target": {"test_acc": 0.95},
    "trial": {
        "max_steps": 20000,          # B = 8 needs ~6,000
        "max_examples": 2_000_000,   # B = 4096 needs ~300k; caps trials whose lr is far off
        "eval_every_examples": 4096,
        "gap_epochs": 0.5,           # every trial trains at least this long (B = 8 reaches 95 % after ~0.9 epoch)
        "torch_threads": 1,
        "cpus_per_worker": 1.0,
    },
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
    return finish(spec, spec_dict, out, args.resume, None, args.num_cpus, "bigbatch study")
