"""Claim: a batch ramp (or the GNS-driven batch) reaches the target in fewer steps than any
constant batch that spends the same number of examples (issue 27, Done when 3).

Evidence: each run's (steps, examples) to the target, against the constant-batch frontier S(E) of a
sweep (`bigbatch sweep`: every batch at its best lr), two ways:

- **fit**: the sweep's fitted hyperbola (S / S_min - 1)(E / E_min - 1) = 1, i.e.
  S(E) = S_min E / (E - E_min) (McCandlish et al. 2018, eq. 2.11), from its best-lr medians;
- **interp**: linear interpolation in (log E, log S) between the sweep's best-lr medians (the
  Pareto points only); beyond the last Pareto point, its steps (the fewest any constant batch
  took: the batches that spent more examples did not take fewer steps); below the first, null.

The gain of a run is 1 - S_run / S_frontier(E_run). Per group of runs (one per seed): the mean
gain, a Student-t 95 % interval over the runs (the runs' seed noise only), and a 95 % bootstrap
interval that resamples the runs *and* the sweep's seeds (the frontier re-fitted on every draw:
the frontier's own seed noise included). With `--baseline NAME` every group is also compared with
that group run by run (paired by seed): steps and examples ratios, e.g. a ramp against the
constant base batch B0 (Merrill et al. 2025's comparison). With `--plan PLAN.json` (`bigbatch plan
--json`), the ramps' predicted gains from the measured B_crit(t) are printed beside the measured ones.

    python benchmarks/ramp_vs_frontier.py SWEEP_DIR --runs ramp=R1,R2,R3 --runs gns=G1,G2,G3 \
        --runs b0=C1,C2,C3 [--baseline b0] [--plan plan.json] [--plot FILE.png] [--json FILE]

Steps and examples to the target are the crossing interpolated linearly between the two
evaluations around it (the sweep's rule, `critical.crossing`), examples at the same fraction.
Pure reading of folders: no training, no lock needed.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import tomllib
from pathlib import Path
from typing import Any

import numpy as np

from bigbatch import folders
from bigbatch.study import critical, records

LEVEL = 0.95
BOOT = 4000


# --- reading ------------------------------------------------------------------------------------


def run_to_target(run_dir: str, target: dict[str, float]) -> dict[str, Any]:
    """(steps, examples) of one run to the target: the crossing interpolated between evaluations."""
    d = folders.RunFolder(run_dir)
    if not d.metrics.is_file():
        sys.exit(f"{run_dir!r} is not a run folder (no {d.metrics.name})")
    metrics = d.read_metrics()
    (metric, value), = target.items()
    c = records.metric_crossing(metrics, metric, value)  # the sweep's rule (records.trial_record)
    cross = None
    if c is not None:  # examples at the same fraction of the bracket (a batch ramp's examples are not steps x batch)
        evals = [r for r in metrics if records.eval_row(r) and r.get("eval_set") != "full"
                 and r.get(metric) is not None and math.isfinite(r[metric])]
        cross = (c["steps"], float(np.interp(c["steps"], [r["step"] for r in evals], [r["examples"] for r in evals])))
    summary = d.read_summary() or {}
    seed = tomllib.loads(d.config.read_text())["train"]["seed"] if d.config.is_file() else None
    batches = sorted({int(r["global_batch"]) for r in metrics if r.get("global_batch")
                      and (cross is None or r["step"] <= cross[0] + 1e-9)})
    return {"run_dir": str(d.path), "seed": seed, "reached": cross is not None,
            "steps": cross[0] if cross else None, "examples": cross[1] if cross else None,
            "batches": batches, "wall_s": summary.get("wall_s")}


# --- the frontier -------------------------------------------------------------------------------


def fit_frontier(s_min: float, e_min: float, examples: np.ndarray) -> np.ndarray:
    """S(E) = S_min E / (E - E_min): the constant batch B = (E - E_min) / S_min's steps (inf at E <= E_min)."""
    e = np.asarray(examples, dtype=float)
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.where(e > e_min, s_min * e / (e - e_min), np.inf)


