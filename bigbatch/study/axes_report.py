"""The analysis and report of a sweep with further axes (`bigbatch.study.axes`).

Trials at different axis values are different experiments, so nothing is pooled across them: the
critical-batch fit (`critical.analyse`) runs per combination of axis values (a fit needs >= 2
batch sizes), every combination gets a row of errors over seeds, and a width sweep (one axis,
trials with parameter counts: trial.test_outputs) gets the over-parametrisation section
(`bigbatch.study.width`): test and training error against N/P, N* and the ensemble curve.

    critical.json   {"axes": keys, "by_axes": [{"axes": values, "critical": ...}], "width": ..., "trials": counts}
    width.png       test error (seeds, median, ensemble) and training error vs N/P, N* and P x K marked
"""

from __future__ import annotations

import json
import statistics
from collections import Counter
from pathlib import Path
from typing import Any

from bigbatch import folders
from bigbatch.study import axes, critical, width
from bigbatch.study.documents import write_documents
from bigbatch.study.records import fmt

PLOTS = ("width",)


def has_axes(trials: list[dict[str, Any]]) -> bool:
    return any(t.get("axes") for t in trials)


def _key(values: dict[str, Any]) -> str:
    return json.dumps(values, sort_keys=True)


def analyse(trials: list[dict[str, Any]], spec: dict[str, Any] | None = None) -> dict[str, Any]:
    """critical.json's content for a sweep with axes, from trials.jsonl's records alone."""
    groups: dict[str, list[dict[str, Any]]] = {}
    for t in trials:
        groups.setdefault(_key(t.get("axes") or {}), []).append(t)
    keys = list(dict.fromkeys(k for t in trials for k in (t.get("axes") or {})))
    by_axes = []
    for k, ts in groups.items():
        c = critical.analyse(ts) if len({t["batch"] for t in critical.reached(ts)}) >= 2 else None
        by_axes.append({"axes": json.loads(k), "critical": c})
    spec = spec or {}
    return {
        "sweep": spec.get("name"), "target": spec.get("target") or {}, "axes": keys, "by_axes": by_axes,
        "width": width.analyse(trials, keys[0]) if len(keys) == 1 else None,
        "trials": dict(Counter(t.get("status", "unknown") for t in trials)),
    }


def headline(analysis: dict[str, Any], with_width: bool = True) -> list[str]:
    """The sweep's answer, one line each: B_crit per combination (where fitted), the width section's claims."""
    lines = []
    for g in analysis["by_axes"]:
        c = g["critical"]
        if c is not None:
            lines.append(f"{axes.label(g['axes'])}: B_crit = {fmt(c['b_crit'])}, S_min = {fmt(c['s_min'])} steps "
                         f"(fit r2 = {fmt(c['r2'], 3)})")
    if with_width and analysis.get("width"):
        lines += width.headline(analysis["width"])
    return lines


# --- the plot --------------------------------------------------------------------------------


def plot_width(w: dict[str, Any], trials: list[dict[str, Any]], path: Path) -> bool:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [r for r in w["rows"] if r["test_error"]["median"] is not None]
    if not rows:
        return False
    x = [r["n_over_p"] for r in rows]
    fig, (ax, ax2) = plt.subplots(1, 2, figsize=(10, 4.2))
    by_value = {r["value"]: r for r in rows}
    seeds = [(by_value[v]["n_over_p"], 1 - t["test_acc"]) for t in trials
             if (v := (t.get("axes") or {}).get(w["axis"])) in by_value and t.get("test_acc") is not None]
    if seeds:
        ax.scatter(*zip(*seeds), s=10, color="0.55", zorder=3, label="each seed")
    ax.plot(x, [r["test_error"]["median"] for r in rows], "o-", color="C0", label="median over seeds")
    ax.fill_between(x, [r["test_error"]["min"] for r in rows], [r["test_error"]["max"] for r in rows],
                    color="C0", alpha=0.15, lw=0, label="seed range")
    ens = [(r["n_over_p"], r["ensemble_test_error"]) for r in rows if r["ensemble_test_error"] is not None]
    if ens:
        ax.plot(*zip(*ens), "s--", color="C2", label=f"ensemble of k = {w['ensemble_k']} (softmax mean)")
    for a in (ax, ax2):
        if w["n_star"]:
            a.axvline(w["n_star_over_p"], color="C3", ls="--", lw=1, label=f"N* = {w['n_star']:,} (N*/P = {w['n_star_over_p']:.2f})")
        if w.get("p_times_classes"):
            a.axvline(w["p_times_classes"] / w["p"], color="0.3", ls=":", lw=1, label="N = P x K (Belkin et al.)")
        a.set_xscale("log")
        a.set_xlabel(f"N / P  (N parameters, P = {w['p']:,} training examples)")
        a.grid(True, which="both", alpha=0.3)
    ax2.plot(x, [r["train_error"]["median"] for r in rows], "o-", color="C1", label="median over seeds")
    ax2.fill_between(x, [r["train_error"]["min"] for r in rows], [r["train_error"]["max"] for r in rows],
                     color="C1", alpha=0.15, lw=0)
    ax2.axhline(w["fit_tolerance"], color="k", lw=0.6, ls=":", label=f"fit tolerance {100 * w['fit_tolerance']:g} %")
    ax2.set_ylabel("training error (final network, noisy labels)")
    ax2.set_title("Training error vs N/P")
    ax2.legend(fontsize=7)
    ax.set_ylabel("test error (clean test labels)")
    ax.set_title(f"Test error vs N/P ({w['axis']})")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


