"""`bigbatch spectrum RUN_DIR`: the Hessian's spectrum at a run's checkpoint, on the loss that is trained.

The operator is the Hessian of the training loss averaged over --examples training examples
(a seeded draw, augmentation as trained, drawn once) in micro-batches of the run's training
micro-batch b (BatchNorm in train mode, each micro-batch normalised by its own statistics; label
smoothing as trained): `measure.sharpness.HessianOperator`, as `bigbatch measure` builds it. On it
(`measure.spectrum`):

- top-k eigenvalues and eigenvectors (Lanczos, full reorthogonalisation, residual stop); k
  defaults to the number of classes + 3, so the list reaches past the ~C outliers Sagun et al.
  expect into the bulk;
- the spectral density by stochastic Lanczos quadrature (--slq-probes Gaussian probes of
  --slq-steps steps), Gaussian-broadened with a width of 15 % of |lambda| on a grid geometric in |lambda|;
- the trace, Hutchinson with the top-k eigenspace deflated, with its standard error;
- the fraction of the gradient's squared norm (the same loss on the same examples) in the span of
  the top-k eigenvectors (Gur-Ari et al. 2018);
- the number of outliers standing out of the bulk (`measure.spectrum.count_outliers`).

--over-training: the top-k and the gradient's share of their space at every checkpoint the run
kept (`study.spectrum_training`), for the gradient-overlap curve of Gur-Ari et al.

Cost: about (Lanczos steps + probes x steps + trace probes + 1) products, each a forward and a
double backward over every micro-batch of the --examples. Writes spectrum.json and spectrum.png
(the density of log10 |lambda| on a log scale, top-k marked) into --out (default RUN_DIR/spectrum).
"""

from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path
from typing import Any

import torch

from bigbatch import config as config_mod
from bigbatch import folders
from bigbatch.distributed.env import torch_threads
from bigbatch.errors import UsageError
from bigbatch.measure import spectrum as sp
from bigbatch.measure.modes import measuring
from bigbatch.measure.sharpness import HessianOperator
from bigbatch.study import spectrum_training
from bigbatch.study.at_checkpoint import draw_examples, load_trained

DEFAULT_EXAMPLES = 2048
EXTRA_K = 3  # k = classes + 3: past the ~C outliers into the bulk, so the edge is in the list
TOP_ITERS = 80  # a cap on the top-k Lanczos steps
TOP_TOL = 1e-2  # Ritz residual <= 1 % of the eigenvalue
SLQ_PROBES = 3
SLQ_STEPS = 30
TRACE_PROBES = 16
BROADENING = 0.15  # Gaussian width = 15 % of |lambda| (see measure.spectrum.broadening)
GRID_POINTS = 300


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("run_dir", metavar="RUN_DIR", help="a run folder with config.toml and checkpoint.pt")
    p.add_argument("--examples", type=int, default=DEFAULT_EXAMPLES,
                   help=f"training examples the Hessian averages over, in micro-batches of b (default {DEFAULT_EXAMPLES})")
    p.add_argument("--k", type=int, default=None, help=f"top eigenpairs (default: classes + {EXTRA_K})")
    p.add_argument("--micro-batch", type=int, default=None,
                   help="BatchNorm micro-batch to measure at (default: the training micro-batch b)")
    p.add_argument("--slq-probes", type=int, default=SLQ_PROBES, help=f"SLQ random probes (default {SLQ_PROBES})")
    p.add_argument("--slq-steps", type=int, default=SLQ_STEPS, help=f"Lanczos steps per SLQ probe (default {SLQ_STEPS})")
    p.add_argument("--trace-probes", type=int, default=TRACE_PROBES,
                   help=f"Hutchinson probes (Rademacher, top-k deflated; default {TRACE_PROBES})")
    p.add_argument("--iters", type=int, default=TOP_ITERS, help=f"cap on the top-k Lanczos steps (default {TOP_ITERS})")
    p.add_argument("--seed", type=int, default=0, help="seed of the examples and probes (default 0)")
    p.add_argument("--over-training", action="store_true",
                   help="instead: the top-k and the gradient's share of their space at every kept checkpoint-<step>.pt "
                        "(train with checkpoint.every > 0 and a large checkpoint.keep); no density or trace")
    p.add_argument("--out", default=None, help="output folder (default RUN_DIR/spectrum)")


