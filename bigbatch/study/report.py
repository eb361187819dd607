"""`bigbatch report SWEEP_DIR`: critical.json, plots (PNG) and report.md / report.html, rebuilt
from a sweep folder's trials.jsonl.

The analysis is refitted from the trial records alone (`critical.analyse`, the stated rule; its
bootstrap is seeded, so the same records give the same critical.json) and the trials'
metrics.jsonl feed the curves; needs no service. The HTML embeds its plots (base64 PNG), so the
one file can be mailed or opened anywhere.

Plots:
    steps_vs_batch.png    steps to target per seed and the median at the best lr per batch, the fit
                          S_min(1 + B_crit/B) with its 95 % band, Shallue et al.'s regimes shaded
    pareto.png            examples vs steps to target (the trade-off curve of McCandlish et al.)
    lr_sensitivity.png    batch x lr multiplier -> median steps to target (>N: raced, slower)
    gap_vs_batch.png      gap phase: train - test accuracy and train-mode sharpness vs batch
    outliers_vs_batch.png gap phase: the Hessian's lambda_1, lambda_C, lambda_k (median, seed range), the
                          number of outliers and the gradient's share of the top-k space vs batch
    b_simple.png          B_simple (measure.gns) during training, per batch size (when measured)
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from bigbatch import folders
from bigbatch.study import axes_report, critical
from bigbatch.study.documents import write_documents
from bigbatch.study.records import CRITICAL, fmt, headline, load_sweep

PLOTS = ("steps_vs_batch", "pareto", "lr_sensitivity", "gap_vs_batch", "outliers_vs_batch", "b_simple")


# --- plots -----------------------------------------------------------------------------------


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save(fig, ax, path: Path, xlabel: str, ylabel: str, title: str, legend: bool = True, grid: bool = True) -> bool:
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    if grid:
        ax.grid(True, which="both", alpha=0.3)
    if legend and ax.get_legend_handles_labels()[0]:
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    _plt().close(fig)
    return True


REGIME_COLORS = {"perfect scaling": "#2ca02c", "diminishing returns": "#ff7f0e", "maximal data parallelism": "#d62728"}


def plot_steps_vs_batch(analysis: dict[str, Any], path: Path) -> bool:
    best = analysis["best"]
    if not best:
        return False
    import numpy as np

    plt = _plt()
    fig, ax = plt.subplots(figsize=(6.5, 4.5))
    b = [r["batch"] for r in best]
    lo_b, hi_b = min(b) / 1.5, max(b) * 1.5
    reg = analysis.get("regimes") or {}
    if reg.get("perfect_scaling_below"):  # Shallue et al. 2018's three regimes under the fit
        edges = [lo_b, min(max(reg["perfect_scaling_below"], lo_b), hi_b), min(max(reg["max_parallelism_above"], lo_b), hi_b), hi_b]
        for (x0, x1), name in zip(zip(edges, edges[1:]), REGIME_COLORS):
            if x1 > x0:
                ax.axvspan(x0, x1, color=REGIME_COLORS[name], alpha=0.08, lw=0, label=name)
    excluded = set(analysis.get("excluded_batches") or [])
    seeds_x = [r["batch"] for r in best for _ in r.get("seed_steps", [])]
    seeds_y = [v for r in best for v in r.get("seed_steps", [])]
    ax.scatter(seeds_x, seeds_y, s=9, color="0.45", zorder=3, label="each seed at the best lr")
    med = [(r["batch"], r["steps_to_target"]) for r in best if r["batch"] not in excluded]
    ax.plot(*zip(*med), "o", color="C0", ms=6, zorder=4, label="median (best lr, majority rule)")
    if excluded:
        ax.plot([r["batch"] for r in best if r["batch"] in excluded],
                [r["steps_to_target"] for r in best if r["batch"] in excluded], "x", color="C3", ms=8, zorder=4,
                label="rise beyond the seed spread (left out of the fit)")
    edge = [(r["batch"], r["steps_to_target"]) for r in best if r.get("edge")]
    if edge:
        ax.plot(*zip(*edge), "^", mfc="none", color="k", ms=10, zorder=5, label="best lr at the grid's edge")
    fit = analysis.get("fit")
    if fit and fit["s_min"] > 0 and fit["e_min"] > 0:
        grid = np.geomspace(min(b), max(b), 200)
        label = f"fit: B_crit={fmt(analysis['b_crit'])}"
        if analysis.get("b_crit_ci"):
            lo, hi = analysis["b_crit_ci"]
            label += f" [{fmt(lo)}, {fmt(hi) if hi is not None else 'inf'}]"
        ax.plot(grid, fit["s_min"] + fit["e_min"] / grid, "-", color="C1", label=label)
        band = analysis.get("fit_band")
        if band:
            ax.fill_between(band["batch"], band["lo"], band["hi"], color="C1", alpha=0.25, lw=0, label="95 % band (bootstrap over seed ids)")
        ax.axhline(fit["s_min"], color="C1", ls=":", lw=1)
        if analysis.get("b_crit"):
            ax.axvline(analysis["b_crit"], color="C1", ls="--", lw=1)
    if analysis.get("b_simple_at_target"):
        ax.axvline(analysis["b_simple_at_target"], color="C2", ls="--", lw=1, label=f"B_simple at target = {fmt(analysis['b_simple_at_target'])}")
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlim(lo_b, hi_b)
    return _save(fig, ax, path, "global batch B", "steps to target (interpolated crossing)", "Steps to target vs batch size")


def plot_pareto(analysis: dict[str, Any], path: Path) -> bool:
    best = analysis["best"]
    if not best:
        return False
    plt = _plt()
    fig, ax = plt.subplots(figsize=(6, 4.2))
    s = [r["steps_to_target"] for r in best]
    e = [r["examples_to_target"] for r in best]
    ax.loglog(s, e, "o-", color="C0")
    for r in best:
        ax.annotate(str(r["batch"]), (r["steps_to_target"], r["examples_to_target"]), fontsize=7,
                    textcoords="offset points", xytext=(4, 3))
    fit = analysis.get("fit")
    if fit and fit["s_min"] > 0 and fit["e_min"] > 0:
        import numpy as np

        # (S/S_min - 1)(E/E_min - 1) = 1  =>  E = E_min S / (S - S_min), for S > S_min
        grid = np.geomspace(fit["s_min"] * 1.02, max(max(s), fit["s_min"] * 1.05) * 1.5, 200)
        ax.loglog(grid, fit["e_min"] * grid / (grid - fit["s_min"]), "-", color="C1", label="(S/S_min-1)(E/E_min-1)=1")
        ax.axvline(fit["s_min"], color="C1", ls=":", lw=1, label="S_min")
        ax.axhline(fit["e_min"], color="C1", ls="--", lw=1, label="E_min")
    return _save(fig, ax, path, "steps to target", "examples to target", "Examples vs steps (labels: batch size)")


def plot_lr_sensitivity(trials: list[dict[str, Any]], path: Path) -> bool:
    import numpy as np

    crit = [t for t in trials if critical.phase_of(t) == "critical"]
    batches = sorted({t["batch"] for t in crit})
    mults = sorted({t["lr_multiplier"] for t in crit})
    if not batches or not mults:
        return False
    grid = np.full((len(mults), len(batches)), np.nan)
    label = [["-"] * len(batches) for _ in mults]
    for b, by_lr in critical.lr_groups(crit).items():  # censored medians, majority rule, reruns superseding races
        for m, g in by_lr.items():
            if m not in mults:
                continue
            i, j = mults.index(m), batches.index(b)
            raced = [t["steps_lower_bound"] for t in g["all"] if t.get("status") == "slower" and t.get("steps_lower_bound")]
            if g["steps_to_target"] is not None:
                grid[i, j] = float(g["steps_to_target"])
                label[i][j] = fmt(grid[i, j], 3) + (f" ({len(g['reached'])}/{g['n']})" if g["n"] > 1 else "")
            elif raced:
                label[i][j] = f">{fmt(float(min(raced)), 3)}"
    plt = _plt()
    fig, ax = plt.subplots(figsize=(max(5, 0.9 * len(batches) + 2), max(3, 0.5 * len(mults) + 1.8)))
    im = ax.imshow(np.log10(grid), aspect="auto", origin="lower", cmap="viridis_r")
    logs = np.log10(grid[~np.isnan(grid)])
    lo, hi = (logs.min(), logs.max()) if logs.size else (0.0, 1.0)
    for i in range(len(mults)):
        for j in range(len(batches)):
            v = grid[i, j]
            light = np.isnan(v) or (np.log10(v) - lo) < 0.5 * (hi - lo)  # the few-step end of viridis_r is yellow
            ax.text(j, i, label[i][j], ha="center", va="center", fontsize=6, color="k" if light else "w")
    ax.set_xticks(range(len(batches)), [str(b) for b in batches])
    ax.set_yticks(range(len(mults)), [f"{m:g}x" for m in mults])
    fig.colorbar(im, ax=ax, label="log10 median steps")
    return _save(fig, ax, path, "global batch", "lr multiplier (of the scaled lr)",
                 "Censored median steps to target (seeds reached/run; >N raced; - no majority)", legend=False, grid=False)


def plot_gap(analysis: dict[str, Any], path: Path) -> bool:
    """Gap phase: train - test accuracy and train-mode sharpness vs batch, mean +- sd over seeds."""
    rows = [r for r in analysis["gap"] if r.get("gap") is not None]
    if not rows:
        return False
    plt = _plt()
    fig, (ax, ax2) = plt.subplots(1, 2, figsize=(9, 3.8))
    b = [r["batch"] for r in rows]
    ax.errorbar(b, [100 * r["gap"] for r in rows], yerr=[100 * (r["gap_sd"] or 0) for r in rows], fmt="o-", capsize=3,
                label="train - test accuracy")
    ax.axhline(0, color="k", lw=0.5)
    ax.set_xscale("log", base=2)
    trend = (analysis.get("gap_trend") or {}).get("gap")
    title = "Gap at the training criterion"
    if trend and trend.get("ci"):
        title += f"\n{100 * trend['slope']:+.2f} pts/doubling [{100 * trend['ci'][0]:+.2f}, {100 * trend['ci'][1]:+.2f}]"
    sharp = [(r["batch"], r["sharpness"], r["sharpness_sd"] or 0) for r in rows if r.get("sharpness")]
    if sharp:
        ax2.errorbar(*zip(*[(x, y) for x, y, _ in sharp]), yerr=[e for _, _, e in sharp], fmt="s-", color="C3", capsize=3)
        ax2.set_xscale("log", base=2)
        ax2.set_yscale("log")
        ax2.set_xlabel("global batch")
        ax2.set_ylabel("top Hessian eigenvalue (train-mode BN)")
        ax2.set_title("Sharpness at the training criterion")
        ax2.grid(True, which="both", alpha=0.3)
    return _save(fig, ax, path, "global batch", "train - test accuracy (points)", title)


def _median_and_range(ax, rows: list[dict[str, Any]], key: str, fmt_: str, **kw) -> None:
    """Median over seeds per batch with the seed range as an asymmetric error bar."""
    pts = [(r["batch"], r[key], r[f"{key}_range"]) for r in rows if r.get(key) is not None]
    if pts:
        b, med, rng = zip(*pts)
        ax.errorbar(b, med, yerr=[[m - lo for m, (lo, _) in zip(med, rng)], [hi - m for m, (_, hi) in zip(med, rng)]],
                    fmt=fmt_, capsize=3, **kw)


def plot_outliers(analysis: dict[str, Any], path: Path) -> bool:
    """Gap phase: the Hessian's outliers vs batch (Sagun et al.: larger batches, larger outliers),
    median over seeds with the seed range; right, the number of outliers (gap rule) and the
    gradient's share of the top-k space (Gur-Ari et al. 2018)."""
    rows = analysis.get("gap_outliers") or []
    if not rows:
        return False
    plt = _plt()
    fig, (ax, ax2) = plt.subplots(1, 2, figsize=(10, 4))
    c, k = rows[0].get("num_classes"), rows[0]["k"]
    _median_and_range(ax, rows, "lambda_1", "o-", color="C3", label="lambda_1")
    if c and c < k:
        _median_and_range(ax, rows, "lambda_c", "s-", color="C1", label=f"lambda_{c} (C = classes)")
    _median_and_range(ax, rows, "lambda_k", "^--", color="0.5", label=f"lambda_{k} (last of the top-{k})")
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    trend = (analysis.get("gap_trend") or {}).get("log2_sharpness")
    title = "Hessian outliers at the training criterion"
    if trend and trend.get("ci"):
        title += f"\nlambda_1 x {2 ** trend['slope']:.2f} per doubling [{2 ** trend['ci'][0]:.2f}, {2 ** trend['ci'][1]:.2f}]"
    _median_and_range(ax2, rows, "outliers", "o-", color="C0", label="outliers (gap rule)")
    ax2.set_xscale("log", base=2)
    ax2.set_ylabel("number of outliers", color="C0")
    ax2.set_ylim(bottom=0)
    ax3 = ax2.twinx()
    _median_and_range(ax3, rows, "grad_fraction_top_k", "s--", color="C2", label=f"|P_k g|^2 / |g|^2")
    ax3.set_ylim(0, 1)
    ax3.set_ylabel(f"gradient's share of the top-{k} space", color="C2")
    ax2.set_xlabel("global batch")
    ax2.set_title("Outliers and the gradient in their space", fontsize=10)
    ax2.grid(True, which="both", alpha=0.3)
    return _save(fig, ax, path, "global batch", "Hessian eigenvalue (train-mode BN, one micro-batch)", title)


