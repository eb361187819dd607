"""The critical batch along one run, measured by branching (Merrill et al. 2025); `bigbatch plan`'s
default statistical side. The arithmetic is `bigbatch.study.branching`.

1. A base run at the config's batch B0 to the target, checkpointing every `checkpoint_every`
   steps (`bigbatch plan` runs it; `--from RUN_DIR` reuses one that has checkpoints).
2. At `points` checkpoints spread over its examples to the target (the ones nearest (i + 1/2) / n
   of them), short branches at k x B0, k = 1, 2, 4, ..., each over the *same* window of W examples
   (W = window_steps x B0, by default the largest power of 2 within a segment: the branch at k x B0
   takes window_steps / k steps and sees the very examples the base run saw next). Doubling stops after the first k whose loss decrease per
   example fell below half of k = 1's (efficiency has clearly dropped), or when a branch would get
   fewer than MIN_BRANCH_STEPS steps.
3. lr: the base run's lr at the branch point, scaled from B0 to k x B0 by the config's rule
   (optim.scaling), times each of `lr_factors` (default x0.5, x1, x2) around a centre, held
   constant over the window; when the best is at the edge of those, one more factor of 2 beyond
   it, until it is not (within 1/16-16; when no factor tried made progress, half the smallest:
   the loss rose at every lr tried, so the lr is too high); the factor with the largest decrease
   is kept (a best-of-several on a noisy decrease: a small upward bias, the same at every k). The
   centre is the factor chosen at k / 2 (at k = 1: the one chosen at k = 1 of the previous point,
   1 at the first): the best lr moves smoothly with the batch, so a grid centred where it was
   needs fewer extensions (67 branches instead of 81 on the MNIST-1D MLP, docs/plan.md).
4. Momentum: a branch starts from the checkpoint's optimizer state (`Checkpointer.branch_from`):
   SGD's momentum buffer (Adam's moments) as the base run left it, i.e. the velocity of steps at
   B0 and the base lr. At k > 1 the first few steps still carry it (a decay of 1 / (1 - momentum)
   steps, 10 at 0.9); over window_steps / k steps that is a visible share at the largest k, and it
   is the same continuation a real batch ramp makes at a phase change.
5. Progress is the decrease of the **test loss** (plain cross-entropy, BatchNorm in eval mode: the
   loss the target is measured on) per example over the first `eval_examples` of the test set,
   from the checkpoint to the branch's end. Its noise is the per-example scatter: the interval of
   B_c(t) is a bootstrap over those examples. Each branch is one SGD run, so the branches' own
   trajectory noise is not in the interval.
6. Segments between the checkpoints (boundaries halfway between them, the first from 0, the last
   at the base run's examples to the target) carry each checkpoint's B_c; `branching.Segments`
   integrates them to S(B), E(B) and the global B_crit, with an interval from the joint bootstrap.

Everything trained is counted: the base run's examples (to its end, which is the target; every
run of `bigbatch plan`'s base-run lr search) and every branch's, lr search included, with the wall
time of each part.
"""

from __future__ import annotations

import dataclasses
import math
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from bigbatch import folders
from bigbatch.errors import UsageError
from bigbatch.study import branching as br
from bigbatch.trainer import checkpoint as ckpt
from bigbatch.trainer import loop
from bigbatch.trainer.data import build_data, eval_batches
from bigbatch.trainer.models import build_model
from bigbatch.trainer.objective import example_losses
from bigbatch.trainer.recipe import Schedule, beta2_for_batch, scaled_lr

DEFAULT_POINTS = 4
MIN_WINDOW_STEPS = 32  # at B0: k = 8 still gets MIN_BRANCH_STEPS steps
DEFAULT_EVAL_EXAMPLES = 4000
DEFAULT_LR_FACTORS = (0.5, 1.0, 2.0)
MIN_BRANCH_STEPS = 4
DROPPED = 0.5  # efficiency relative to k = 1 below which doubling stops
LR_FACTOR_RANGE = (1 / 16, 16)


def base_checkpoints(run_dir: str | Path, key: str = "--from") -> list[tuple[int, Path]]:
    """(step, file) of every step checkpoint of a run, oldest first; UsageError naming the run
    when it has none (the branches start from them)."""
    found = []
    d = Path(run_dir)
    if d.is_dir():
        for p in d.iterdir():
            m = folders.CHECKPOINT_STEP.match(p.name)
            if m and p.is_file():
                found.append((int(m.group(1)), p))
    if not found:
        raise UsageError(key, f"the run in {str(run_dir)!r} has no step checkpoints (checkpoint-<step>.pt) to branch "
                              "from; train it with checkpoint.every > 0 and checkpoint.keep large enough")
    return sorted(found)


