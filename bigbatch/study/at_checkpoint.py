"""`bigbatch measure RUN_DIR`: the noise scales, sharpness and tail index at a run's checkpoint,
on the loss that is trained.

One process, whatever world size the run trained on: the checkpoint holds the plain model, and
the training micro-batch b is derived from the run's config, its step and its world size (one
RNG state per rank is saved). Everything is measured with BatchNorm in train mode on micro-batches
of b (augmentation and label smoothing as trained):

- B_simple, |G|^2, tr(Sigma): `measure.noise.train_mode_noise` on K = --samples independent
  micro-batch gradients (unbiased estimators; McCandlish et al. 2018, appendix A).
- B_noise = tr(H Sigma)/(G^T H G): the same gradients with Hessian-vector products on an
  independent Hessian batch (`--hessian-examples`, split into micro-batches of b): HVPs of the
  first 16 gradients, each dotted with all K.
- sharpness_top: the top eigenvalue of that Hessian, the training loss's Hessian averaged over
  --hessian-examples (default 2,048) examples in micro-batches of b (Lanczos on the same HVPs,
  stopped on the Ritz residual).
- tail_alpha, tail_alpha_interval: `measure.tails.probe_tail_interval` on the first 64 gradients
  (a 95 % jackknife interval over their 32 independent differences).
- b_simple_online: the run's own online EMA (measure.gns) as saved in the checkpoint, if any.

Prints one line per quantity and, with --json FILE, writes them as one JSON object.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import time
from pathlib import Path
from typing import Any, Callable

import torch

from bigbatch import config as config_mod
from bigbatch import folders
from bigbatch.config import derive_batch
from bigbatch.errors import UsageError
from bigbatch.measure.modes import measuring
from bigbatch.measure.noise import GNSEstimator
from bigbatch.measure.train_mode import train_mode_noise
from bigbatch.measure.sharpness import HessianOperator
from bigbatch.measure.tails import probe_tail_interval
from bigbatch.trainer import checkpoint as ckpt
from bigbatch.trainer.data import build_data, tensor_batch
from bigbatch.trainer.models import build_model
from bigbatch.trainer.objective import TrainingLoss
from bigbatch.trainer.recipe import Schedule

DEFAULT_SAMPLES = 256  # K micro-batch gradients: |G|^2's relative error ~ B_simple / (b K) near a target
# The top eigenvalue of a Hessian averaged over n examples is biased upward and varies with the
# draw (it is convex in the matrix): at one micro-batch of 256 examples a batch-256 MNIST-1D CNN
# read 10.4-20.6 over six seeds against ~11 at 2,048 (issue 32). 2,048 examples, in micro-batches of b.
DEFAULT_HESSIAN_EXAMPLES = 2048
HESSIAN_SAMPLES = 16  # M gradients get an HVP (each dotted with all K): an HVP costs ~4 backward passes
TAIL_SAMPLES = 64
SHARPNESS_ITERS = 30  # a cap: the residual stop below ends the top eigenvalue after 4-6 steps here
SHARPNESS_TOL = 1e-2  # Ritz residual |H u - theta u| <= 1 % of theta (measure.sharpness.lanczos_top_eigs)


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("run_dir", metavar="RUN_DIR", help="a run folder with config.toml and checkpoint.pt")
    p.add_argument("--samples", type=int, default=DEFAULT_SAMPLES,
                   help=f"independent micro-batch gradients K (default {DEFAULT_SAMPLES})")
    p.add_argument("--hessian-examples", type=int, default=DEFAULT_HESSIAN_EXAMPLES,
                   help=f"examples in the independent Hessian batch for B_noise and sharpness (default "
                        f"{DEFAULT_HESSIAN_EXAMPLES}; 0 = skip both)")
    p.add_argument("--seed", type=int, default=0, help="seed of the example draws (default 0)")
    p.add_argument("--json", metavar="FILE", help="also write the result as one JSON object")


def check_args(run_dir: Path, samples: int, hessian_examples: int) -> None:
    """UsageError for bad input, before anything is loaded."""
    run = folders.RunFolder(run_dir)
    if not run.is_run():
        raise UsageError("RUN_DIR", f"{str(run_dir)!r} is not a run folder (no {folders.CONFIG})")
    if not run.checkpoint.is_file():
        raise UsageError("RUN_DIR", f"no {folders.CHECKPOINT} in {str(run_dir)!r}")
    if samples < 2:
        raise UsageError("--samples", f"must be >= 2 (two gradients give one spread), got {samples}")
    if hessian_examples < 0:
        raise UsageError("--hessian-examples", f"must be >= 0, got {hessian_examples}")


def training_micro_batch(cfg, state: dict[str, Any], num_train: int) -> tuple[int, int, int]:
    """(micro-batch b, global batch, world size) of the step that produced the checkpoint."""
    world = max(1, len(state.get("rng") or [None]))  # every rank's RNG state is saved
    step = int(state["progress"]["step"])
    controller = state.get("batch")
    global_batch = int(controller["batch"]) if controller else Schedule(cfg, num_train).batch_at(max(step - 1, 0))
    per_device, _ = derive_batch(global_batch, world, cfg.batch.accum_steps)
    return per_device, global_batch, world


def measure_checkpoint(cfg, run_dir: Path, samples: int | Callable[[int], int] = DEFAULT_SAMPLES,
                       hessian_examples: int | Callable[[int], int] = DEFAULT_HESSIAN_EXAMPLES,
                       seed: int = 0, sharpness: bool = True) -> dict[str, Any]:
    """The measurement as a dict (see the module docstring); raises UsageError for data that is
    not held in memory. `samples` and `hessian_examples` may be functions of the training
    micro-batch b (a sweep sizes them per trial). `sharpness=False` skips the Lanczos run."""
    t0 = time.perf_counter()
    bundle = build_data(cfg.data)
    if not bundle.in_memory:
        raise UsageError("data.name", f"bigbatch measure draws its own micro-batches: needs an in-memory dataset, "
                         f"not {cfg.data.name!r}")
    state = ckpt.load(folders.RunFolder(run_dir).checkpoint)
    model = build_model(cfg.model, bundle.input_shape, bundle.num_classes)
    model.load_state_dict(state["model"])
    loss_fn = TrainingLoss(cfg.train.label_smoothing, cfg.train.ignore_index)
    b, global_batch, world = training_micro_batch(cfg, state, len(bundle.train))
    samples = samples(b) if callable(samples) else samples
    hessian_examples = hessian_examples(b) if callable(hessian_examples) else hessian_examples
    cpu = torch.device("cpu")
    n = len(bundle.train)
    gen = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)  # augmentation draws

    def micro_batches():  # K independent micro-batches of b distinct examples, as training draws them
        for _ in range(samples):
            yield tensor_batch(bundle.train, torch.randperm(n, generator=gen)[:b], cpu, train=True)

    result: dict[str, Any] = {}
    with measuring(model, "train"):
        hessian = None
        if hessian_examples:
            # an independent draw: E[H] is the Hessian and H does not correlate with the K gradients
            count = min(n, max(b, (hessian_examples // b) * b))  # whole micro-batches of distinct examples
            h_idx = torch.randperm(n, generator=torch.Generator().manual_seed(seed + 1))[:count]
            hx, hy = tensor_batch(bundle.train, h_idx, cpu, train=True)
            hessian = HessianOperator(model, loss_fn, hx, hy, micro_batch=b)
        noise = train_mode_noise(model, loss_fn, micro_batches(), hessian=hessian, keep=TAIL_SAMPLES,
                                 hessian_samples=HESSIAN_SAMPLES)
        result.update(noise.to_dict())
        top = hessian.top_eigs(k=1, iters=SHARPNESS_ITERS, tol=SHARPNESS_TOL)[0] if hessian and sharpness else None
        result["sharpness_top"] = top
    result["sharpness_mode"] = "train"
    tail = probe_tail_interval(noise.gradients) if noise.gradients is not None and len(noise.gradients) >= 8 else None
    result["tail_alpha"] = tail.alpha if tail else None
    result["tail_alpha_interval"] = [tail.low, tail.high] if tail else None  # 95 %, jackknife (measure.tails)
    gns_state = (state.get("probes") or {}).get("gns")
    online = None
    if gns_state:
        est = GNSEstimator()
        est.load_state_dict(gns_state["estimator"])
        online = est.b_simple
    result.update({
        "b_simple_online": online,
        "global_batch": global_batch, "world_size": world, "step": int(state["progress"]["step"]),
        "label_smoothing": cfg.train.label_smoothing, "run_dir": str(run_dir),
        "seconds": time.perf_counter() - t0,
    })
    return result


def _fmt(v: Any) -> str:
    if isinstance(v, float):
        return "nan" if not math.isfinite(v) else f"{v:.4g}"
    return "-" if v is None else str(v)


def main(args: argparse.Namespace) -> int:
    t0 = time.perf_counter()
    run_dir = Path(args.run_dir)
    check_args(run_dir, args.samples, args.hessian_examples)
    if "OMP_NUM_THREADS" not in os.environ:
        # many small backward passes: on shared cores a second intra-op thread mostly spins
        torch.set_num_threads(1)
    cfg = config_mod.load(folders.RunFolder(run_dir).config)
    result = measure_checkpoint(cfg, run_dir, args.samples, args.hessian_examples, args.seed)
    result["seconds"] = time.perf_counter() - t0  # the whole command, loading included
    print(f"bigbatch measure {run_dir}: step {result['step']}, micro-batch b = {result['micro_batch']} "
          f"(global {result['global_batch']} on {result['world_size']} rank(s)), BatchNorm mode: {result['bn_mode']}, "
          f"K = {result['samples']} gradients, Hessian on {result['hessian_examples']} independent examples")
    for key in ("b_simple", "b_noise", "grad_sq", "trace_sigma", "g_h_g", "trace_h_sigma", "sharpness_top",
                "tail_alpha", "b_simple_online", "seconds"):
        print(f"  {key:<16} {_fmt(result[key])}")
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2) + "\n")
    return 0