def check_args(args: argparse.Namespace) -> Path:
    """UsageError naming the field, before anything is loaded."""
    run = folders.RunFolder(args.run_dir)
    if not run.path.is_dir():
        raise UsageError("RUN_DIR", f"run folder {args.run_dir!r} does not exist")
    if not run.is_run():
        raise UsageError("RUN_DIR", f"{args.run_dir!r} is not a run folder (no {folders.CONFIG})")
    if not run.checkpoint.is_file():
        raise UsageError("RUN_DIR", f"no {folders.CHECKPOINT} in {args.run_dir!r}")
    for field, value, low in (("--k", args.k, 1), ("--examples", args.examples, 2), ("--slq-probes", args.slq_probes, 1),
                              ("--slq-steps", args.slq_steps, 2), ("--trace-probes", args.trace_probes, 2),
                              ("--iters", args.iters, 1), ("--micro-batch", args.micro_batch, 2)):
        if value is not None and value < low:
            raise UsageError(field, f"must be >= {low}, got {value}")
    if args.k is not None and args.iters < args.k:
        raise UsageError("--iters", f"must be >= --k ({args.k}), got {args.iters}")
    return run.path


def measure_spectrum(cfg, run_dir: Path, examples: int = DEFAULT_EXAMPLES, k: int | None = None,
                     micro_batch: int | None = None, slq_probes: int = SLQ_PROBES, slq_steps: int = SLQ_STEPS,
                     trace_probes: int = TRACE_PROBES, iters: int = TOP_ITERS, seed: int = 0) -> dict[str, Any]:
    """The measurement as a dict (see the module docstring); UsageError for data not held in
    memory or a k larger than the number of parameters."""
    t0 = time.perf_counter()
    bundle, state, model, loss_fn, (train_b, global_batch, world) = load_trained(cfg, run_dir, "spectrum")
    b = micro_batch or train_b
    k = k or bundle.num_classes + EXTRA_K
    x, y = draw_examples(bundle, examples, b, seed)
    with measuring(model, "train"):
        op = HessianOperator(model, loss_fn, x, y, micro_batch=b)
        n = op.num_params
        if k > n:
            raise UsageError("--k", f"must be at most the number of parameters ({n}), got {k}")
        t = time.perf_counter()
        pairs = sp.top_eigenpairs(op.hvp, n, k, max(iters, k), TOP_TOL, seed)
        top_s, top_hvps = time.perf_counter() - t, op.hvps
        t = time.perf_counter()
        quad = sp.slq(op.hvp, n, slq_probes, slq_steps, seed + 1)
        slq_s = time.perf_counter() - t
        t = time.perf_counter()
        trace = sp.hutchinson_trace(op.hvp, n, trace_probes, seed + 2, deflate=pairs.vectors, deflate_values=pairs.values)
        trace_s = time.perf_counter() - t
        grad = op.gradient()
    values = pairs.values.tolist()
    outliers = sp.count_outliers(pairs.values)
    fractions = [sp.top_space_fraction(grad, pairs.vectors[:i]) for i in range(1, k + 1)]
    density = _density(quad, values)
    return {
        "run_dir": str(run_dir), "step": int(state["progress"]["step"]), "num_params": n,
        "num_classes": bundle.num_classes, "examples": op.examples, "micro_batch": b, "train_micro_batch": train_b,
        "global_batch": global_batch, "world_size": world, "bn_mode": "train",
        "label_smoothing": cfg.train.label_smoothing, "seed": seed,
        "k": k, "top_eigenvalues": values, "top_residuals": pairs.residuals.tolist(), "top_lanczos_steps": pairs.steps,
        "top_tol": TOP_TOL,
        "outliers": outliers.count, "bulk_edge": outliers.bulk_edge, "outliers_saturated": outliers.saturated,
        "outlier_rule": outliers.rule,
        "trace": trace.value, "trace_se": trace.se, "trace_probes": trace.probes, "trace_top_k_part": trace.deflated,
        "grad_norm": float(grad.norm()), "grad_fraction_top_k": fractions[-1], "grad_fraction_by_k": fractions,
        "grad_fraction_outliers": fractions[outliers.count - 1] if outliers.count else 0.0,
        "slq": {"probes": slq_probes, "steps": slq_steps, "nodes": quad.nodes.tolist(), "weights": quad.weights.tolist()},
        "density": density,
        "hvps": op.hvps, "seconds_top_k": top_s, "hvps_top_k": top_hvps, "seconds_slq": slq_s,
        "seconds_trace": trace_s, "seconds": time.perf_counter() - t0,
    }


