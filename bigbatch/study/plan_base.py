"""The plan's base run: S0, the steps to the target at the config's batch B0, at B0's best lr.

The plan anchors S(B) at the base run's own steps (S(B0) = S0 exactly), and a sweep compares
every batch at its *best* lr. A base run at a worse lr than B0's best hands its handicap to every
predicted batch: on the MNIST-1D MLP the config's lr (0.1 per 128) took 384 steps to 65 % where
the sweep's best at 128 (0.2) took 261, and every predicted batch came out 39-72 % high. So the
short run is an lr search (`--base-lr-search`, default x0.5, x1, x2 of the config's lr, each run
to the target) and keeps the fastest; when the fastest is at an edge of the grid, one more factor
of 2 beyond it, until it is not (within 1/16-16: the branches' rule). The factors nearest x1 run
first, and a later run stops ("slower") at its first evaluation past the fastest crossing so far
without the target: it cannot win, so its remaining steps would be spent for nothing. Keeping the
best of a few single-seed runs biases S0 down by a little, as the sweep's best-lr medians are.

S0 is the crossing interpolated between the evaluations around the target (`critical.crossing`),
as the sweep reads its trials, not the step of the first evaluation past it; the short run also
evaluates more often near the target (train.eval_fine, the study's 0.03, when the config has none).
"""

from __future__ import annotations

import dataclasses
import math
import sys
import time
from pathlib import Path
from typing import Any

from bigbatch import config as config_mod
from bigbatch import folders
from bigbatch.distributed.env import torch_threads
from bigbatch.errors import UsageError
from bigbatch.study import branch_runs as bx
from bigbatch.study import plan_noise as pn
from bigbatch.study.records import eval_row, metric_crossing
from bigbatch.trainer import loop
from bigbatch.trainer.evaluate import reached_target

EVAL_EVERY_EXAMPLES = 4096
TRAIN_EVAL_SAMPLES = 1000
EVAL_FINE = 0.03  # the study's: the interpolated crossing known to ~3 %
DEFAULT_LR_FACTORS = "0.5,1,2"
LR_FACTOR_RANGE = (1 / 16, 16)


def parse_factors(text: str) -> list[float]:
    """`--base-lr-search`: a comma list of positive lr factors (1 alone: no search)."""
    try:
        values = sorted({float(v) for v in text.split(",") if v.strip()})
    except ValueError:
        raise UsageError("--base-lr-search", f"expected a comma list of lr factors such as 0.5,1,2, got {text!r}") from None
    lo, hi = LR_FACTOR_RANGE
    if not values or not all(lo <= v <= hi for v in values):
        raise UsageError("--base-lr-search", f"factors must lie in [1/16, 16], got {text!r}")
    return values


