"""`bigbatch connect RUN_A RUN_B`: a trained curve between two solutions, its barrier beside the line's.

Garipov et al. 2018 ("Loss surfaces, mode connectivity, and fast ensembling of DNNs") and
Draxler et al. 2018 find that two solutions with a loss barrier on the straight line between
them are joined by a simple curve with (almost) none. This trains their quadratic Bezier curve

    theta(t) = (1 - t)^2 A + 2 t (1 - t) C + t^2 B,    t in [0, 1],

with the ends A, B fixed at the runs' parameters and only the control point C trained, starting
at the midpoint (A + B) / 2 (so the untrained curve is the straight line). Each step draws
t ~ U(0, 1) and a training mini-batch and takes a step on the run's own training loss (its
label smoothing included) at theta(t), through `torch.func.functional_call` so the gradient
reaches C (dtheta/dC = 2 t (1 - t)): a stochastic estimate of E_t L(theta(t)), the objective of
Garipov et al., eq. 2 with the uniform distribution on t. BatchNorm runs in train mode on the
mini-batch's statistics while the curve trains.

Optimiser: SGD with momentum 0.9 (what the endpoints were trained with in the presets, and what
Garipov et al. use for curves), no weight decay (the barrier is read on the plain loss; decay
would pull C towards the origin for a term the barrier does not count), the learning rate on a
cosine from --lr to 0 over --steps, so the last steps average out the noise of the t and
mini-batch draws instead of leaving C where the last draw threw it (Garipov et al. decay
linearly to 1 % for the same reason).

Evaluation is the one `bigbatch interpolate` uses (`landscape.evaluate_states`): at each of
--points values of t (endpoints included), BatchNorm running statistics re-estimated on training
data at that point, then train and test loss/accuracy in eval mode with plain cross-entropy.
The straight line is evaluated in the same command on the same grid, so the two barriers
(max_t of the rise above the chord between the endpoint losses, `landscape.barrier`) compare
like with like. Writes connect.json and connect.png into --out (default beside RUN_A).
"""

from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path
from typing import Any

import torch
from torch.func import functional_call

from bigbatch.distributed.env import torch_threads
from bigbatch.errors import UsageError
from bigbatch.study.landscape import (Pair, along, check_run, endpoint_check, evaluate_states, grid,
                                      interpolate_pair, interpolate_state, load_pair, resolve_device)
from bigbatch.trainer.data import TensorData, tensor_batch
from bigbatch.trainer.objective import TrainingLoss

MOMENTUM = 0.9
HISTORY_POINTS = 50  # the curve's training loss is kept as this many window means


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("run_a", metavar="RUN_A", help="run folder (config.toml + checkpoint.pt), the t = 0 end")
    parser.add_argument("run_b", metavar="RUN_B", help="run folder, the t = 1 end (same model and data)")
    parser.add_argument("--steps", type=int, default=2000, help="SGD steps on the control point (default 2000)")
    parser.add_argument("--batch", type=int, default=128, help="training examples per step (default 128)")
    parser.add_argument("--lr", type=float, default=0.05,
                        help="peak learning rate of the control point, cosine to 0 (default 0.05)")
    parser.add_argument("--points", type=int, default=25, help="points evaluated on each path, endpoints included (default 25)")
    parser.add_argument("--seed", type=int, default=0, help="seeds the t and mini-batch draws (default 0)")
    parser.add_argument("--out", default=None, help="output folder (default: RUN_A/../connect-A-B)")
    parser.add_argument("--device", default="auto", help="auto (cuda if available), cpu, cuda")


def bezier_weights(t: float) -> tuple[float, float, float]:
    """The quadratic Bernstein weights of A, C and B at t."""
    return (1 - t) ** 2, 2 * t * (1 - t), t ** 2


def bezier_point(a: dict[str, torch.Tensor], c: dict[str, torch.Tensor], b: dict[str, torch.Tensor],
                 t: float) -> dict[str, torch.Tensor]:
    """(1 - t)^2 a + 2 t (1 - t) c + t^2 b, entry by entry (differentiable in c)."""
    wa, wc, wb = bezier_weights(t)
    return {k: wa * a[k] + wc * c[k] + wb * b[k] for k in c}


