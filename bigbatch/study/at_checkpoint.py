"""`bigbatch measure RUN_DIR`: the noise scales, sharpness and tail index at a run's checkpoint,
on the loss that is trained.

One process, whatever world size the run trained on: the checkpoint holds the plain model, and
the training micro-batch b is derived from the run's config, its step and its world size (one
RNG state per rank is saved). Everything is measured with BatchNorm in train mode on micro-batches
of b (augmentation and label smoothing as trained):

- B_simple, |G|^2, tr(Sigma): `measure.train_mode.train_mode_noise` on K independent
  micro-batch gradients (unbiased estimators; McCandlish et al. 2018, appendix A), each with a
  jackknife standard error; K starts at --samples and grows (up to --max-samples, 20 s) until
  b K >= 10 B_simple or B_simple's relative standard error is <= 20 %. A ratio whose denominator
  is not positive or not resolved is reported as a lower bound with its reason (*_lower_bound,
  *_reason), never as a value.
- B_noise = tr(H Sigma)/(G^T H G): the same gradients, each with a Hessian-vector product on
  its own fresh micro-batch of b (independent of the gradients, so E[H_a] is the training loss's
  Hessian), dotted with all K (measure.train_mode, `hessian_batches`). On a batch-256 MNIST-1D
  CNN this gave SEs of 25-41 (~10 %) in 7 s where HVPs of 32 gradients on one 2,048-example
  Hessian gave 34-87 in about as long: many cheap Hessians average their noise away.
- sharpness_top: the top eigenvalue of the training loss's Hessian averaged over
  --hessian-examples (default 2,048) distinct examples in micro-batches of b (a separate, fixed
  operator: Lanczos, stopped on the Ritz residual).
- tail_alpha, tail_alpha_interval: `measure.tails.probe_tail_interval` on the first 64 gradients
  (a 95 % jackknife interval over their 32 independent differences).
- b_simple_online: the run's own online EMA (measure.gns) as saved in the checkpoint, if any;
  b_simple_online_mean: its logged values averaged over training, step-weighted.
- --micro-batch B: measure at BatchNorm micro-batch B instead of the training b (one fixed B
  makes checkpoints trained at different batch sizes comparable); train_micro_batch is kept.

Prints one line per quantity and, with --json FILE, writes them as one JSON object.
"""

from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path
from typing import Any, Callable

import torch

from bigbatch import config as config_mod
from bigbatch import folders
from bigbatch.config import derive_batch
from bigbatch.distributed.env import torch_threads
from bigbatch.errors import UsageError
from bigbatch.measure.modes import measuring
from bigbatch.measure.noise import GNSEstimator
from bigbatch.measure.sharpness import HessianOperator
from bigbatch.measure.tails import probe_tail_interval
from bigbatch.measure.train_mode import train_mode_noise
from bigbatch.study.records import training_mean
from bigbatch.trainer import checkpoint as ckpt
from bigbatch.trainer.data import build_data, tensor_batch
from bigbatch.trainer.models import build_model
from bigbatch.trainer.objective import TrainingLoss, tokens_per_example
from bigbatch.trainer.recipe import Schedule