def short_run_config(cfg, eval_every: int | None, noise: bool = True, branching: bool = False):
    """The config of the short run (see `bigbatch.study.plan`'s docstring)."""
    b0 = cfg.batch.global_batch
    accum = cfg.batch.accum_steps
    if noise and accum in (None, 1):
        if b0 % 2:
            raise UsageError("batch.global_batch", f"the noise scale needs two micro-batches per step; {b0} is odd "
                             "(set an even batch, or batch.accum_steps)")
        accum = 2
    every = eval_every or max(1, min(cfg.train.eval_every or math.inf, math.ceil(EVAL_EVERY_EXAMPLES / b0)))
    train = dataclasses.replace(cfg.train, stop_at_target=True, eval_every=every, eval_fine=cfg.train.eval_fine or EVAL_FINE,
                                log_every=min(cfg.train.log_every, max(1, every // 4)))
    # the target is on the test set; the train-subset evaluation only reports, so keep it small
    data = dataclasses.replace(cfg.data, train_eval_samples=min(cfg.data.train_eval_samples or TRAIN_EVAL_SAMPLES,
                                                                TRAIN_EVAL_SAMPLES))
    out = dataclasses.replace(cfg, train=train, data=data, batch=dataclasses.replace(cfg.batch, accum_steps=accum))
    if noise:
        out = dataclasses.replace(out, measure=dataclasses.replace(cfg.measure, gns=True, gns_every=1))
    return bx.base_run_config(out, every) if branching else out


def with_lr_factor(cfg, factor: float):
    return dataclasses.replace(cfg, optim=dataclasses.replace(cfg.optim, base_lr=cfg.optim.base_lr * factor))


def _targets(cfg) -> list[tuple[str, float]]:
    """(metric, value) of each target set; a run reaches its target when it meets any of them."""
    t = cfg.target
    return [(k, v) for k, v in (("test_acc", t.test_acc), ("train_acc", t.train_acc), ("test_loss", t.test_loss)) if v is not None]


def target_crossing(cfg, rows: list[dict[str, Any]]) -> float | None:
    """Steps to the config's target, interpolated between the evaluations around it (the sweep's
    reading, `records.metric_crossing`; with several targets, the first met); None when no
    evaluation reached it."""
    found = [c["steps"] for c in (metric_crossing(rows, k, v) for k, v in _targets(cfg)) if c]
    return min(found) if found else None


def read_run(run_dir: str, noise: bool = True) -> dict:
    """An existing run folder as a base run; UsageError naming what is missing (the noise
    history only when `noise`)."""
    d = folders.RunFolder(run_dir)
    if not d.path.is_dir():
        raise UsageError("--from", f"{run_dir!r} is not a folder")
    for path in (d.metrics, d.config, d.summary):
        if not path.is_file():
            raise UsageError("--from", f"{run_dir!r} has no {path.name} (a run folder of `bigbatch train`)")
    cfg = config_mod.load(d.config)
    summary = d.read_summary()
    if summary.get("steps_to_target") is None:
        raise UsageError("--from", f"the run in {run_dir!r} did not reach its target (summary.json steps_to_target is null)")
    if cfg.batch.adaptive != "none" or cfg.batch.phases:
        raise UsageError("--from", "the run changed its batch during training; the plan needs one fixed batch")
    rows = d.read_metrics()
    history = pn.noise_history(rows)
    if noise and not history:
        raise UsageError("--from", f"{run_dir!r}/metrics.jsonl has no gns/b_simple rows (train with measure.gns = true)")
    b0 = int(cfg.batch.global_batch)
    return {"cfg": cfg, "run_dir": str(d.path), "steps": target_crossing(cfg, rows) or float(summary["steps_to_target"]),
            "wall_s": summary.get("wall_s") or 0.0, "examples": summary.get("examples") or summary["steps_to_target"] * b0,
            "batch": b0, "history": history, "lr_search": None}


def slower_than(cfg, cap: float):
    """A stop rule: "slower" at the first evaluation past step `cap` that is short of the target
    (its crossing, if any, lies beyond that evaluation, so beyond `cap`)."""

    def rule(row: dict[str, Any]) -> dict[str, Any] | None:
        if not eval_row(row) or row["step"] <= cap or reached_target(cfg.target, row):
            return None
        return {"status": "slower", "steps_lower_bound": int(row["step"]), "raced_against": cap}

    return rule


def search(run_cfg, out_dir: Path, factors: list[float], threads: int) -> dict[str, Any] | None:
    """The short run at each lr factor (to the target), the fastest kept; see the module docstring.
    Returns the base run (as `read_run`) with `lr_search` (every run tried, in order) and
    `lr_factor`, or None when no run reached the target."""
    tried: dict[float, dict[str, Any]] = {}
    single = factors == [1.0]

    def one(f: float) -> None:
        cfg = with_lr_factor(run_cfg, f)
        run_dir = out_dir if single else out_dir / f"lr-x{f:g}"
        best = fastest()
        cap = tried[best]["steps_to_target"] if best is not None else None
        print(f"short run: {cfg.name} at batch {cfg.batch.global_batch}, lr x{f:g} ({cfg.optim.base_lr:.4g} per "
              f"{cfg.optim.base_batch}) to the target (eval every {cfg.train.eval_every} steps"
              + (f"; stopped if short of it past step {cap:.1f}" if cap else "") + f") -> {run_dir}",
              file=sys.stderr, flush=True)
        t = time.perf_counter()
        with torch_threads(threads, cpu_only=True):
            summary = loop.run(cfg, run_dir, stop_rule=slower_than(cfg, cap) if cap else None)
        rows = folders.RunFolder(run_dir).read_metrics()
        reached = summary.get("steps_to_target") is not None
        tried[f] = {"factor": f, "lr": cfg.optim.base_lr, "run_dir": str(run_dir), "status": summary["status"],
                    "steps_to_target": target_crossing(cfg, rows) if reached else None,
                    "steps_to_target_eval": summary.get("steps_to_target"), "steps": summary["steps"],
                    "examples": summary["examples"], "wall_s": time.perf_counter() - t,
                    "test_acc": summary.get("test_acc"), "cfg": cfg, "rows": rows}

    def fastest() -> float | None:
        ok = {f: r["steps_to_target"] for f, r in tried.items() if r["steps_to_target"] is not None}
        return min(ok, key=ok.get) if ok else None

    for f in sorted(factors, key=lambda f: (abs(math.log2(f)), f)):  # x1 first: the cap for the others
        one(f)
    lo, hi = LR_FACTOR_RANGE
    while not single:  # the fastest at an edge of what was tried: one more factor of 2 beyond it
        best = fastest()
        nxt = None if best is None else best / 2 if best == min(tried) else best * 2 if best == max(tried) else None
        if nxt is None or not lo <= nxt <= hi:
            break
        one(nxt)
    best = fastest()
    runs = [{k: v for k, v in r.items() if k not in ("cfg", "rows")} for _, r in sorted(tried.items())]
    if best is None:
        return {"reached": False, "lr_search": runs}
    r = tried[best]
    return {"reached": True, "cfg": r["cfg"], "run_dir": r["run_dir"], "steps": r["steps_to_target"], "lr_factor": best,
            "wall_s": sum(x["wall_s"] for x in runs), "examples": sum(x["examples"] for x in runs),
            "batch": r["cfg"].batch.global_batch, "history": pn.noise_history(r["rows"]), "lr_search": runs}


def search_line(run: dict[str, Any]) -> str | None:
    """What `bigbatch plan` prints about the lr search (None without one)."""
    runs = run.get("lr_search")
    if not runs or len(runs) < 2:
        return None
    parts = [f"x{r['factor']:g} " + (f"{r['steps_to_target']:.1f}" if r["steps_to_target"] is not None
                                     else f"> {r['steps']} ({r['status']})") for r in runs]
    return (f"base run lr search (steps to target at B0): {', '.join(parts)}; kept x{run['lr_factor']:g} "
            f"(lr {run['cfg'].optim.base_lr:.4g} per {run['cfg'].optim.base_batch}): the branches, the table and a written "
            f"ramp use it")
