"""`bigbatch spectrum RUN_DIR --over-training`: the gradient's share of the Hessian's top eigenspace
at every checkpoint a run kept (Gur-Ari, Roberts, Dyer 2018: after a short initial phase most of
the gradient lies in the span of the top-k Hessian eigenvectors, k ~ classes).

From checkpoints rather than an online probe: a run trained with `checkpoint.every = N` and a
large `checkpoint.keep` (`bigbatch plan` keeps every checkpoint of its base run) already holds
the points, the measurement costs nothing while training, and it is the same operator as
`bigbatch spectrum`'s: the training loss (train-mode BatchNorm at one micro-batch b for every
checkpoint, label smoothing as trained) averaged over one seeded draw of --examples training
examples, the same draw at every checkpoint. Per checkpoint: the top-k eigenpairs (Lanczos,
1 % Ritz residuals), the gradient g of the same loss on the same examples, |P_j g|^2 / |g|^2 for
j = 1..k, and the outliers by the gap rule; no density or trace (k + ~20 products per checkpoint
instead of ~140). Writes over_training.json and over_training.png into --out.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import torch

from bigbatch import folders
from bigbatch.errors import UsageError
from bigbatch.measure import spectrum as sp
from bigbatch.measure.modes import measuring
from bigbatch.measure.sharpness import HessianOperator
from bigbatch.study.at_checkpoint import draw_examples, load_trained
from bigbatch.trainer import checkpoint as ckpt

TOP_TOL = 1e-2


def kept_checkpoints(run_dir: Path) -> list[tuple[int, Path]]:
    """(step, path) of every checkpoint-<step>.pt in the run folder, oldest first; UsageError
    with fewer than two (nothing to follow over training)."""
    found = sorted((int(m.group(1)), p) for p in run_dir.iterdir()
                   if (m := folders.CHECKPOINT_STEP.match(p.name)) and p.is_file())
    if len(found) < 2:
        raise UsageError("RUN_DIR", f"{str(run_dir)!r} keeps {len(found)} step checkpoint(s); --over-training needs "
                         "at least 2: train with checkpoint.every > 0 and checkpoint.keep large enough")
    return found


def _logged_at(rows: list[dict[str, Any]], step: int, key: str) -> float | None:
    """The last value of `key` logged at or before `step` (the run's own training-loss log)."""
    vals = [r[key] for r in rows if r.get(key) is not None and r.get("step", 0) <= step]
    return vals[-1] if vals else None


def measure_over_training(cfg, run_dir: Path, examples: int, k: int | None = None, micro_batch: int | None = None,
                          iters: int = 80, seed: int = 0) -> dict[str, Any]:
    """The gradient's share of the top-k space at every kept checkpoint (see the module docstring)."""
    t0 = time.perf_counter()
    points = kept_checkpoints(run_dir)
    bundle, _, model, loss_fn, (train_b, global_batch, _) = load_trained(cfg, run_dir, "spectrum")
    b = micro_batch or train_b
    k = k or bundle.num_classes + 3
    c = bundle.num_classes
    x, y = draw_examples(bundle, examples, b, seed)
    rows = folders.RunFolder(run_dir).read_metrics()
    out = []
    for step, path in points:
        t = time.perf_counter()
        model.load_state_dict(ckpt.load(path)["model"])
        with measuring(model, "train"):
            op = HessianOperator(model, loss_fn, x, y, micro_batch=b)
            if k > op.num_params:
                raise UsageError("--k", f"must be at most the number of parameters ({op.num_params}), got {k}")
            pairs = sp.top_eigenpairs(op.hvp, op.num_params, k, max(iters, k), TOP_TOL, seed)
            grad = op.gradient()
        by_k = [sp.top_space_fraction(grad, pairs.vectors[:j]) for j in range(1, k + 1)]
        outliers = sp.count_outliers(pairs.values)
        out.append({"step": step, "epoch": _logged_at(rows, step, "epoch"), "train_loss_logged": _logged_at(rows, step, "loss"),
                    "lr": _logged_at(rows, step, "lr"), "top_eigenvalues": pairs.values.tolist(),
                    "top_residuals": pairs.residuals.tolist(), "outliers": outliers.count, "grad_norm": float(grad.norm()),
                    "grad_fraction_top_k": by_k[-1], "grad_fraction_classes": by_k[c - 1] if k >= c else None,
                    "grad_fraction_by_k": by_k, "hvps": op.hvps, "seconds": time.perf_counter() - t})
    return {"run_dir": str(run_dir), "num_classes": c, "k": k, "examples": len(x), "micro_batch": b,
            "train_micro_batch": train_b, "global_batch": global_batch, "bn_mode": "train",
            "label_smoothing": cfg.train.label_smoothing, "seed": seed, "top_tol": TOP_TOL,
            "checkpoints": out, "seconds": time.perf_counter() - t0}


def plot(result: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    pts = result["checkpoints"]
    steps = [p["step"] for p in pts]
    k, c = result["k"], result["num_classes"]
    fig, ax = plt.subplots(figsize=(7.5, 4.2))
    ax.plot(steps, [p["grad_fraction_top_k"] for p in pts], "o-", color="C2", label=f"top-{k} space")
    if k >= c:
        ax.plot(steps, [p["grad_fraction_classes"] for p in pts], "s--", color="C0", label=f"top-{c} space (C = classes)")
    ax.plot(steps, [p["grad_fraction_by_k"][0] for p in pts], "^:", color="0.5", label="top-1 space")
    ax.set(ylim=(0, 1), xlabel="training step (kept checkpoints)", ylabel="|P g|^2 / |g|^2")
    ax.grid(alpha=0.3)
    ax2 = ax.twinx()
    ax2.plot(steps, [p["top_eigenvalues"][0] for p in pts], "-", color="C3", lw=1, alpha=0.7, label="lambda_1 (right)")
    ax2.set_yscale("log")
    ax2.set_ylabel("top Hessian eigenvalue", color="C3")
    lines = ax.get_legend_handles_labels()
    lines2 = ax2.get_legend_handles_labels()
    ax.legend(lines[0] + lines2[0], lines[1] + lines2[1], fontsize=8, loc="lower right")
    ax.set_title(f"{Path(result['run_dir']).name}: the gradient in the Hessian's top eigenspace over training\n"
                 f"({result['examples']} examples in micro-batches of {result['micro_batch']}, train-mode BatchNorm)",
                 fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def run(cfg, run_dir: Path, out: Path, examples: int, k: int | None, micro_batch: int | None, iters: int,
        seed: int) -> int:
    result = measure_over_training(cfg, run_dir, examples, k, micro_batch, iters, seed)
    out.mkdir(parents=True, exist_ok=True)
    (out / "over_training.json").write_text(json.dumps(result, indent=1) + "\n")
    plot(result, out / "over_training.png")
    c, k = result["num_classes"], result["k"]
    print(f"bigbatch spectrum {run_dir} --over-training: {len(result['checkpoints'])} checkpoints, Hessian of the training "
          f"loss over {result['examples']} examples in micro-batches of {result['micro_batch']} (train-mode BatchNorm)")
    print(f"  {'step':>8} {'loss':>8} {'lambda_1':>9} {'outliers':>8} {'top-1':>6} {f'top-{c}':>6} {f'top-{k}':>6} {'s':>5}")
    for p in result["checkpoints"]:
        loss = p["train_loss_logged"]
        cls = p["grad_fraction_classes"]
        print(f"  {p['step']:>8} {loss if loss is not None else float('nan'):>8.4f} {p['top_eigenvalues'][0]:>9.4g} "
              f"{p['outliers']:>8} {p['grad_fraction_by_k'][0]:>6.3f} {cls if cls is not None else float('nan'):>6.3f} "
              f"{p['grad_fraction_top_k']:>6.3f} {p['seconds']:>5.1f}")
    print(f"  seconds {result['seconds']:.1f}")
    print(f"wrote {out / 'over_training.json'} and {out / 'over_training.png'}")
    return 0