def base_run_config(cfg, checkpoint_every: int):
    """The base run keeps every checkpoint: the branches start from them."""
    return dataclasses.replace(cfg, checkpoint=dataclasses.replace(cfg.checkpoint, every=checkpoint_every, keep=10 ** 6))


def choose_points(checkpoints: list[tuple[int, Path]], s0: int, points: int) -> list[tuple[int, Path]]:
    """The checkpoints nearest (i + 1/2) / points of the steps to the target (distinct, before it)."""
    usable = [(s, p) for s, p in checkpoints if 0 < s < s0]
    chosen: list[tuple[int, Path]] = []
    for i in range(points):
        want = (i + 0.5) / points * s0
        best = min(usable, key=lambda c: abs(c[0] - want), default=None)
        if best is not None and best not in chosen:
            chosen.append(best)
    return sorted(chosen)


def branch_config(cfg, batch: int, lr: float, steps: int):
    """One branch: `steps` steps at `batch`, constant lr `lr`, no evaluations but the last, no
    noise measurement, a final checkpoint only. The lr is given, so the branch's base is itself;
    beta2 under `optim.beta2_scaling = "tokens"` is fixed first at the branch's batch against the
    config's base batch (a constant-batch run at `batch` would use it), not reset to betas[1]."""
    betas = cfg.optim.betas
    if cfg.optim.beta2_scaling == "tokens":
        betas = [betas[0], beta2_for_batch(betas[1], batch, cfg.optim.base_batch)]
    return dataclasses.replace(
        cfg, name=f"{cfg.name}-branch",
        batch=dataclasses.replace(cfg.batch, global_batch=batch, phases=[], adaptive="none"),
        optim=dataclasses.replace(cfg.optim, base_lr=lr, base_batch=batch, scaling="none", betas=betas,
                                  beta2_scaling="none"),
        schedule=dataclasses.replace(cfg.schedule, name="constant", warmup_epochs=0.0, warmup_steps=None, milestones=[]),
        train=dataclasses.replace(cfg.train, steps=steps, epochs=None, stop_at_target=False, eval_every=0,
                                  log_every=steps, eval_fine=0.0),
        data=dataclasses.replace(cfg.data, train_eval_samples=1, eval_subset=0),
        measure=dataclasses.replace(cfg.measure, gns=False),
        checkpoint=dataclasses.replace(cfg.checkpoint, every=0, keep=1),
        track=dataclasses.replace(cfg.track, wandb=False, progress="off"))


LOSS_MODE = "eval mode (BatchNorm running statistics), plain cross-entropy"


class TestLosses:
    """Per-example test loss of a checkpoint's weights (the fixed evaluation slice)."""

    def __init__(self, cfg, eval_examples: int):
        self.bundle = build_data(cfg.data)
        self.model = build_model(cfg.model, self.bundle.input_shape, self.bundle.num_classes)
        self.limit = min(eval_examples, len(self.bundle.test))
        self.ignore = cfg.train.ignore_index

    @torch.no_grad()
    def __call__(self, path: str | Path) -> np.ndarray:
        self.model.load_state_dict(ckpt.load(path)["model"])
        self.model.eval()
        out = []
        for x, y in eval_batches(self.bundle.test, 0, 1, 1024, torch.device("cpu"), self.limit):
            out.append(example_losses(self.model(x), y, self.ignore))
        return torch.cat(out).numpy()


def next_lr_factor(decrease: dict[float, float | None]) -> float | None:
    """The next lr factor to try at one batch, given the mean decrease at each factor tried (None:
    diverged), or None when the search is done: one factor of 2 beyond the best when it is at an
    edge of what was tried; half the smallest when no factor made progress (the loss rose at every
    lr: too high); nothing beyond 1/16-16, nothing when every factor diverged."""
    ok = {f: d for f, d in decrease.items() if d is not None}
    if not ok:
        return None
    top = max(ok, key=ok.get)
    if ok[top] <= 0:
        nxt = min(decrease) / 2
    else:
        nxt = top / 2 if top == min(decrease) else (top * 2 if top == max(decrease) else None)
    lo, hi = LR_FACTOR_RANGE
    return nxt if nxt is not None and lo <= nxt <= hi else None