def pareto(points: list[tuple[float, float]]) -> list[tuple[float, float]]:
    """(E, S) points that no other point beats in both (fewer or equal examples and steps), by E."""
    pts = sorted(points)
    out: list[tuple[float, float]] = []
    for e, s in pts:
        if not out or s < out[-1][1]:
            out.append((e, s))
    return out


def interp_frontier(points: list[tuple[float, float]], examples: np.ndarray) -> np.ndarray:
    """Linear in (log E, log S) between the Pareto points; beyond the last one, its steps (the
    fewest any constant batch measured: those that spent more did not take fewer); NaN below the
    first (no extrapolation)."""
    p = pareto(points)
    e = np.log(np.asarray(examples, dtype=float))
    if len(p) < 2:
        return np.full(e.shape, np.nan)
    le, ls = np.log([q[0] for q in p]), np.log([q[1] for q in p])
    out = np.exp(np.interp(e, le, ls))  # np.interp holds the last value beyond the end
    return np.where(e >= le[0], out, np.nan)


class SweepFrontier:
    """The best-lr seeds of a sweep per batch, and the frontier from any resample of its seeds."""

    def __init__(self, sweep_dir: str):
        self.trials, self.analysis = records.load_sweep(Path(sweep_dir))
        best = critical.best_per_batch([t for t in self.trials if critical.phase_of(t) == "critical"])
        self.fit_batches = self.analysis["fit_batches"]
        # per batch {seed: steps} at its best lr (seeds that did not reach: +inf, the censored rule)
        self.seed_steps: dict[int, dict[int, float]] = {}
        for b, e in best.items():
            by_seed = {t["seed"]: float(t["steps_to_target"]) for t in e["trials"]}
            for s in e["seeds"]:
                by_seed.setdefault(s, math.inf)
            self.seed_steps[b] = by_seed
        self.seeds = sorted({s for v in self.seed_steps.values() for s in v})

    def medians(self, seeds: list[int] | None = None) -> dict[int, float]:
        out = {}
        for b, by_seed in self.seed_steps.items():
            v = [by_seed[s] for s in (seeds if seeds is not None else by_seed) if s in by_seed]
            if v:
                out[b] = float(np.median(v))
        return out

    def curves(self, seeds: list[int] | None = None):
        """(fit (s_min, e_min) or None, interpolation points [(E, S)]) from the medians over `seeds`."""
        med = self.medians(seeds)
        fb = [b for b in self.fit_batches if b in med and math.isfinite(med[b])]
        fit = None
        if len(fb) >= 2:
            f = critical.fit_critical_batch(fb, [med[b] for b in fb])
            if f["s_min"] > 0 and f["e_min"] > 0:
                fit = (f["s_min"], f["e_min"])
        pts = [(b * s, s) for b, s in med.items() if math.isfinite(s)]
        return fit, pts


# --- comparisons --------------------------------------------------------------------------------


def t_interval(values: np.ndarray, level: float = LEVEL) -> list[float] | None:
    v = np.asarray(values, dtype=float)
    v = v[np.isfinite(v)]
    if v.size < 2:
        return None
    from scipy import stats  # scikit-learn's dependency

    h = stats.t.ppf(0.5 + level / 2, v.size - 1) * v.std(ddof=1) / math.sqrt(v.size)
    return [float(v.mean() - h), float(v.mean() + h)]


