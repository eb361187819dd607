"""`bigbatch report SWEEP_DIR`: plots (PNG) and report.md / report.html from a sweep folder.

Reads trials.jsonl, critical.json and the trials' metrics.jsonl; needs no service. The HTML
embeds its plots (base64 PNG), so the one file can be mailed or opened anywhere.

Plots:
    steps_vs_batch.png    steps to target at the best lr per batch, with the fit S_min(1 + B_crit/B)
    pareto.png            examples vs steps to target (the trade-off curve of McCandlish et al.)
    lr_sensitivity.png    batch x lr multiplier -> steps to target (blank: not reached / failed)
    gap_vs_batch.png      train - test accuracy at the target and at the fixed epoch budget
    b_simple.png          B_simple (measure.gns) during training, per batch size (when measured)
"""

from __future__ import annotations

import argparse
import base64
import html
import json
import math
from pathlib import Path
from typing import Any

from bigbatch.errors import UsageError
from bigbatch.study.records import fmt, headline, load_sweep, read_rows

PLOTS = ("steps_vs_batch", "pareto", "lr_sensitivity", "gap_vs_batch", "b_simple")


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


def plot_steps_vs_batch(analysis: dict[str, Any], path: Path) -> bool:
    best = analysis["best"]
    if not best:
        return False
    plt = _plt()
    fig, ax = plt.subplots(figsize=(6, 4.2))
    b = [r["batch"] for r in best]
    s = [r["steps_to_target"] for r in best]
    excluded = set(analysis.get("excluded_batches") or [])
    ax.loglog([x for x in b if x not in excluded], [y for x, y in zip(b, s) if x not in excluded], "o",
              color="C0", label="best lr per batch")
    if excluded:
        ax.loglog([x for x in b if x in excluded], [y for x, y in zip(b, s) if x in excluded], "x", color="C3",
                  label="steps rise again (left out of the fit)")
    fit = analysis.get("fit")
    if fit and fit["s_min"] > 0 and fit["e_min"] > 0:
        import numpy as np

        grid = np.geomspace(min(b), max(b), 200)
        ax.loglog(grid, fit["s_min"] + fit["e_min"] / grid, "-", color="C1",
                  label=f"S_min(1 + B_crit/B): B_crit={fmt(analysis['b_crit'])}, S_min={fmt(fit['s_min'])}")
        ax.axhline(fit["s_min"], color="C1", ls=":", lw=1)
        if analysis.get("b_crit"):
            ax.axvline(analysis["b_crit"], color="C1", ls="--", lw=1, label=f"B_crit = {fmt(analysis['b_crit'])}")
    if analysis.get("b_simple_at_target"):
        ax.axvline(analysis["b_simple_at_target"], color="C2", ls="--", lw=1, label=f"B_simple at target = {fmt(analysis['b_simple_at_target'])}")
    return _save(fig, ax, path, "global batch B", "steps to target", "Steps to target vs batch size")


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

    batches = sorted({t["batch"] for t in trials})
    mults = sorted({t["lr_multiplier"] for t in trials})
    if not batches or not mults:
        return False
    grid = np.full((len(mults), len(batches)), np.nan)
    for t in trials:
        if t.get("status") == "ok" and t.get("steps_to_target"):
            i, j = mults.index(t["lr_multiplier"]), batches.index(t["batch"])
            v = t["steps_to_target"]
            grid[i, j] = v if np.isnan(grid[i, j]) else min(grid[i, j], v)
    plt = _plt()
    fig, ax = plt.subplots(figsize=(max(5, 0.7 * len(batches) + 2), max(3, 0.5 * len(mults) + 1.8)))
    im = ax.imshow(np.log10(grid), aspect="auto", origin="lower", cmap="viridis_r")
    logs = np.log10(grid[~np.isnan(grid)])
    lo, hi = (logs.min(), logs.max()) if logs.size else (0.0, 1.0)
    for i in range(len(mults)):
        for j in range(len(batches)):
            v = grid[i, j]
            light = np.isnan(v) or (np.log10(v) - lo) < 0.5 * (hi - lo)  # the few-step end of viridis_r is yellow
            ax.text(j, i, "-" if np.isnan(v) else fmt(float(v), 3), ha="center", va="center", fontsize=7,
                    color="k" if light else "w")
    ax.set_xticks(range(len(batches)), [str(b) for b in batches])
    ax.set_yticks(range(len(mults)), [f"{m:g}x" for m in mults])
    fig.colorbar(im, ax=ax, label="log10 steps")
    return _save(fig, ax, path, "global batch", "lr multiplier (of the scaled lr)",
                 "Steps to target (- = not reached, diverged or failed)", legend=False, grid=False)


def plot_gap(analysis: dict[str, Any], path: Path) -> bool:
    rows = [r for r in analysis["gap"] if r.get("gap") is not None or r.get("gap_at_budget") is not None]
    if not rows:
        return False
    plt = _plt()
    fig, ax = plt.subplots(figsize=(6, 4))
    for key, label, style in (("gap", "at target (end of trial)", "o-"), ("gap_at_budget", "at the fixed epoch budget", "s--")):
        pts = [(r["batch"], 100 * r[key]) for r in rows if r.get(key) is not None]
        if pts:
            ax.semilogx(*zip(*pts), style, label=label, base=2)
    ax.axhline(0, color="k", lw=0.5)
    return _save(fig, ax, path, "global batch", "train - test accuracy (points)", "Generalization gap vs batch size (best lr)")


