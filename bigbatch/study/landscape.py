"""`bigbatch interpolate RUN_A RUN_B`: loss and accuracy on the straight line between two solutions.

theta(t) = (1 - t) theta_A + t theta_B for t in [0, 1] (Goodfellow et al. 2015; Keskar et al.
2016 plot it between a small-batch and a large-batch solution). At every point the BatchNorm
running statistics are recomputed on training data (an average of the two runs' statistics
belongs to neither network). The barrier is the largest rise of the loss above the straight line
between the endpoint losses: max_t [L(t) - ((1 - t) L(0) + t L(1))] (Frankle et al. 2020); zero
means the two solutions are linearly connected.

Writes interpolation.json and interpolation.png into --out (default: beside RUN_A).
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from bigbatch import config, folders
from bigbatch.distributed.env import DistEnv
from bigbatch.errors import UsageError
from bigbatch.trainer import checkpoint as ckpt
from bigbatch.trainer.data import DataBundle, build_data, eval_batches
from bigbatch.trainer.evaluate import evaluate
from bigbatch.trainer.models import build_model

CONFIG, CHECKPOINT = folders.CONFIG, folders.CHECKPOINT
SAME_DATA_KEYS = ("name", "num_samples", "test_fraction", "seed", "num_features", "num_classes", "label_noise", "root")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("run_a", metavar="RUN_A", help="run folder (config.toml + checkpoint.pt), the t = 0 end")
    parser.add_argument("run_b", metavar="RUN_B", help="run folder, the t = 1 end (same model and data)")
    parser.add_argument("--points", type=int, default=25, help="points on the line, endpoints included (default 25)")
    parser.add_argument("--out", default=None, help="output folder (default: RUN_A/../interpolate-A-B)")
    parser.add_argument("--device", default="auto", help="auto (cuda if available), cpu, cuda")


def check_run(path: str, field: str) -> Path:
    p = Path(path)
    if not p.is_dir():
        raise UsageError(field, f"run folder {path!r} does not exist")
    for name in (CONFIG, CHECKPOINT):
        if not (p / name).is_file():
            raise UsageError(field, f"{path!r} has no {name} (is it a finished `bigbatch train` run?)")
    return p


def resolve_device(name: str) -> torch.device:
    """--device auto (cuda if available), cpu or cuda."""
    if name not in ("auto", "cpu", "cuda"):
        raise UsageError("--device", f"expected auto, cpu or cuda, got {name!r}")
    if name == "cuda" and not torch.cuda.is_available():
        raise UsageError("--device", "cuda requested but no GPU is available")
    return torch.device("cuda" if name != "cpu" and torch.cuda.is_available() else "cpu")


def interpolate_state(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor], t: float) -> dict[str, torch.Tensor]:
    """(1 - t) a + t b for floating-point entries; integer entries (BN step counters) from a."""
    return {k: torch.lerp(v, b[k].to(v.dtype), t) if v.is_floating_point() else v.clone() for k, v in a.items()}


def barrier(ts: list[float], losses: list[float]) -> float:
    """max_t [L(t) - ((1 - t) L(0) + t L(1))]: the rise above the chord between the endpoints."""
    l0, l1 = losses[0], losses[-1]
    return max(l - ((1 - t) * l0 + t * l1) for t, l in zip(ts, losses))


@torch.no_grad()
def recompute_bn(model: nn.Module, batches) -> bool:
    """Reset every BatchNorm's running statistics and re-estimate them (cumulative average) on
    `batches`. Returns False when the model has no BatchNorm."""
    bns = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    if not bns:
        return False
    saved = [m.momentum for m in bns]
    for m in bns:
        m.reset_running_stats()
        m.momentum = None  # cumulative moving average: every batch counts equally
    model.train()
    for x, _ in batches:
        model(x)
    for m, mom in zip(bns, saved):
        m.momentum = mom
    model.eval()
    return True


@dataclass
class Pair:
    """Two runs' solutions on one model and one data set, loaded for evaluation on `device`."""

    run_a: Path
    run_b: Path
    cfg: Any  # run A's config (the two agree on [model] and the data)
    state_a: dict[str, torch.Tensor]
    state_b: dict[str, torch.Tensor]
    bundle: DataBundle
    model: nn.Module
    device: torch.device


def load_pair(run_a: Path, run_b: Path, device: torch.device) -> Pair:
    """Both runs' final model states; UsageError (field RUN_B) when their [model] or data differ."""
    cfg_a, cfg_b = config.load(run_a / CONFIG), config.load(run_b / CONFIG)
    if config.to_dict(cfg_a)["model"] != config.to_dict(cfg_b)["model"]:
        raise UsageError("RUN_B", "the two runs have different [model] sections: their parameters cannot be interpolated")
    for k in SAME_DATA_KEYS:
        if getattr(cfg_a.data, k) != getattr(cfg_b.data, k):
            raise UsageError("RUN_B", f"the two runs were trained on different data (data.{k}: "
                                      f"{getattr(cfg_a.data, k)!r} vs {getattr(cfg_b.data, k)!r})")
    state_a = ckpt.load(run_a / CHECKPOINT, map_location=device)["model"]
    state_b = ckpt.load(run_b / CHECKPOINT, map_location=device)["model"]
    bundle = build_data(cfg_a.data)
    model = build_model(cfg_a.model, bundle.input_shape, bundle.num_classes).to(device)
    return Pair(run_a, run_b, cfg_a, state_a, state_b, bundle, model, device)