def gains(sweep: SweepFrontier, runs: list[dict[str, Any]], seed: int = 0) -> dict[str, Any]:
    """Per run and on average, 1 - S_run / S_frontier(E_run), fit and interp; intervals."""
    ok = [r for r in runs if r["reached"]]
    S = np.array([r["steps"] for r in ok], dtype=float)
    E = np.array([r["examples"] for r in ok], dtype=float)
    fit, pts = sweep.curves()
    out: dict[str, Any] = {"n": len(runs), "n_reached": len(ok),
                           "steps_mean": float(S.mean()) if ok else None, "steps_sd": float(S.std(ddof=1)) if len(ok) > 1 else None,
                           "examples_mean": float(E.mean()) if ok else None,
                           "examples_sd": float(E.std(ddof=1)) if len(ok) > 1 else None}
    rng = np.random.default_rng(seed)
    for name in ("fit", "interp"):
        front = fit_frontier(*fit, E) if (name == "fit" and fit) else (interp_frontier(pts, E) if name == "interp" else np.full(E.shape, np.nan))
        g = 1.0 - S / front
        boot = []
        for _ in range(BOOT if ok else 0):
            ri = rng.integers(0, len(ok), len(ok))
            ss = list(rng.choice(sweep.seeds, len(sweep.seeds)))
            f2, p2 = sweep.curves(ss)
            fr = fit_frontier(*f2, E[ri]) if name == "fit" and f2 else (interp_frontier(p2, E[ri]) if name == "interp" else None)
            if fr is None:
                continue
            v = 1.0 - S[ri] / fr
            if np.all(np.isfinite(v)):
                boot.append(float(v.mean()))
        tail = 100 * (1 - LEVEL) / 2
        out[name] = {
            "frontier_steps": [float(x) for x in front],
            "gain": [float(x) for x in g],
            "gain_mean": float(np.mean(g)) if ok and np.all(np.isfinite(g)) else None,
            "gain_t95": t_interval(g) if ok and np.all(np.isfinite(g)) else None,
            "gain_boot95_with_sweep_seeds": ([float(x) for x in np.percentile(boot, [tail, 100 - tail])]
                                             if len(boot) > BOOT // 2 else None),
            "boot_valid_draws": len(boot),
        }
    return out


def against(group: list[dict[str, Any]], base: list[dict[str, Any]]) -> dict[str, Any]:
    """Run by run against the baseline group's run with the same seed: steps and examples ratios."""
    by_seed = {r["seed"]: r for r in base if r["reached"]}
    pairs = [(r, by_seed[r["seed"]]) for r in group if r["reached"] and r["seed"] in by_seed]
    if not pairs:
        return {"pairs": 0}
    s = np.array([a["steps"] / b["steps"] for a, b in pairs])
    e = np.array([a["examples"] / b["examples"] for a, b in pairs])
    return {"pairs": len(pairs), "seeds": [a["seed"] for a, _ in pairs],
            "steps_ratio": s.tolist(), "steps_ratio_mean": float(s.mean()), "steps_ratio_t95": t_interval(s),
            "steps_saved_mean": float(1 - s.mean()),
            "examples_ratio": e.tolist(), "examples_ratio_mean": float(e.mean()), "examples_ratio_t95": t_interval(e)}


def predicted(plan_path: str) -> dict[str, Any]:
    plan = json.loads(Path(plan_path).read_text())
    out = {"b_crit": plan.get("b_crit"), "s_min": plan.get("s_min"), "e_min": plan.get("e_min"), "b0": plan.get("b0"),
           "s0": plan.get("s0")}
    br = plan.get("branching") or {}
    out["b_crit_t"] = [{"step": p["step"], "b_crit": p["b_crit"], "interval": p["interval"]} for p in br.get("points", [])]
    for kind, r in (plan.get("ramps") or {}).items():
        if isinstance(r, dict) and "gain" in r:
            out[f"ramp_{kind}"] = {k: r[k] for k in ("batches", "steps", "examples", "constant_steps", "constant_batch", "gain")}
    return out


# --- plot ---------------------------------------------------------------------------------------


def plot(sweep: SweepFrontier, groups: dict[str, list[dict[str, Any]]], plan: dict[str, Any] | None, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 4.4), dpi=100)
    for b, by_seed in sorted(sweep.seed_steps.items()):
        v = [s for s in by_seed.values() if math.isfinite(s)]
        ax.scatter([b * s for s in v], v, s=10, color="0.6", zorder=2)
    med = sweep.medians()
    pts = sorted((b * s, s, b) for b, s in med.items() if math.isfinite(s))
    ax.scatter([p[0] for p in pts], [p[1] for p in pts], s=30, color="k", zorder=3, label="sweep: best-lr median per batch")
    for e, s, b in pts:
        ax.annotate(str(b), (e, s), textcoords="offset points", xytext=(4, 3), fontsize=7)
    fit, ip = sweep.curves()
    lo, hi = pts[0][0] * 0.8, pts[-1][0] * 1.3
    grid = np.geomspace(max(lo, fit[1] * 1.02) if fit else lo, hi, 200)
    if fit:
        ax.plot(grid, fit_frontier(*fit, grid), "k-", lw=1, label=f"sweep fit: S_min {fit[0]:.0f}, E_min {fit[1]:.3g}")
    g2 = np.geomspace(pts[0][0], pts[-1][0], 200)
    ax.plot(g2, interp_frontier(ip, g2), "k:", lw=1, label="sweep: interpolated")
    if plan and plan.get("s_min"):
        s_min, e_min = plan["s_min"], plan["e_min"]
        gp = np.geomspace(max(lo, e_min * 1.02), hi, 200)
        ax.plot(gp, fit_frontier(s_min, e_min, gp), "--", color="tab:purple", lw=1,
                label=f"plan (branching): B_crit {plan['b_crit']:.0f}")
    marks = {0: ("o", "tab:red"), 1: ("s", "tab:blue"), 2: ("^", "tab:green"), 3: ("D", "tab:orange"),
             4: ("v", "tab:brown"), 5: ("P", "tab:cyan")}
    for i, (name, runs) in enumerate(groups.items()):
        ok = [r for r in runs if r["reached"]]
        m, c = marks[i % len(marks)]
        ax.scatter([r["examples"] for r in ok], [r["steps"] for r in ok], marker=m, color=c, s=36, zorder=4,
                   label=f"{name} ({len(ok)} seeds)")
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("examples to target E")
    ax.set_ylabel("steps to target S")
    ax.legend(fontsize=7)
    ax.grid(True, which="both", alpha=0.2)
    fig.tight_layout()
    fig.savefig(path)