DEFAULT_SAMPLES = 256  # K micro-batch gradients: |G|^2's relative error ~ B_simple / (b K) near a target
# The top eigenvalue of a Hessian averaged over n examples is biased upward and varies with the
# draw (it is convex in the matrix): at one micro-batch of 256 examples a batch-256 MNIST-1D CNN
# read 10.4-20.6 over six seeds against ~11 at 2,048 (issue 32). 2,048 examples, in micro-batches of b.
DEFAULT_HESSIAN_EXAMPLES = 2048
TAIL_SAMPLES = 64
SHARPNESS_ITERS = 30  # a cap: the residual stop below ends the top eigenvalue after 4-6 steps here
GROWTH = 4  # K may grow to 4 x --samples (default 1,024) until B_simple is resolved (measure.train_mode)
BUDGET_S = 20.0  # ... or until this many seconds of gradients: the command stays within ~30 s on a CPU
SHARPNESS_TOL = 1e-2  # Ritz residual |H u - theta u| <= 1 % of theta (measure.sharpness.lanczos_top_eigs)


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("run_dir", metavar="RUN_DIR", help="a run folder with config.toml and checkpoint.pt")
    p.add_argument("--samples", type=int, default=DEFAULT_SAMPLES,
                   help=f"independent micro-batch gradients K (default {DEFAULT_SAMPLES})")
    p.add_argument("--hessian-examples", type=int, default=DEFAULT_HESSIAN_EXAMPLES,
                   help=f"examples the sharpness Hessian averages over, in micro-batches of b (default "
                        f"{DEFAULT_HESSIAN_EXAMPLES}; 0 = skip sharpness and B_noise)")
    p.add_argument("--max-samples", type=int, default=None,
                   help=f"K may grow up to this many gradients until B_simple is resolved (b K >= 10 B_simple or a "
                        f"standard error below 20 %%; default {GROWTH} x --samples, and at most {BUDGET_S:g} s)")
    p.add_argument("--micro-batch", type=int, default=None,
                   help="BatchNorm micro-batch to measure at (default: the training micro-batch b); one fixed value "
                        "for runs at different batch sizes measures one loss")
    p.add_argument("--seed", type=int, default=0, help="seed of the example draws (default 0)")
    p.add_argument("--json", metavar="FILE", help="also write the result as one JSON object")


def check_args(run_dir: Path, samples: int, hessian_examples: int, max_samples: int | None = None,
               micro_batch: int | None = None) -> None:
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
    if max_samples is not None and max_samples < samples:
        raise UsageError("--max-samples", f"must be >= --samples ({samples}), got {max_samples}")
    if micro_batch is not None and micro_batch < 2:
        raise UsageError("--micro-batch", f"must be >= 2 (BatchNorm needs two examples), got {micro_batch}")


def training_micro_batch(cfg, state: dict[str, Any], num_train: int) -> tuple[int, int, int]:
    """(micro-batch b, global batch, world size) of the step that produced the checkpoint."""
    world = max(1, len(state.get("rng") or [None]))  # every rank's RNG state is saved
    step = int(state["progress"]["step"])
    controller = state.get("batch")
    global_batch = int(controller["batch"]) if controller else Schedule(cfg, num_train).batch_at(max(step - 1, 0))
    per_device, _ = derive_batch(global_batch, world, cfg.batch.accum_steps)
    return per_device, global_batch, world


def load_trained(cfg, run_dir: Path, command: str):
    """What a measurement at a run's checkpoint starts from: (data bundle, checkpoint state, the
    model with its weights, the training loss function as trained (label smoothing), and the
    training (micro-batch b, global batch, world size)). UsageError naming `data.name` for a
    dataset not held in memory (`bigbatch COMMAND` draws its own examples)."""
    bundle = build_data(cfg.data)
    if not bundle.in_memory:
        raise UsageError("data.name", f"bigbatch {command} draws its own micro-batches: needs an in-memory dataset, "
                         f"not {cfg.data.name!r}")
    state = ckpt.load(folders.RunFolder(run_dir).checkpoint)
    model = build_model(cfg.model, bundle.input_shape, bundle.num_classes)
    model.load_state_dict(state["model"])
    loss_fn = TrainingLoss(cfg.train.label_smoothing, cfg.train.ignore_index)
    return bundle, state, model, loss_fn, training_micro_batch(cfg, state, len(bundle.train))