# --- tables and the report -------------------------------------------------------------------


def _pct(s: dict[str, Any]) -> str:
    if s["median"] is None:
        return "n/a"
    return f"{100 * s['median']:.2f} [{100 * s['min']:.2f}-{100 * s['max']:.2f}]"


def _tables(trials: list[dict[str, Any]], analysis: dict[str, Any]) -> list[tuple[str, list[str], list[list[str]]]]:
    tables = []
    w = analysis.get("width")
    if w:
        tables.append((f"Width sweep: errors by {w['axis']} (%, median [min-max] over seeds)",
                       [w["axis"], "N", "N/P", "seeds", "test error", "ensemble (k)", "train error", "fitted seeds",
                        "steps to fit (median of the fitted)"],
                       [[str(r["value"]), f"{r['n_params']:,}", f"{r['n_over_p']:.3g}", str(len(r["seeds"])),
                         _pct(r["test_error"]),
                         f"{100 * r['ensemble_test_error']:.2f} ({r['ensemble_k']})" if r["ensemble_test_error"] is not None else "n/a",
                         _pct(r["train_error"]), f"{r['n_fitted']}/{len(r['seeds'])}", fmt(r["steps_to_fit"]["median"])]
                        for r in w["rows"]]))
    groups: dict[tuple, list[dict[str, Any]]] = {}
    for t in trials:
        groups.setdefault((_key(t.get("axes") or {}), t["batch"], t["lr_multiplier"]), []).append(t)

    def med(ts: list[dict[str, Any]], k: str) -> str:
        v = [t[k] for t in ts if t.get(k) is not None]
        return f"{fmt(statistics.median(v))} [{fmt(min(v))}-{fmt(max(v))}]" if v else "n/a"

    tables.append(("Every combination (median [min-max] over seeds)",
                   ["axes", "batch", "lr x", "seeds", "status", "test acc", "train acc", "steps to target"],
                   [[axes.label(json.loads(k)), fmt(b), f"{m:g}", str(len(ts)),
                     ", ".join(f"{v} {s}" for s, v in sorted(Counter(t["status"] for t in ts).items())),
                     med(ts, "test_acc"), med(ts, "train_acc"), med(ts, "steps_to_target")]
                    for (k, b, m), ts in groups.items()]))
    return tables


def write_report(sweep_dir: Path, trials: list[dict[str, Any]]) -> Path:
    """critical.json, width.png (a width sweep), report.md and report.html for a sweep with axes."""
    sweep = folders.SweepFolder(sweep_dir)
    analysis = analyse(trials, sweep.read_spec())
    sweep.critical.write_text(json.dumps(analysis, indent=2, allow_nan=False) + "\n")
    made = [name for name in PLOTS if analysis.get("width") and plot_width(analysis["width"], trials, sweep_dir / f"{name}.png")]
    counts = ", ".join(f"{v} {k}" for k, v in sorted(analysis["trials"].items()))
    target = ", ".join(f"{k} {'<=' if k.endswith('loss') else '>='} {v}" for k, v in analysis["target"].items() if v is not None)
    summary = [f"Sweep `{analysis.get('sweep', '?')}` over {', '.join(analysis['axes'])}; target {target or 'n/a'} "
               f"(ok: reached within the budget); trials: {counts}."] + headline(analysis, with_width=False)
    sections = []
    if analysis.get("width"):
        w = analysis["width"]
        sections.append(("Width sweep (over-parametrisation)", [
            f"N = trained parameters; P = {w['p']:,} training examples (Geiger/Spigler et al.'s P: one constraint per "
            f"example); N = P x K = {fmt(w['p_times_classes'])} is Belkin et al.'s threshold for K outputs.",
            f"N* = the smallest N whose median training error over seeds is <= {100 * w['fit_tolerance']:g} % "
            "(the training labels include the label noise; the test labels are clean).",
            f"Ensemble: the softmax outputs of the k = {w['ensemble_k']} networks of a width (one per seed) averaged.",
        ] + width.headline(w)))
    return write_documents(sweep_dir, "Sweep over " + ", ".join(analysis["axes"]), summary, made,
                           [p for p in PLOTS if p not in made], _tables(trials, analysis), sections)
