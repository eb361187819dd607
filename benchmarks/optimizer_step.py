"""Claim: a LARS, LARC or LAMB step costs at most 1.5x torch's multi-tensor SGD / AdamW step.

Evidence: ResNet-50's parameters (torchvision, 161 tensors, 25.6 M values) split into bigbatch's
groups (weight decay 1e-4 on conv/linear weights; BatchNorm and biases without decay or
adaptation), one fixed random gradient per tensor; every optimizer on its own copy of the
parameters, momentum 0.9. Baselines: `torch.optim.SGD(foreach=True)` (for LARS and LARC) and
`torch.optim.AdamW(foreach=True)` (for LAMB). After `--warmup` untimed steps each (the first
allocates the momentum / Adam state), a repeat is `--steps` rounds; a round steps every
optimizer once, in an order that rotates from round to round, so an optimizer and its baseline
run a fraction of a second apart and a load change on a shared machine falls on both. A
repeat's ratio is the median over its rounds of ours / baseline in the same round; `ratio` is
the median over repeats (with min..max). On CUDA the steps are timed with CUDA events. On the
CPU the default is one torch thread: two threads on 2 shared cores wait on each other and on
other jobs, which multiplies the spread, and the step is memory-bound anyway.

    python benchmarks/optimizer_step.py [--device cpu|cuda] [--repeats 7] [--steps 9] [--threads N] [--json FILE]

Prints one JSON object (ratios with their per-repeat values and min..max).
"""

from __future__ import annotations

import argparse
import copy
import statistics
import time
from typing import Callable

import torch
from _report import emit, spread

from bigbatch.trainer.optim import LAMB, LARS, param_groups

LR, MOMENTUM, WEIGHT_DECAY = 0.1, 0.9, 1e-4
TARGET = 1.5  # issue 29: ours / foreach baseline


def _optimizers() -> dict[str, tuple[Callable, str | None]]:
    """name -> (build from param groups, the baseline it is compared with)."""
    return {
        "sgd_foreach": (lambda g: torch.optim.SGD(g, lr=LR, momentum=MOMENTUM, foreach=True), None),
        "adamw_foreach": (lambda g: torch.optim.AdamW(g, lr=LR, foreach=True), None),
        "lars": (lambda g: LARS(g, lr=LR, momentum=MOMENTUM), "sgd_foreach"),
        "larc": (lambda g: LARS(g, lr=LR, momentum=MOMENTUM, clip=True, trust_coefficient=0.02), "sgd_foreach"),
        "lamb": (lambda g: LAMB(g, lr=LR), "adamw_foreach"),
    }


def _setup(build: Callable, model: torch.nn.Module, grads: list[torch.Tensor]) -> torch.optim.Optimizer:
    """The optimizer over a fresh copy of `model`, its gradients set (weight decay per group)."""
    mine = copy.deepcopy(model)
    for p, g in zip(mine.parameters(), grads):
        p.grad = g.clone()
    return build(param_groups(mine, WEIGHT_DECAY))


def _time_step(opt: torch.optim.Optimizer, device: torch.device) -> float:
    """Seconds of one `opt.step()`."""
    if device.type == "cuda":
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        opt.step()
        end.record()
        end.synchronize()
        return start.elapsed_time(end) / 1e3
    t0 = time.perf_counter()
    opt.step()
    return time.perf_counter() - t0


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", default="cpu")
    p.add_argument("--repeats", type=int, default=7)
    p.add_argument("--steps", type=int, default=9, help="timed rounds (one step of every optimizer) per repeat")
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: 1 on the CPU, torch's on CUDA)")
    p.add_argument("--model", default="resnet50", help="a torchvision model name (default resnet50)")
    p.add_argument("--json", default=None, help="also write the JSON object to this file")
    args = p.parse_args()
    device = torch.device(args.device)
    if args.threads or device.type == "cpu":
        torch.set_num_threads(args.threads or 1)
    import torchvision

    torch.manual_seed(0)
    model = torchvision.models.get_model(args.model, weights=None).to(device)
    grads = [torch.randn_like(p) * 1e-2 for p in model.parameters()]
    specs = _optimizers()
    opts = {name: _setup(build, model, grads) for name, (build, _) in specs.items()}
    for opt in opts.values():
        for _ in range(args.warmup):
            opt.step()
    names = list(opts)
    # times[name][repeat][round]
    times: dict[str, list[list[float]]] = {n: [[] for _ in range(args.repeats)] for n in names}
    for r in range(args.repeats):
        for k in range(args.steps):
            shift = (r * args.steps + k) % len(names)
            for name in names[shift:] + names[:shift]:
                times[name][r].append(_time_step(opts[name], device))
    ratios = {}
    for name, (_, base) in specs.items():
        if base is None:
            continue
        each = [statistics.median(a / b for a, b in zip(ours, theirs)) for ours, theirs in zip(times[name], times[base])]
        ratios[f"{name}/{base}"] = spread(each)
    emit({
        "benchmark": "optimizer_step", "model": args.model,
        "tensors": len(grads), "parameters": sum(g.numel() for g in grads), "device": str(device),
        "step_ms_median": {n: round(statistics.median(x for rep in t for x in rep) * 1e3, 3) for n, t in times.items()},
        "ratios": ratios, "target": TARGET,
        "met": all(v["median"] <= TARGET for v in ratios.values()),
        "repeats": args.repeats, "steps": args.steps,
    }, device, args.json)


if __name__ == "__main__":
    main()
