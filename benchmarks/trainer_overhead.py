"""Claim: bigbatch's training loop costs (almost) nothing over a bare PyTorch loop.

Evidence: same model, data, batch, optimizer and lr schedule, one process on the CPU; both loops
timed in the same process, interleaved (bare, bigbatch, bigbatch, bare, ...: the order alternates
so drift within a pair cancels), from the first
logged step to the last one (excludes start-up and the final evaluation, includes everything
bigbatch does per step: sharding, lr schedule, loss bookkeeping, logging to metrics.jsonl).
Prints one JSON object; `ratio` = bigbatch samples/s / bare samples/s (issue 16: >= 0.98).

    python benchmarks/trainer_overhead.py [--model mlp|cnn1d] [--steps 1000] [--repeats 15]

Single repeats scatter by ±10-15 % on a shared 2-core VM, so the defaults take 15 of them.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import tempfile
import time

import torch
from torch import nn

from bigbatch import config
from bigbatch.trainer.data import build_data
from bigbatch.trainer.loop import run
from bigbatch.trainer.models import build_model
from bigbatch.trainer.recipe import Schedule

WARM = 50  # steps before timing starts, in both loops


def bare_loop(cfg, bundle) -> float:
    """The loop a user would write by hand: samples/s over steps WARM..end."""
    torch.manual_seed(cfg.train.seed)
    model = build_model(cfg.model, bundle.input_shape, bundle.num_classes)
    sched = Schedule(cfg, len(bundle.train))
    opt = torch.optim.SGD(model.parameters(), lr=sched.lr_at(0), momentum=cfg.optim.momentum,
                          weight_decay=cfg.optim.weight_decay)
    loss_fn = nn.CrossEntropyLoss()
    x_all, y_all = bundle.train.x, bundle.train.y
    b, n = cfg.batch.global_batch, len(bundle.train)
    perm, pos, t0 = torch.randperm(n), 0, None
    model.train()
    for step in range(sched.total_steps):
        if step == WARM:
            t0 = time.perf_counter()
        if pos + b > n:
            perm, pos = torch.randperm(n), 0
        idx = perm[pos:pos + b]
        pos += b
        for g in opt.param_groups:
            g["lr"] = sched.lr_at(step)
        loss = loss_fn(model(x_all[idx]), y_all[idx])
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        if (step + 1) % cfg.train.log_every == 0:
            loss.item()  # the bare loop prints its loss too
    return (sched.total_steps - WARM) * b / (time.perf_counter() - t0)


def bigbatch_loop(cfg) -> float:
    stamps: dict[int, tuple[float, int]] = {}

    def reporter(row):
        if "loss" in row:
            stamps[row["step"]] = (time.perf_counter(), row["examples"])

    with tempfile.TemporaryDirectory() as d:
        run(cfg, d, reporter=reporter)
    first = min(s for s in stamps if s >= WARM)
    last = max(stamps)
    (t0, e0), (t1, e1) = stamps[first], stamps[last]
    return (e1 - e0) / (t1 - t0)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="mlp", choices=["mlp", "cnn1d"])
    p.add_argument("--steps", type=int, default=1000)
    p.add_argument("--batch", type=int, default=128)
    p.add_argument("--repeats", type=int, default=15)
    args = p.parse_args()
    cfg = config.load(None, [
        "data.name='mnist1d'", "data.num_samples=20000", f"model.name='{args.model}'", f"batch.global_batch={args.batch}",
        "optim.name='sgd'", "optim.weight_decay=5e-4", "optim.exclude_bn_bias=false", "schedule.name='cosine'",
        f"train.steps={args.steps}", "train.eval_every=0", "train.log_every=10", "train.amp='off'",
        "track.progress='off'", "data.train_eval_samples=1000",
    ])
    bundle = build_data(cfg.data)
    import logging

    logging.getLogger("bigbatch").setLevel(logging.WARNING)
    bare, ours = [], []
    for i in range(args.repeats):
        # the order alternates: whichever loop runs first in a pair would otherwise carry any drift
        for which in (("bare", "ours") if i % 2 == 0 else ("ours", "bare")):
            if which == "bare":
                bare.append(bare_loop(cfg, bundle))
            else:
                ours.append(bigbatch_loop(cfg))
                logging.getLogger("bigbatch").handlers.clear()
    result = {
        "benchmark": "trainer_overhead",
        "model": args.model, "global_batch": args.batch, "steps": args.steps, "repeats": args.repeats,
        "bare_samples_per_s": statistics.median(bare), "bigbatch_samples_per_s": statistics.median(ours),
        "ratio": statistics.median(ours) / statistics.median(bare),
        "ratio_per_repeat": [o / b for o, b in zip(ours, bare)],
        "median_ratio_per_repeat": statistics.median(o / b for o, b in zip(ours, bare)),
        "torch": torch.__version__, "threads": torch.get_num_threads(), "cpu": platform.processor() or platform.machine(),
    }
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