def draw_examples(bundle, examples: int, b: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """A seeded draw of whole micro-batches of b training examples (at most `examples`),
    augmented as trained, drawn once: the examples a fixed Hessian operator averages over.
    UsageError naming --examples when it is less than one micro-batch."""
    if examples < b:
        raise UsageError("--examples", f"must be at least one micro-batch ({b}), got {examples}")
    n_train = len(bundle.train)
    count = min(n_train, (examples // b) * b)  # whole micro-batches
    idx = torch.randperm(n_train, generator=torch.Generator().manual_seed(seed))[:count]
    torch.manual_seed(seed)  # the augmentation draw, once: a fixed operator
    return tensor_batch(bundle.train, idx, torch.device("cpu"), train=True)


def measure_checkpoint(cfg, run_dir: Path, samples: int | Callable[[int], int] = DEFAULT_SAMPLES,
                       hessian_examples: int | Callable[[int], int] = DEFAULT_HESSIAN_EXAMPLES,
                       seed: int = 0, sharpness: bool = True, *, max_samples: int | Callable[[int], int] | None = None,
                       micro_batch: int | None = None, budget_s: float | None = BUDGET_S,
                       hessian_samples: int | None = None) -> dict[str, Any]:
    """The measurement as a dict (see the module docstring); raises UsageError for data that is
    not held in memory. `samples` (the K to start from), `max_samples` (how far K may grow;
    default 4 x samples) and `hessian_examples` may be functions of the micro-batch b (a sweep
    sizes them per trial). `micro_batch`: the BatchNorm micro-batch to measure at (default the
    training one; a fixed value makes runs at different batch sizes comparable: one loss).
    `hessian_samples`: how many of the gradients get an HVP for B_noise (default all).
    `sharpness=False` skips the Lanczos run."""
    t0 = time.perf_counter()
    bundle, state, model, loss_fn, (train_b, global_batch, world) = load_trained(cfg, run_dir, "measure")
    b = micro_batch or train_b
    samples = samples(b) if callable(samples) else samples
    max_samples = max_samples(b) if callable(max_samples) else (max_samples or GROWTH * samples)
    hessian_examples = hessian_examples(b) if callable(hessian_examples) else hessian_examples
    cpu = torch.device("cpu")
    n = len(bundle.train)
    gen = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)  # augmentation draws

    def micro_batches():  # K independent micro-batches of b distinct examples, as training draws them
        for _ in range(max(samples, max_samples)):
            yield tensor_batch(bundle.train, torch.randperm(n, generator=gen)[:b], cpu, train=True)

    def hessian_batches():  # one fresh micro-batch per HVP, independent of the K gradients (E[H_a] = H)
        h_gen = torch.Generator().manual_seed(seed + 2)
        while True:
            yield tensor_batch(bundle.train, torch.randperm(n, generator=h_gen)[:b], cpu, train=True)

    result: dict[str, Any] = {}
    with measuring(model, "train"):
        noise = train_mode_noise(model, loss_fn, micro_batches(), keep=TAIL_SAMPLES, min_samples=samples,
                                 max_samples=max_samples, budget_s=budget_s, hessian_samples=hessian_samples,
                                 hessian_batches=hessian_batches() if hessian_examples else None)
        result.update(noise.to_dict())
        top, examples = None, 0
        if hessian_examples and sharpness:
            # the Hessian averaged over hessian_examples distinct examples (an independent draw), in
            # micro-batches of b: a fixed operator for Lanczos
            count = min(n, max(b, (hessian_examples // b) * b))  # whole micro-batches
            h_idx = torch.randperm(n, generator=torch.Generator().manual_seed(seed + 1))[:count]
            hx, hy = tensor_batch(bundle.train, h_idx, cpu, train=True)
            hessian = HessianOperator(model, loss_fn, hx, hy, micro_batch=b)
            top, examples = hessian.top_eigs(k=1, iters=SHARPNESS_ITERS, tol=SHARPNESS_TOL)[0], hessian.examples
        result["sharpness_top"], result["sharpness_examples"] = top, examples
    result["sharpness_mode"] = "train"
    tail = probe_tail_interval(noise.gradients) if noise.gradients is not None and len(noise.gradients) >= 8 else None
    result["tail_alpha"] = tail.alpha if tail else None
    result["tail_alpha_interval"] = [tail.low, _finite(tail.high)] if tail else None  # 95 %, jackknife; None: unbounded
    gns_state = (state.get("probes") or {}).get("gns")
    online = None
    if gns_state:
        est = GNSEstimator()
        est.load_state_dict(gns_state["estimator"])
        online = est.b_simple
    result.update({
        "b_simple_online": online,
        "b_simple_online_mean": training_mean(folders.RunFolder(run_dir).read_metrics()),
        "train_micro_batch": train_b,
        **({"tokens_per_example": tokens_per_example(bundle.target_shape)} if tokens_per_example(bundle.target_shape) > 1 else {}),
        "global_batch": global_batch, "world_size": world, "step": int(state["progress"]["step"]),
        "label_smoothing": cfg.train.label_smoothing, "run_dir": str(run_dir),
        "seconds": time.perf_counter() - t0,
    })
    return result


def _finite(v: float) -> float | None:
    return v if math.isfinite(v) else None


def _fmt(v: Any) -> str:
    if isinstance(v, float):
        return f"{v:.4g}" if math.isfinite(v) or math.isinf(v) else "nan"
    return "-" if v is None else str(v)


def main(args: argparse.Namespace) -> int:
    t0 = time.perf_counter()
    run_dir = Path(args.run_dir)
    check_args(run_dir, args.samples, args.hessian_examples, args.max_samples, args.micro_batch)
    cfg = config_mod.load(folders.RunFolder(run_dir).config)
    with torch_threads(1, unless_omp=True):  # many small backward passes
        result = measure_checkpoint(cfg, run_dir, args.samples, args.hessian_examples, args.seed,
                                    max_samples=args.max_samples, micro_batch=args.micro_batch)
    result["seconds"] = time.perf_counter() - t0  # the whole command, loading included
    print(f"bigbatch measure {run_dir}: step {result['step']}, micro-batch b = {result['micro_batch']} "
          f"(trained at {result['train_micro_batch']}; global {result['global_batch']} on {result['world_size']} rank(s)), "
          f"BatchNorm mode: {result['bn_mode']}, K = {result['samples']} gradients ({result['stopped']}), "
          f"HVPs on {result['hessian_samples']} fresh micro-batches, sharpness on {result['sharpness_examples']} examples")
    for key in ("b_simple", "b_noise", "grad_sq", "trace_sigma", "g_h_g", "trace_h_sigma"):
        se = result.get(f"{key}_se")
        line = f"  {key:<16} {_fmt(result[key])}" + (f" +- {_fmt(se)} (SE)" if se is not None else "")
        if result.get(f"{key}_interval"):
            line += f", 95 % [{_fmt(result[f'{key}_interval'][0])}, {_fmt(result[f'{key}_interval'][1] or math.inf)}]"
        if result.get(f"{key}_reason") not in (None, "resolved"):
            line += f"; {result[f'{key}_reason']}"
        print(line)
    tail = result["tail_alpha_interval"]
    print(f"  {'sharpness_top':<16} {_fmt(result['sharpness_top'])}")
    print(f"  {'tail_alpha':<16} {_fmt(result['tail_alpha'])}"
          + (f", 95 % [{_fmt(tail[0])}, {_fmt(tail[1] if tail[1] is not None else math.inf)}]" if tail else ""))
    if result.get("tokens_per_example"):  # a sequence task: the batch is in sequences of T tokens
        T = result["tokens_per_example"]
        print(f"  in tokens (x {T}; measured per sequence on the token-averaged loss): "
              + ", ".join(f"{key} {_fmt(result[key] * T if result[key] is not None else None)}" for key in ("b_simple", "b_noise")))
    for key in ("b_simple_online", "b_simple_online_mean", "seconds"):
        print(f"  {key:<16} {_fmt(result[key])}")
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2) + "\n")
    return 0