def curve_state(pair: Pair, control: dict[str, torch.Tensor], t: float) -> dict[str, torch.Tensor]:
    """A full state dict at t: parameters on the curve (a tied alias takes its parameter's value),
    buffers on the line (BatchNorm's are re-estimated by the evaluation anyway)."""
    state = interpolate_state(pair.state_a, pair.state_b, t)
    with torch.no_grad():
        point = bezier_point(pair.state_a, control, pair.state_b, t)
    first: dict[int, str] = {}  # id(parameter) -> the name the control point has for it (named_parameters' first)
    for name, param in pair.model.named_parameters(remove_duplicate=False):
        state[name] = point[first.setdefault(id(param), name)]
    return state


def cosine_lr(step: int, steps: int, peak: float) -> float:
    """peak * (1 + cos(pi * step / steps)) / 2: peak at step 0, 0 after the last step."""
    return peak * 0.5 * (1 + math.cos(math.pi * step / steps))


def train_curve(pair: Pair, steps: int, batch: int, lr: float, seed: int) -> tuple[dict[str, torch.Tensor], list[dict[str, float]]]:
    """The trained control point C and the training loss history [{step, loss}] (window means,
    train-mode BatchNorm, the run's loss with its label smoothing)."""
    cfg, model, device = pair.cfg, pair.model, pair.device
    names = [n for n, _ in model.named_parameters()]
    a = {n: pair.state_a[n].detach() for n in names}
    b = {n: pair.state_b[n].detach() for n in names}
    control = {n: ((a[n] + b[n]) / 2).clone().requires_grad_(True) for n in names}
    # train-mode BatchNorm updates running statistics in place: give it copies nobody reads
    buffers = {n: buf.detach().clone() for n, buf in model.named_buffers()}
    opt = torch.optim.SGD(list(control.values()), lr=lr, momentum=MOMENTUM)
    loss_fn = TrainingLoss(cfg.train.label_smoothing, cfg.train.ignore_index)
    gen = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)  # augmentation draws
    n = len(pair.bundle.train)
    window = max(1, steps // HISTORY_POINTS)
    history, acc = [], []
    model.train()
    for step in range(steps):
        for group in opt.param_groups:
            group["lr"] = cosine_lr(step, steps, lr)
        t = torch.rand((), generator=gen).item()
        x, y = tensor_batch(pair.bundle.train, torch.randperm(n, generator=gen)[:batch], device, train=True)
        loss = loss_fn(functional_call(model, {**bezier_point(a, control, b, t), **buffers}, (x,)), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        acc.append(loss.item())
        if len(acc) == window or step == steps - 1:
            history.append({"step": step + 1, "loss": sum(acc) / len(acc)})
            acc = []
    return {k: v.detach() for k, v in control.items()}, history


def connect(pair: Pair, steps: int, batch: int, lr: float, seed: int, points: int) -> dict[str, Any]:
    if not isinstance(pair.bundle.train, TensorData):
        raise UsageError("data.name", f"bigbatch connect draws its own mini-batches: needs an in-memory dataset, "
                         f"not {pair.cfg.data.name!r}")
    if batch > len(pair.bundle.train):
        raise UsageError("--batch", f"must be <= the {len(pair.bundle.train)} training examples, got {batch}")
    t0 = time.perf_counter()
    line = interpolate_pair(pair, points)
    t1 = time.perf_counter()
    control, history = train_curve(pair, steps, batch, lr, seed)
    t2 = time.perf_counter()
    rows, _ = evaluate_states(pair, ((t, curve_state(pair, control, t)) for t in grid(points)))
    t3 = time.perf_counter()
    return {
        "run_a": line["run_a"], "run_b": line["run_b"], "points": points, "loss_mode": "eval",
        "bn_recomputed": line["bn_recomputed"],
        "training": {"curve": "quadratic bezier", "trained": "control point C, from (A + B) / 2",
                     "t_distribution": "uniform", "steps": steps, "batch": batch, "lr": lr, "seed": seed,
                     "optimizer": f"sgd momentum {MOMENTUM}, no weight decay", "schedule": "cosine to 0",
                     "loss": "training loss, train-mode BatchNorm",
                     "label_smoothing": pair.cfg.train.label_smoothing, "loss_history": history},
        "line": {k: line[k] for k in ("curve", "barrier_train_loss", "barrier_test_loss")},
        "bezier": along(rows),
        "endpoints": endpoint_check(pair, rows),
        "time_s": {"line": t1 - t0, "train": t2 - t1, "bezier": t3 - t2},
    }


def plot(result: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax_l, ax_a, ax_h) = plt.subplots(1, 3, figsize=(14, 4))
    for path_name, color in (("line", "tab:gray"), ("bezier", "tab:blue")):
        rows = result[path_name]["curve"]
        ts = [r["t"] for r in rows]
        for split, style in (("train", "-"), ("test", "--")):
            label = f"{path_name} {split}"
            ax_l.plot(ts, [r[f"{split}_loss"] for r in rows], style, color=color, marker="o", ms=3, label=label)
            ax_a.plot(ts, [r[f"{split}_acc"] for r in rows], style, color=color, marker="o", ms=3, label=label)
    line, bez = result["line"], result["bezier"]
    ax_l.set(xlabel="t  (0 = A, 1 = B)", ylabel="cross-entropy loss (eval mode)",
             title=f"barrier train/test: line {line['barrier_train_loss']:.3g}/{line['barrier_test_loss']:.3g}, "
                   f"curve {bez['barrier_train_loss']:.3g}/{bez['barrier_test_loss']:.3g}")
    ax_l.title.set_fontsize(9)
    ax_a.set(xlabel="t  (0 = A, 1 = B)", ylabel="accuracy")
    hist = result["training"]["loss_history"]
    ax_h.plot([h["step"] for h in hist], [h["loss"] for h in hist])
    ax_h.set(xlabel="step", ylabel="training loss at theta(t), t ~ U(0,1)", title="curve training")
    for ax in (ax_l, ax_a, ax_h):
        ax.grid(alpha=0.3)
    ax_l.legend(fontsize=8)
    fig.suptitle(f"A = {Path(result['run_a']).name}   B = {Path(result['run_b']).name}", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def check_options(args: argparse.Namespace) -> None:
    if args.steps < 1:
        raise UsageError("--steps", f"must be >= 1, got {args.steps}")
    if args.batch < 2:
        raise UsageError("--batch", f"must be >= 2 (BatchNorm needs two examples), got {args.batch}")
    if not (math.isfinite(args.lr) and args.lr > 0):
        raise UsageError("--lr", f"must be a finite number > 0, got {args.lr}")
    if args.points < 2:
        raise UsageError("--points", f"must be >= 2 (the two endpoints), got {args.points}")
    if args.seed < 0:
        raise UsageError("--seed", f"must be >= 0, got {args.seed}")


def main(args: argparse.Namespace) -> int:
    run_a, run_b = check_run(args.run_a, "RUN_A"), check_run(args.run_b, "RUN_B")
    check_options(args)
    device = resolve_device(args.device)
    out = Path(args.out) if args.out else run_a.parent / f"connect-{run_a.name}-{run_b.name}"

    with torch_threads(1, unless_omp=True):  # thousands of small steps (70x slower on 2 threads, busy 2-core VM)
        result = connect(load_pair(run_a, run_b, device), args.steps, args.batch, args.lr, args.seed, args.points)
    out.mkdir(parents=True, exist_ok=True)
    (out / "connect.json").write_text(json.dumps(result, indent=2) + "\n")
    plot(result, out / "connect.png")
    print("losses in eval mode" + (", BatchNorm statistics re-estimated on training data at every point"
                                   if result["bn_recomputed"] else "") + "; barrier = max rise above the chord")
    print(f"{'t':>6} {'line train':>10} {'curve train':>11} {'line test':>9} {'curve test':>10} {'curve test_acc':>14}")
    for r_line, r_bez in zip(result["line"]["curve"], result["bezier"]["curve"]):
        print(f"{r_line['t']:6.3f} {r_line['train_loss']:10.4f} {r_bez['train_loss']:11.4f} "
              f"{r_line['test_loss']:9.4f} {r_bez['test_loss']:10.4f} {r_bez['test_acc']:14.4f}")
    line, bez, secs = result["line"], result["bezier"], result["time_s"]
    print(f"barrier, straight line: train loss {line['barrier_train_loss']:.4f}, test loss {line['barrier_test_loss']:.4f}")
    print(f"barrier, Bezier curve:  train loss {bez['barrier_train_loss']:.4f}, test loss {bez['barrier_test_loss']:.4f}")
    print(f"time: curve training {secs['train']:.1f} s ({args.steps} steps), evaluation {secs['line'] + secs['bezier']:.1f} s")
    print(f"wrote {out / 'connect.json'} and {out / 'connect.png'}")
    return 0