def plot_b_simple(analysis: dict[str, Any], sweep_dir: Path, path: Path) -> bool:
    curves = []
    for r in analysis["best"]:
        for t in r.get("trial_dirs", []):
            rows = [x for x in folders.RunFolder(t).read_metrics() if x.get("gns/b_simple") is not None]
            if rows:
                curves.append((r["batch"], [x["examples"] for x in rows], [x["gns/b_simple"] for x in rows]))
                break
    if not curves:
        return False
    plt = _plt()
    fig, ax = plt.subplots(figsize=(6, 4.2))
    cmap = plt.get_cmap("viridis")
    for i, (b, x, y) in enumerate(curves):
        ax.loglog(x, [max(v, 1e-3) for v in y], color=cmap(i / max(len(curves) - 1, 1)), label=f"B={b}")
    return _save(fig, ax, path, "examples seen", "B_simple = tr(Sigma) / |G|^2",
                 "Gradient noise scale during training (best lr per batch)")


# --- tables and documents --------------------------------------------------------------------


def _tables(trials: list[dict[str, Any]], analysis: dict[str, Any]) -> list[tuple[str, list[str], list[list[str]]]]:
    best = (["batch", "best lr", "lr x", "seeds", "steps to target (median)", "seed range", "examples to target",
             "fit S(B)", "regime", "B_simple at target", "B_noise at target"],
            [[fmt(r["batch"]), fmt(r["lr"]), fmt(r.get("lr_multiplier")) + (f" ({r['edge']} edge)" if r.get("edge") else ""),
              f"{len(r['seeds'])}/{r.get('n_seeds', len(r['seeds']))}", fmt(r["steps_to_target"]),
              f"{fmt(min(r['seed_steps']))}-{fmt(max(r['seed_steps']))}" if r.get("seed_steps") else "n/a",
              fmt(r["examples_to_target"]),
              fmt(analysis["s_min"] + analysis["e_min"] / r["batch"]) if analysis.get("fit") else "n/a",
              r.get("regime") or "n/a", fmt(r.get("b_simple_at_target")), fmt(r.get("b_noise_at_target"))]
             for r in analysis["best"]])
    gap = (["batch", "lr", "seeds (not met)", "epochs", "train acc", "test acc", "gap (points)", "loss gap", "sharpness",
            "outliers", "gradient in top-k"],
           [[fmt(r["batch"]), fmt(r["lr"]), f"{r['n_seeds']} ({r['n_not_met']})", _pm(r, "epochs", 1, 3),
             _pm(r, "train_acc", 100, 4), _pm(r, "test_acc", 100, 4), _pm(r, "gap", 100, 3), _pm(r, "loss_gap", 1, 3),
             _pm(r, "sharpness", 1, 3), _pm(r, "outliers", 1, 2), _pm(r, "grad_fraction_top_k", 1, 2)]
            for r in analysis["gap"]])
    every = (["phase", "batch", "lr x", "seed", "lr", "status", "steps to target", "resolution", "steps", "train acc",
              "test acc", "note"],
             [[t.get("phase") or "critical", fmt(t["batch"]), f"{t['lr_multiplier']:g}", str(t["seed"]), fmt(t.get("lr")),
               t["status"], fmt(t.get("steps_to_target")) if t.get("steps_lower_bound") is None else f"> {fmt(t['steps_lower_bound'])}",
               f"{100 * t['crossing_resolution']:.1f} %" if t.get("crossing_resolution") is not None else "",
               fmt(t.get("steps")), fmt(t.get("train_acc")), fmt(t.get("test_acc")), (t.get("error") or "")[:120]]
              for t in trials])
    return [("Best learning rate per batch size", *best), ("Gap phase: train/test gap at the training criterion (mean ± sd over seeds)", *gap),
            ("Every trial", *every)]