# --- command ------------------------------------------------------------------------------------


def parse_groups(specs: list[str]) -> dict[str, list[str]]:
    groups: dict[str, list[str]] = {}
    for spec in specs:
        name, sep, dirs = spec.partition("=")
        if not sep or not dirs:
            sys.exit(f"--runs expects NAME=DIR1,DIR2,..., got {spec!r}")
        groups[name] = [d for d in dirs.split(",") if d]
    return groups


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("sweep", help="a finished `bigbatch sweep` folder (trials.jsonl)")
    ap.add_argument("--runs", action="append", default=[], metavar="NAME=DIR,...", help="a group of run folders (repeatable)")
    ap.add_argument("--baseline", default=None, help="the group every other is compared with seed by seed")
    ap.add_argument("--plan", default=None, help="`bigbatch plan --json` file: the predicted ramps' gains")
    ap.add_argument("--plot", default=None, help="PNG: the sweep's (E, S) points and fits, the runs on them")
    ap.add_argument("--json", default=None, help="also write the JSON here")
    args = ap.parse_args()
    sweep = SweepFrontier(args.sweep)
    target = sweep.analysis.get("target") or {}
    target = {k: v for k, v in target.items() if k in ("test_acc", "test_loss") and v is not None}
    if len(target) != 1:
        sys.exit(f"the sweep's target must be one of test_acc / test_loss, got {target}")
    groups = {name: [run_to_target(d, target) for d in dirs] for name, dirs in parse_groups(args.runs).items()}
    if args.baseline and args.baseline not in groups:
        sys.exit(f"--baseline {args.baseline!r} is not a --runs group")
    fit, pts = sweep.curves()
    out: dict[str, Any] = {
        "sweep": args.sweep, "target": target,
        "frontier": {"fit": {"s_min": fit[0], "e_min": fit[1], "b_crit": fit[1] / fit[0]} if fit else None,
                     "b_crit_ci": sweep.analysis.get("b_crit_ci"),
                     "points": [{"batch": b, "median_steps": s, "examples": b * s} for b, s in sorted(sweep.medians().items())],
                     "sweep_seeds": sweep.seeds},
        "groups": {},
    }
    for name, runs in groups.items():
        g = {"runs": runs, **gains(sweep, runs)}
        if args.baseline and name != args.baseline:
            g["vs_" + args.baseline] = against(runs, groups[args.baseline])
        out["groups"][name] = g
    plan = predicted(args.plan) if args.plan else None
    if plan:
        out["predicted"] = plan
    if args.plot:
        plot(sweep, groups, plan, args.plot)
        out["plot"] = args.plot
    text = json.dumps(out, indent=1)
    print(text)
    if args.json:
        Path(args.json).write_text(text + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