def plot_b_simple(analysis: dict[str, Any], sweep_dir: Path, path: Path) -> bool:
    curves = []
    for r in analysis["best"]:
        for t in r.get("trial_dirs", []):
            rows = [x for x in read_rows(Path(t) / "metrics.jsonl") if x.get("gns/b_simple") is not None]
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
    best = (["batch", "best lr", "steps to target", "examples to target", "fit S(B)", "B_simple at target"],
            [[fmt(r["batch"]), fmt(r["lr"]), fmt(r["steps_to_target"]), fmt(r["examples_to_target"]),
              fmt(analysis["s_min"] + analysis["e_min"] / r["batch"]) if analysis.get("fit") else "n/a",
              fmt(r.get("b_simple_at_target"))] for r in analysis["best"]])
    gap = (["batch", "epochs", "train acc", "test acc", "gap (points)", "gap at epoch budget (points)", "loss gap", "sharpness"],
           [[fmt(r["batch"]), fmt(r["epochs"], 3), fmt(r["train_acc"]), fmt(r["test_acc"]), _points(r["gap"]),
             _points(r["gap_at_budget"]), fmt(r["loss_gap"], 3), fmt(r["sharpness"])] for r in analysis["gap"]])
    every = (["batch", "lr x", "seed", "lr", "status", "steps to target", "steps", "test acc", "note"],
             [[fmt(t["batch"]), f"{t['lr_multiplier']:g}", str(t["seed"]), fmt(t.get("lr")), t["status"],
               fmt(t.get("steps_to_target")), fmt(t.get("steps")), fmt(t.get("test_acc")), (t.get("error") or "")[:120]]
              for t in trials])
    return [("Best learning rate per batch size", *best), ("Train/test gap at the best lr", *gap),
            ("Every trial", *every)]


def _points(v: float | None) -> str:
    return "n/a" if v is None else f"{100 * v:+.2f}"


def _summary_lines(analysis: dict[str, Any]) -> list[str]:
    target = ", ".join(f"{k} {'>=' if k.endswith('acc') else '<='} {v}" for k, v in analysis.get("target", {}).items())
    counts = ", ".join(f"{v} {k}" for k, v in sorted(analysis["trials"].items()))
    lines = [f"Sweep `{analysis.get('sweep', '?')}`, target {target or 'n/a'}; trials: {counts}."]
    lines += headline(analysis)
    if analysis.get("excluded_batches"):
        lines.append(f"left out of the fit (steps rise again past the fastest batch): {analysis['excluded_batches']}")
    return lines


def write_report(sweep_dir: str | Path) -> Path:
    """Plots, report.md and report.html in `sweep_dir`; returns the report.html path."""
    sweep_dir = Path(sweep_dir)
    trials, analysis = load_sweep(sweep_dir)
    for r in analysis["best"]:  # run folders of each batch's best-lr trials (for the B_simple curves)
        r["trial_dirs"] = [t["run_dir"] for t in trials if t["batch"] == r["batch"] and t.get("lr") == r["lr"]
                           and t.get("status") == "ok" and t.get("run_dir")]
    made = []
    makers = {
        "steps_vs_batch": lambda p: plot_steps_vs_batch(analysis, p),
        "pareto": lambda p: plot_pareto(analysis, p),
        "lr_sensitivity": lambda p: plot_lr_sensitivity(trials, p),
        "gap_vs_batch": lambda p: plot_gap(analysis, p),
        "b_simple": lambda p: plot_b_simple(analysis, sweep_dir, p),
    }
    for name in PLOTS:
        if makers[name](sweep_dir / f"{name}.png"):
            made.append(name)
    summary = _summary_lines(analysis)
    tables = _tables(trials, analysis)
    missing = [p for p in PLOTS if p not in made]

    md = ["# Critical batch size study", ""] + [f"- {l}" for l in summary] + [""]
    for name in made:
        md += [f"![{name}]({name}.png)", ""]
    if missing:
        md += [f"Not plotted (no data): {', '.join(missing)}.", ""]
    for title, head, rows in tables:
        md += [f"## {title}", "", "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
        md += ["| " + " | ".join(c.replace("|", "/") for c in row) + " |" for row in rows] + [""]
    (sweep_dir / "report.md").write_text("\n".join(md))

    esc = html.escape
    parts = ["<!doctype html><html><head><meta charset='utf-8'><title>Critical batch size study</title>",
             "<style>body{font-family:sans-serif;max-width:1000px;margin:2em auto}table{border-collapse:collapse}"
             "td,th{border:1px solid #ccc;padding:2px 6px;text-align:right}img{max-width:100%}</style></head><body>",
             "<h1>Critical batch size study</h1><ul>"] + [f"<li>{esc(l)}</li>" for l in summary] + ["</ul>"]
    for name in made:
        data = base64.b64encode((sweep_dir / f"{name}.png").read_bytes()).decode()
        parts.append(f"<p><img alt='{name}' src='data:image/png;base64,{data}'></p>")
    for title, head, rows in tables:
        parts.append(f"<h2>{esc(title)}</h2><table><tr>" + "".join(f"<th>{esc(h)}</th>" for h in head) + "</tr>")
        parts += ["<tr>" + "".join(f"<td>{esc(c)}</td>" for c in row) + "</tr>" for row in rows]
        parts.append("</table>")
    parts.append("</body></html>")
    out = sweep_dir / "report.html"
    out.write_text("\n".join(parts))
    return out


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("sweep_dir", metavar="SWEEP_DIR", help="a sweep folder (holds trials.jsonl and critical.json)")


def main(args: argparse.Namespace) -> int:
    out = write_report(args.sweep_dir)
    print(f"report: {out}")
    print(f"        {out.with_suffix('.md')}")
    return 0