def _pm(row: dict[str, Any], key: str, scale: float, digits: int) -> str:
    """mean +- sd over seeds (scaled: 100 for accuracy points)."""
    v, sd = row.get(key), row.get(f"{key}_sd")
    if v is None:
        return "n/a"
    return fmt(scale * v, digits) + (f" ± {fmt(scale * sd, 2)}" if sd is not None else "")


def _summary_lines(analysis: dict[str, Any]) -> list[str]:
    target = ", ".join(f"{k} {'>=' if k.endswith('acc') else '<='} {v}" for k, v in analysis.get("target", {}).items())
    counts = ", ".join(f"{v} {k}" for k, v in sorted(analysis["trials"].items()))
    lines = [f"Sweep `{analysis.get('sweep', '?')}`, target {target or 'n/a'}; trials: {counts}."]
    lines += headline(analysis)
    if analysis.get("excluded_batches"):
        lines.append(f"left out of the fit (steps rise past the fastest batch by more than the seed spread): "
                     f"{analysis['excluded_batches']}")
    return lines


def write_report(sweep_dir: str | Path) -> Path:
    """Plots, report.md and report.html in `sweep_dir`; returns the report.html path. A sweep with
    further axes gets its own report (`bigbatch.study.axes_report`: nothing pooled across them)."""
    sweep_dir = Path(sweep_dir)
    sweep = folders.SweepFolder(sweep_dir)
    if sweep.trials.is_file() and axes_report.has_axes(axes_trials := sweep.read_trials()):
        return axes_report.write_report(sweep_dir, axes_trials)
    trials, analysis = load_sweep(sweep_dir)
    (sweep_dir / CRITICAL).write_text(json.dumps(analysis, indent=2, allow_nan=False) + "\n")
    for r in analysis["best"]:  # run folders of each batch's best-lr trials (for the B_simple curves)
        r["trial_dirs"] = [t["run_dir"] for t in trials if t["batch"] == r["batch"] and t.get("lr") == r["lr"]
                           and t.get("status") == "ok" and t.get("run_dir")]
    made = []
    makers = {
        "steps_vs_batch": lambda p: plot_steps_vs_batch(analysis, p),
        "pareto": lambda p: plot_pareto(analysis, p),
        "lr_sensitivity": lambda p: plot_lr_sensitivity(trials, p),
        "gap_vs_batch": lambda p: plot_gap(analysis, p),
        "outliers_vs_batch": lambda p: plot_outliers(analysis, p),
        "b_simple": lambda p: plot_b_simple(analysis, sweep_dir, p),
    }
    for name in PLOTS:
        if makers[name](sweep_dir / f"{name}.png"):
            made.append(name)
    return write_documents(sweep_dir, "Critical batch size study", _summary_lines(analysis), made,
                           [p for p in PLOTS if p not in made], _tables(trials, analysis))


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("sweep_dir", metavar="SWEEP_DIR", help="a sweep folder (holds trials.jsonl and critical.json)")


def main(args: argparse.Namespace) -> int:
    out = write_report(args.sweep_dir)
    print(f"report: {out}")
    print(f"        {out.with_suffix('.md')}")
    return 0