def measure_point(cfg, step: int, path: Path, b0: int, lr0: float, window_steps: int, lr_factors, losses: TestLosses,
                  out: Path, budget: dict, centre: float = 1.0) -> dict[str, Any]:
    """Branches from one checkpoint; the fit of B_c there. `centre`: the lr factor the grid at
    k = 1 is centred on (each later k is centred on the factor chosen at k / 2)."""
    before = losses(path)
    batches, decreases, chosen = [], [], []
    k = 1
    lo, hi = LR_FACTOR_RANGE
    while k == 1 or (window_steps % k == 0 and window_steps // k >= MIN_BRANCH_STEPS):
        batch, steps = k * b0, window_steps // k
        rule_lr = lr0 * scaled_lr(1.0, batch, b0, cfg.optim.scaling)
        tried: dict[float, np.ndarray | None] = {}

        def branch(f: float) -> None:
            run_dir = out / f"step{step}-k{k}-lr{f:g}"
            t = time.perf_counter()
            summary = loop.run(branch_config(cfg, batch, rule_lr * f, steps), run_dir, init_from=path)
            budget["branch_s"] += time.perf_counter() - t
            budget["branch_examples"] += steps * batch
            budget["branches"] += 1
            d = before - losses(run_dir / ckpt.FILENAME) if summary["status"] == "completed" else None
            tried[f] = d if d is not None and np.isfinite(d).all() else None

        for f in sorted({min(max(centre * f, lo), hi) for f in lr_factors}):
            branch(f)
        while (nxt := next_lr_factor({f: None if d is None else float(d.mean()) for f, d in tried.items()})) is not None:
            branch(nxt)
        ok = {f: d for f, d in tried.items() if d is not None}
        best = max(ok.items(), key=lambda fd: fd[1].mean()) if ok else None
        if best is None:
            break  # every lr diverged at this batch: efficiency has dropped
        batches.append(batch)
        decreases.append(best[1])
        chosen.append({"k": k, "batch": batch, "steps": steps, "lr": rule_lr * best[0], "lr_factor": best[0],
                       "decrease": float(best[1].mean()), "tried": sorted(tried)})
        centre = best[0]
        if len(batches) >= 3 and decreases[-1].mean() < DROPPED * decreases[0].mean():
            break
        k *= 2
    if len(batches) < 2 or decreases[0].mean() <= 0:
        raise RuntimeError(f"branches from step {step} made no measurable progress over {window_steps} steps at "
                           f"batch {b0}; lengthen --window-steps")
    fit = br.fit_local(batches, np.stack(decreases))
    for row, eff in zip(chosen, fit.efficiency):
        row["efficiency"] = float(eff)
    return {"step": step, "examples": step * b0, "lr0": lr0, "branches": chosen, "b_crit": fit.b_crit,
            "interval": [fit.low, fit.high], "at_edge": fit.at_edge, "draws": fit.draws}


def fresh_folder(path: Path) -> Path:
    """`path`, or path-2, path-3, ... when it exists: a second measurement from the same base run
    (`bigbatch plan --from`, another window) keeps the first one's branches and never trains into
    their folders."""
    n, out = 2, path
    while out.exists():
        out, n = path.with_name(f"{path.name}-{n}"), n + 1
    return out


def default_window(s0: int, points: int) -> int:
    """Steps at B0 of a branch window: a power of 2 (every k = 2^j divides it, so every branch sees
    exactly the same examples) at most a segment (s0 / points), at least MIN_WINDOW_STEPS."""
    return 2 ** int(math.log2(max(MIN_WINDOW_STEPS, s0 / points)))


def measure(cfg, run_dir: str | Path, s0: int, *, points: int = DEFAULT_POINTS, window_steps: int | None = None,
            eval_examples: int = DEFAULT_EVAL_EXAMPLES, lr_factors=DEFAULT_LR_FACTORS, base_s: float = 0.0,
            base_examples: int | None = None) -> dict[str, Any]:
    """B_c(t) at `points` checkpoints of the base run in `run_dir` (config `cfg`, target at step
    s0, interpolated) and the global answer integrated from them. `base_examples` and `base_s`:
    what the base run (with its lr search) trained and took, for the budget."""
    b0 = cfg.batch.global_batch
    window_steps = window_steps or default_window(s0, points)
    chosen = choose_points(base_checkpoints(run_dir), s0, points)
    if not chosen:
        raise UsageError("--from", f"the run in {str(run_dir)!r} has no checkpoint before its target (step {s0})")
    losses = TestLosses(cfg, eval_examples)
    schedule = Schedule(cfg, len(losses.bundle.train))
    out = fresh_folder(Path(run_dir) / "branches")
    budget = {"base_examples": int(base_examples if base_examples is not None else math.ceil(s0) * b0), "base_s": base_s, "branch_examples": 0, "branch_s": 0.0, "branches": 0}
    fits, centre = [], 1.0
    for step, path in chosen:
        print(f"branching from step {step} of {s0:.1f}: k x {b0}, {window_steps} steps at k = 1, lr x {lr_factors} "
              f"around x{centre:g}", file=sys.stderr, flush=True)
        fits.append(measure_point(cfg, step, path, b0, schedule.lr_at(step), window_steps, lr_factors, losses, out, budget,
                                  centre))
        centre = fits[-1]["branches"][0]["lr_factor"]
    steps = np.array([f["step"] for f in fits], dtype=float)
    bounds = np.concatenate([[0.0], (steps[1:] + steps[:-1]) / 2, [s0]]) * b0
    seg_examples = np.diff(bounds)
    seg = br.Segments.from_base(seg_examples, [f["b_crit"] for f in fits], b0)
    interval = br.global_interval(seg_examples, np.stack([f["draws"] for f in fits], axis=1), b0)
    for f in fits:
        del f["draws"]
    budget["examples"] = budget["base_examples"] + budget["branch_examples"]
    budget["wall_s"] = budget["base_s"] + budget["branch_s"]
    return {"b0": b0, "s0": s0, "points": fits, "segment_examples": seg_examples.tolist(), "segments": seg,
            "b_crit": seg.B_crit, "s_min": seg.S_min, "e_min": seg.E_min, "interval": interval, "budget": budget,
            "num_train": len(losses.bundle.train), "window_steps": window_steps, "eval_examples": losses.limit,
            "loss_mode": LOSS_MODE,
            "lr_factors": list(lr_factors)}


def report_lines(m: dict[str, Any], b_simple: list[tuple[int, float]] | None = None) -> list[str]:
    """What `bigbatch plan` prints about the branching measurement; with the base run's online
    B_simple history, its reading at each branch point beside B_crit(t)."""
    b_simple = dict(b_simple or [])
    lines = [f"critical batch along training (branches from {len(m['points'])} checkpoints, test loss on "
             f"{m['eval_examples']} test examples, {m['loss_mode']}, 95 % bootstrap over them):"]
    for p in m["points"]:
        ks = " ".join(f"{r['batch']}:{r['efficiency']:.2f}(lr x{r['lr_factor']:g})" for r in p["branches"])
        edge = " (no drop: a lower bound)" if p["at_edge"] else ""
        noise = f"   B_simple {b_simple[p['step']]:.0f}" if b_simple and p["step"] in b_simple else ""
        lines.append(f"  step {p['step']:>6} ({p['examples']} examples): B_crit(t) {p['b_crit']:.0f} "
                     f"[{p['interval'][0]:.0f}, {p['interval'][1]:.0f}]{edge}{noise}   efficiency {ks}")
    iv = m["interval"]
    lines.append(f"global: B_crit = {m['b_crit']:.0f} [{iv['b_crit'][0]:.0f}, {iv['b_crit'][1]:.0f}]   "
                 f"S_min = {m['s_min']:.1f} steps   E_min = {m['e_min']:.3g} examples")
    b = m["budget"]
    lines.append(f"budget: base run {b['base_examples']} examples in {b['base_s']:.1f} s + {b['branches']} branches "
                 f"{b['branch_examples']} examples in {b['branch_s']:.1f} s = {b['examples']} examples, {b['wall_s']:.1f} s")
    return lines


def ramp(m: dict[str, Any], kind: str, examples: float, unit: int) -> dict[str, Any]:
    """A ramp of `kind` spending `examples` in all, batches rounded to multiples of `unit`; its
    predicted steps and gain against the constant batch at the same examples (after rounding)."""
    seg: br.Segments = m["segments"]
    batches = br.round_batches(br.ramp_batches(seg, kind, examples), unit)
    return {"kind": kind, "batches": batches.tolist(), **br.ramp_gain(seg, batches)}


def json_ready(m: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in m.items() if k != "segments"}