def _density(quad: sp.Quadrature, top: list[float]) -> dict[str, Any]:
    """The broadened SLQ density on a grid geometric in |lambda|, from 1e-4 of the largest |lambda|
    to 1.5 x it, with the density per decade of |lambda| (|lambda| ln 10 phi): what the plot shows."""
    nodes = quad.nodes[quad.weights > 0]
    high = 1.5 * max(float(nodes.abs().max()), max(abs(v) for v in top), 1e-12)
    low = high * 1e-4
    grid = sp.log_abs_grid(low, high, GRID_POINTS)
    phi = quad.density(grid, sp.broadening(quad.nodes, BROADENING, floor=low))
    per_decade = grid.abs() * math.log(10) * phi
    return {"lambda": grid.tolist(), "phi": phi.tolist(), "per_decade": per_decade.tolist(),
            "broadening": f"Gaussian, width {BROADENING:g} |lambda| (at least {low:.3g})"}


def plot(result: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    d = result["density"]
    lam, per_decade = torch.tensor(d["lambda"]), torch.tensor(d["per_decade"])
    fig, ax = plt.subplots(figsize=(8, 4.5))
    floor = float(per_decade.max()) * 1e-8
    for sign, style, label in ((1, "-", "lambda > 0"), (-1, "--", "lambda < 0")):
        keep = lam * sign > 0
        ax.plot((lam[keep] * sign).tolist(), per_decade[keep].clamp(min=floor).tolist(), style, label=f"SLQ density, {label}")
    for i, v in enumerate(result["top_eigenvalues"]):
        if v > 0:
            out = i < result["outliers"]
            ax.axvline(v, color="tab:red" if out else "0.6", lw=0.8, alpha=0.8,
                       label=("outliers" if out else f"top-{result['k']}, in the bulk") if i in (0, result["outliers"]) else None)
    if result["bulk_edge"]:
        ax.axvline(result["bulk_edge"], color="k", ls=":", lw=1, label="top of the bulk (gap rule)")
    ax.set(xscale="log", yscale="log", xlabel="|lambda|  (Hessian eigenvalue of the training loss)",
           ylabel="density per decade of |lambda|",
           title=f"{result['outliers']} outlier(s); trace {result['trace']:.3g} +- {result['trace_se']:.2g}; "
                 f"|P_k g|^2/|g|^2 = {result['grad_fraction_top_k']:.2f} (k = {result['k']})")
    ax.set_ylim(bottom=floor)
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=8)
    fig.suptitle(f"{Path(result['run_dir']).name}: step {result['step']}, {result['examples']} examples in micro-batches "
                 f"of {result['micro_batch']} (train-mode BatchNorm)", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(args: argparse.Namespace) -> int:
    t0 = time.perf_counter()
    run_dir = check_args(args)
    cfg = config_mod.load(folders.RunFolder(run_dir).config)
    out = Path(args.out) if args.out else run_dir / "spectrum"
    with torch_threads(1, unless_omp=True):  # many small backward passes; an in-process caller keeps its setting
        if args.over_training:
            return spectrum_training.run(cfg, run_dir, out, args.examples, args.k, args.micro_batch, args.iters, args.seed)
        result = measure_spectrum(cfg, run_dir, args.examples, args.k, args.micro_batch, args.slq_probes, args.slq_steps,
                                  args.trace_probes, args.iters, args.seed)
    result["seconds"] = time.perf_counter() - t0  # the whole command, loading included
    out.mkdir(parents=True, exist_ok=True)
    (out / "spectrum.json").write_text(json.dumps(result, indent=1) + "\n")
    plot(result, out / "spectrum.png")
    r = result
    print(f"bigbatch spectrum {run_dir}: step {r['step']}, {r['num_params']} parameters, Hessian of the training loss "
          f"over {r['examples']} examples in micro-batches of {r['micro_batch']} (train-mode BatchNorm, label smoothing "
          f"{r['label_smoothing']:g}), {r['hvps']} Hessian-vector products")
    print(f"  top-{r['k']} eigenvalues  " + ", ".join(f"{v:.4g}" for v in r["top_eigenvalues"])
          + f"  ({r['top_lanczos_steps']} Lanczos steps)")
    edge = "n/a (no positive top-k eigenvalue)" if r["bulk_edge"] is None else f"{r['bulk_edge']:.4g}"
    print(f"  outliers           {r['outliers']} above the bulk edge {edge} ({r['outlier_rule']})")
    print(f"  trace              {r['trace']:.4g} +- {r['trace_se']:.2g} (SE; top-{r['k']} part {r['trace_top_k_part']:.4g}, "
          f"{r['trace_probes']} probes)")
    print(f"  gradient in top-k  {r['grad_fraction_top_k']:.3f} of |g|^2 (in the outliers' space: "
          f"{r['grad_fraction_outliers']:.3f}; |g| = {r['grad_norm']:.3g})")
    print(f"  seconds            {r['seconds']:.1f}")
    print(f"wrote {out / 'spectrum.json'} and {out / 'spectrum.png'}")
    return 0