def grid(points: int) -> list[float]:
    """`points` evenly spaced values of t in [0, 1], both ends included."""
    return [i / (points - 1) for i in range(points)]


def evaluate_states(pair: Pair, states: Iterable[tuple[float, dict[str, torch.Tensor]]]) -> tuple[list[dict[str, float]], bool]:
    """Rows {t, train/test loss/acc} for each (t, model state), BatchNorm statistics re-estimated on
    training data at every point; and whether the model has BatchNorm."""
    env = DistEnv(0, 1, 0, 1, pair.device, None, False)
    rows, has_bn = [], False
    for t, state in states:
        pair.model.load_state_dict(state)
        has_bn = recompute_bn(pair.model, eval_batches(pair.bundle.train, 0, 1, 1024, pair.device,
                                                       pair.cfg.data.train_eval_samples))
        rows.append({"t": t, **evaluate(pair.model, pair.bundle, env, pair.cfg.data)})
    return rows, has_bn


def along(rows: list[dict[str, float]]) -> dict[str, Any]:
    """The curve and its train and test barriers."""
    ts = [r["t"] for r in rows]
    return {"curve": rows, "barrier_train_loss": barrier(ts, [r["train_loss"] for r in rows]),
            "barrier_test_loss": barrier(ts, [r["test_loss"] for r in rows])}


def endpoint_check(pair: Pair, rows: list[dict[str, float]]) -> dict[str, dict[str, Any]]:
    """Each end's test loss on the path beside the run's own (summary.json)."""
    ends = {}
    for end, run, row in (("a", pair.run_a, rows[0]), ("b", pair.run_b, rows[-1])):
        own = (folders.RunFolder(run).read_summary() or {}).get("test_loss")
        ends[end] = {"run_test_loss": own, "test_loss": row["test_loss"]}
    return ends


def interpolate_pair(pair: Pair, points: int) -> dict[str, Any]:
    """The straight line theta(t) = (1 - t) A + t B evaluated at `points` values of t."""
    rows, has_bn = evaluate_states(pair, ((t, interpolate_state(pair.state_a, pair.state_b, t)) for t in grid(points)))
    return {"run_a": str(pair.run_a), "run_b": str(pair.run_b), "points": points, "loss_mode": "eval",
            "bn_recomputed": has_bn, **along(rows), "endpoints": endpoint_check(pair, rows)}


def interpolate(run_a: Path, run_b: Path, points: int, device: torch.device) -> dict[str, Any]:
    return interpolate_pair(load_pair(run_a, run_b, device), points)


def plot(result: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ts = [r["t"] for r in result["curve"]]
    fig, (ax_l, ax_a) = plt.subplots(1, 2, figsize=(10, 4))
    for split, style in (("train", "-"), ("test", "--")):
        ax_l.plot(ts, [r[f"{split}_loss"] for r in result["curve"]], style, marker="o", ms=3, label=split)
        ax_a.plot(ts, [r[f"{split}_acc"] for r in result["curve"]], style, marker="o", ms=3, label=split)
    ax_l.set(xlabel="t  (0 = A, 1 = B)", ylabel="cross-entropy loss",
             title=f"barrier: train {result['barrier_train_loss']:.3g}, test {result['barrier_test_loss']:.3g}")
    ax_a.set(xlabel="t  (0 = A, 1 = B)", ylabel="accuracy")
    for ax in (ax_l, ax_a):
        ax.grid(alpha=0.3)
        ax.legend()
    fig.suptitle(f"A = {Path(result['run_a']).name}   B = {Path(result['run_b']).name}", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(args: argparse.Namespace) -> int:
    run_a, run_b = check_run(args.run_a, "RUN_A"), check_run(args.run_b, "RUN_B")
    if args.points < 2:
        raise UsageError("--points", f"must be >= 2 (the two endpoints), got {args.points}")
    device = resolve_device(args.device)
    out = Path(args.out) if args.out else run_a.parent / f"interpolate-{run_a.name}-{run_b.name}"

    result = interpolate(run_a, run_b, args.points, device)
    out.mkdir(parents=True, exist_ok=True)
    (out / "interpolation.json").write_text(json.dumps(result, indent=2) + "\n")
    plot(result, out / "interpolation.png")
    ends = result["endpoints"]
    # which loss these are: evaluate() runs the model in eval mode
    print("losses in eval mode" + (", BatchNorm statistics re-estimated on training data at every point"
                                   if result["bn_recomputed"] else "") + " (not the train-mode loss SGD follows)")
    print(f"{'t':>6} {'train_loss':>10} {'test_loss':>10} {'train_acc':>9} {'test_acc':>8}")
    for r in result["curve"]:
        print(f"{r['t']:6.3f} {r['train_loss']:10.4f} {r['test_loss']:10.4f} {r['train_acc']:9.4f} {r['test_acc']:8.4f}")
    print(f"barrier height: train loss {result['barrier_train_loss']:.4f}, test loss {result['barrier_test_loss']:.4f}")
    print(f"endpoints: A test_loss {ends['a']['test_loss']:.4f} (run: {ends['a']['run_test_loss']}), "
          f"B test_loss {ends['b']['test_loss']:.4f} (run: {ends['b']['run_test_loss']})")
    print(f"wrote {out / 'interpolation.json'} and {out / 'interpolation.png'}")
    return 0
