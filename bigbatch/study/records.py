"""Trial records: what one trial of a sweep leaves behind, how it is written and read back.

No Ray and no torch: the sweep driver, its trials, `bigbatch report` and the SLURM sweep jobs all
read and write the same files through these functions.

    SWEEP/runs/<trial>/trial.json   one trial's record (`trial_record`), written atomically
    SWEEP/trials.jsonl              every trial's record, one per line
    SWEEP/critical.json             the critical-batch-size fit (`bigbatch.study.critical.analyse`)
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

from bigbatch import folders
from bigbatch.errors import UsageError
from bigbatch.study import critical

TRIAL_RECORD, TRIALS, CRITICAL, RUNS_DIR = folders.TRIAL_RECORD, folders.TRIALS, folders.CRITICAL, folders.RUNS
read_rows = folders.read_jsonl


def eval_row(row: dict[str, Any]) -> bool:
    return row.get("test_acc") is not None or row.get("test_loss") is not None


def metric_crossing(rows: list[dict[str, Any]], key: str, value: float) -> dict[str, float] | None:
    """Where metric `key` first reaches `value` (a loss from above, anything else from below) over a
    run's metrics rows, interpolated between the evaluations around it (`critical.crossing`): the
    evaluations during training, not a final full-set one (`eval_set = "full"`)."""
    during = [(r["step"], r[key]) for r in rows if eval_row(r) and r.get(key) is not None and r.get("eval_set") != "full"]
    return critical.crossing(during, value, higher_is_better=not key.endswith("loss"))


def trial_record(point: dict[str, Any], summary: dict[str, Any] | None, rows: list[dict[str, Any]],
                 gap_epochs: float | None, status: str, error: str | None = None,
                 measured: dict[str, Any] | None = None, *, target: dict[str, float] | None = None,
                 extra: dict[str, Any] | None = None) -> dict[str, Any]:
    """One line of trials.jsonl from a trial's summary.json and metrics.jsonl rows.

    With `target` ({metric: value}), steps_to_target is the crossing interpolated between the
    evaluations around it (`critical.crossing`); the step of the first evaluation at the target
    is kept as steps_to_target_eval and the bracket's relative width as crossing_resolution.
    """
    s = summary or {}
    evals = [r for r in rows if eval_row(r)]
    last = evals[-1] if evals else {}

    def value(key: str) -> Any:
        return s.get(key) if s.get(key) is not None else last.get(key)

    rec: dict[str, Any] = {
        "batch": point["batch"], "lr_multiplier": point["lr_multiplier"], "seed": point["seed"],
        "lr": s.get("peak_lr"), "status": status,
        "steps_to_target": s.get("steps_to_target"), "examples_to_target": s.get("examples_to_target"),
        "steps": s.get("steps", rows[-1].get("step") if rows else None),
        "epochs": s.get("epochs", rows[-1].get("epoch") if rows else None),
        "train_loss": value("train_loss"), "test_loss": value("test_loss"),
        "train_acc": value("train_acc"), "test_acc": value("test_acc"),
        "world_size": s.get("world_size"), "wall_s": s.get("wall_s"), "error": error,
        "phase": point.get("phase") or "critical",
    }
    if tokens_per_example(s):  # sequence tasks: the batch and examples are in sequences of T tokens
        rec["tokens_per_example"] = tokens_per_example(s)
    if point.get("race") is False:  # the unraced rerun of a raced seed (adaptive.unsettled_races)
        rec["race"] = False
    if point.get("axes"):  # the values of a sweep's further axes (`bigbatch.study.axes`)
        rec["axes"] = dict(point["axes"])
    if target and rec["steps_to_target"] is not None:
        (key, value), = target.items()
        c = metric_crossing(evals, key, value)
        if c is not None:
            rec["steps_to_target_eval"] = rec["steps_to_target"]
            rec["steps_to_target"], rec["crossing_resolution"] = c["steps"], c["resolution"]
            rec["examples_to_target"] = c["steps"] * point["batch"]
    rec["gap"] = _diff(rec["train_acc"], rec["test_acc"])
    rec["loss_gap"] = _diff(rec["test_loss"], rec["train_loss"])
    budget = None
    if gap_epochs is not None:
        within = [r for r in evals if r.get("epoch") is not None and r["epoch"] <= gap_epochs * (1 + 1e-9)]
        # The budget row is only meaningful if the trial actually trained up to the budget.
        if within and (rec["epochs"] or 0) >= gap_epochs * (1 - 1e-9):
            budget = within[-1]
    for k in ("train_acc", "test_acc"):
        rec[f"{k}_at_budget"] = budget.get(k) if budget else None
    rec["gap_at_budget"] = _diff(rec["train_acc_at_budget"], rec["test_acc_at_budget"])
    rec["loss_gap_at_budget"] = _diff(budget.get("test_loss"), budget.get("train_loss")) if budget else None
    # B_simple (measure.gns) nearest the target: the last value logged up to steps_to_target.
    upto = rec["steps_to_target"] if rec["steps_to_target"] is not None else math.inf
    b_simple = [r["gns/b_simple"] for r in rows if r.get("gns/b_simple") is not None and r.get("step", 0) <= upto]
    # The per-example value at the target weights is exact; the online EMA (measure.gns) lags and
    # is noisy, so it is the fallback and is kept beside it.
    rec["b_simple_online_at_target"] = b_simple[-1] if b_simple and rec["steps_to_target"] is not None else None
    # ... and averaged over training up to the target, step-weighted (McCandlish et al.'s "appropriately averaged")
    rec["b_simple_online_mean_to_target"] = (training_mean([r for r in rows if r.get("step", 0) <= upto])
                                             if rec["steps_to_target"] is not None else None)
    set_measured(rec, measured)
    sharp = [r["sharpness/top"] for r in rows if r.get("sharpness/top") is not None]
    rec["sharpness"] = sharp[-1] if sharp else None
    rec.update(extra or {})
    return rec


def tokens_per_example(summary: dict[str, Any] | None) -> int | None:
    """T, the targets per example of a sequence task, from a run's summary.json (None for one
    label per example). Older summaries hold only `tokens` and `examples`."""
    s = summary or {}
    if s.get("tokens_per_example"):
        return int(s["tokens_per_example"])
    if s.get("tokens") and s.get("examples"):
        return round(s["tokens"] / s["examples"])
    return None


def training_mean(rows: list[dict[str, Any]], key: str = "gns/b_simple") -> float | None:
    """The online estimate averaged over training, each logged value weighted by the steps since
    the previous one (McCandlish et al. 2018's "appropriately averaged" noise scale: B_simple
    grows as the loss falls, so the value at the end overstates the batch that was useful on
    the way). None when the run logged none."""
    points = [(r["step"], r[key]) for r in rows if r.get(key) is not None and r.get("step") is not None]
    total = weight = 0.0
    previous = 0
    for step, value in points:
        total += (step - previous) * value
        weight += step - previous
        previous = step
    return total / weight if weight > 0 else None


def set_measured(rec: dict[str, Any], measured: dict[str, Any] | None) -> dict[str, Any]:
    """B_simple / B_noise at the target in `rec`: `measured` is `bigbatch measure`'s train-mode
    reference at the target weights (`bigbatch.study.at_target`), else the online EMA stands in."""
    m = measured or {}
    online = rec.get("b_simple_online_at_target")
    # a measurement whose |G|^2 was not resolved is a lower bound (b_simple_lower_bound_at_target,
    # with its reason), never replaced by the online EMA; the EMA stands in only where nothing was measured
    rec["b_simple_at_target"] = m["b_simple"] if m.get("b_simple") is not None else (None if m else online)
    rec["b_simple_source"] = "train_mode" if m else ("online" if online is not None else None)
    rec["b_noise_at_target"] = m.get("b_noise")
    rec["micro_batch"] = m.get("micro_batch")
    for name in ("b_simple", "b_noise"):
        for part in ("se", "interval", "lower_bound", "reason"):
            rec[f"{name}_{part}_at_target"] = m.get(f"{name}_{part}")
    rec["b_simple_own_b_at_target"] = (m.get("own_b") or {}).get("b_simple")
    rec["own_micro_batch"] = (m.get("own_b") or {}).get("micro_batch")
    return rec


def _diff(a: Any, b: Any) -> float | None:
    return None if a is None or b is None else float(a) - float(b)


def trial_status(summary: dict[str, Any]) -> str:
    """A finished trial's status from its run's summary.json: diverged, slower (raced), ok (reached
    the target) or not_reached."""
    if summary.get("status") in ("diverged", "slower"):
        return summary["status"]
    return "ok" if summary.get("steps_to_target") is not None else "not_reached"


def record_trial(run_dir: Path, point: dict[str, Any], gap_epochs: float | None, summary: dict[str, Any] | None,
                  status: str, *, target: dict[str, float] | None = None,
                  extra: dict[str, Any] | None = None) -> dict[str, Any]:
    rec = trial_record(point, summary, folders.RunFolder(run_dir).read_metrics(), gap_epochs, status,
                       target=target, extra=extra)
    rec["run_dir"] = str(run_dir)
    write_trial_record(run_dir, rec)
    return rec


def write_trial_record(run_dir: Path, rec: dict[str, Any]) -> None:
    """RUN_DIR/trial.json, atomically (a sweep reading it never sees half a record)."""
    folders.RunFolder(run_dir).write_trial_record(rec)


def load_sweep(sweep_dir: Path) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """(trials, analysis): the records of trials.jsonl and critical.json refitted from them."""
    sweep = folders.SweepFolder(sweep_dir)
    if not sweep.trials.is_file():
        raise UsageError("SWEEP_DIR", f"{str(sweep_dir)!r} has no {folders.TRIALS} (not a finished sweep folder)")
    trials = sweep.read_trials()
    analysis = critical.analyse(trials)
    if (spec := sweep.read_spec()) is not None:
        analysis["sweep"] = spec.get("name")
        analysis["added_batches"] = critical.added_batches(trials, spec.get("batch_sizes") or [])
        analysis["target"] = spec.get("target") or (spec.get("base") or {}).get("target") or {}
    elif (old := sweep.read_critical()) is not None:  # keep the names a sweep folder without its spec had
        analysis["sweep"], analysis["target"] = old.get("sweep"), old.get("target", {})
    return trials, analysis


def fmt(v: Any, digits: int = 4) -> str:
    """A number for a table: 4 significant digits, integers as integers, missing as n/a."""
    if v is None:
        return "n/a"
    if isinstance(v, float) and not math.isfinite(v):
        return "inf" if v > 0 else "n/a"
    if isinstance(v, int) or (isinstance(v, float) and v.is_integer() and abs(v) >= 100):
        return f"{int(v):,}"
    return f"{v:.{digits}g}"


def _ci(analysis: dict[str, Any], key: str) -> str:
    ci = analysis.get(f"{key}_ci")
    if analysis.get("ci_unavailable"):
        return f" [{analysis['ci_unavailable']}]"
    if not ci:
        return ""
    return f" [{fmt(ci[0])}, {fmt(ci[1]) if ci[1] is not None else 'inf'}]"


# McCandlish et al. 2018, Table 1 (run averages, as read by a third party; REFERENCES.md)
MCCANDLISH_TABLE_1 = ("McCandlish et al. 2018 Table 1: B_crit / B_simple = 0.22 MNIST, 0.13 SVHN, 0.45 CIFAR-10, "
                      "0.5 ImageNet; their model predicts B_crit ~ B_noise, i.e. B_crit / B_noise ~ 1")


def _range(ci: list | None, digits: int = 0) -> str:
    if not ci:
        return ""
    return f" [{fmt(ci[0], digits) if digits else fmt(ci[0])}, {'unbounded' if ci[1] is None else (fmt(ci[1], digits) if digits else fmt(ci[1]))}]"


def _noise_line(analysis: dict[str, Any], name: str, label: str) -> str:
    """B_simple / B_noise at the target, its interval, the failed estimates and B_crit over it."""
    bounds = analysis.get(f"{name}_at_target_lower_bounds") or 0
    ratio = analysis.get(f"b_crit_over_{name}")
    return (f"{label} at target = {'>= ' if bounds else ''}{fmt(analysis[f'{name}_at_target'])}"
            + _range(analysis.get(f"{name}_at_target_interval"))
            + (f" ({bounds} batch(es) only a lower bound)" if bounds else "")
            + (f"   B_crit / {label} = {fmt(ratio, 2)}{_range(analysis.get(f'b_crit_over_{name}_interval'), 2)}"
               if ratio is not None else ""))


def _tokens_line(analysis: dict[str, Any]) -> str:
    """The batch-size answers of a sequence task in tokens (batches count sequences of T tokens)."""
    tok, T = analysis["in_tokens"], analysis["tokens_per_example"]
    ci = {"ci_unavailable": analysis.get("ci_unavailable"), **tok}
    return (f"in tokens (x {T} per sequence): B_crit = {fmt(tok['b_crit'])}{_ci(ci, 'b_crit')}   "
            f"E_min = {fmt(tok['e_min'])}{_ci(ci, 'e_min')} tokens   B_simple at target = "
            f"{'>= ' if analysis.get('b_simple_at_target_lower_bounds') else ''}{fmt(tok['b_simple_at_target'])}{_range(tok.get('b_simple_at_target_interval'))}"
            "   (noise scales measured per sequence on the token-averaged loss, then x T)")


def _agreement(analysis: dict[str, Any]) -> str:
    """What the intervals say about McCandlish et al.'s B_crit ~ B_noise: stated only when they support it."""
    ci = analysis.get("b_crit_over_b_noise_interval")
    if not ci or ci[0] is None:
        return "B_crit vs B_noise: no interval (no B_noise or B_crit interval), no agreement claimed"
    if ci[1] is None or ci[0] <= 0:
        return ("B_crit vs B_noise: the interval of their ratio is unbounded (a B_noise interval without an end): "
                "neither agreement nor disagreement shown")
    if ci[0] <= 1 <= ci[1]:
        return "B_crit vs B_noise: the ratio's interval contains 1, consistent with B_crit ~ B_noise (McCandlish et al.)"
    return (f"B_crit vs B_noise: the ratio's interval excludes 1 (B_crit is {'smaller' if ci[1] < 1 else 'larger'}): "
            "McCandlish et al.'s B_crit ~ B_noise is not supported here")


def headline(analysis: dict[str, Any]) -> list[str]:
    """The numbers a study ends with, one per line."""
    lines = [
        f"B_crit = {fmt(analysis['b_crit'])}{_ci(analysis, 'b_crit')}   S_min = {fmt(analysis['s_min'])}{_ci(analysis, 's_min')} steps   "
        f"E_min = {fmt(analysis['e_min'])}{_ci(analysis, 'e_min')} examples",
        (f"(no interval: {analysis['ci_unavailable']} at a batch's best lr; an interval needs >= 3; "
         if analysis.get("ci_unavailable") else
         f"(95 % intervals: bootstrap over seed ids, lr selection inside; >= {analysis.get('n_seeds', 1)} seeds "
         "per batch at its best lr; ")
        + f"fit r2 = {fmt(analysis['r2'], 3)}"
        + (f"; crossings resolved to <= {100 * analysis['crossing_resolution_max']:.1f} %"
           if analysis.get("crossing_resolution_max") is not None else "") + ")",
        _noise_line(analysis, "b_simple", "B_simple")
        + (f"   (online EMA at target: {fmt(analysis['b_simple_online_at_target'])})"
           if analysis.get("b_simple_online_at_target") is not None else ""),
    ]
    if analysis.get("in_tokens"):
        lines.append(_tokens_line(analysis))
    if analysis.get("b_noise_at_target") is not None:
        lines.append(_noise_line(analysis, "b_noise", "B_noise"))
    if analysis.get("b_crit_over_b_simple") is not None or analysis.get("b_crit_over_b_noise") is not None:
        mb = analysis.get("noise_micro_batches")
        lines.append("(noise scales on the trained loss (BatchNorm, where the model has it, in train mode)"
                     + (f" at one micro-batch of {', '.join(str(b) for b in mb)} for every batch size" if mb else "")
                     + "; intervals: median of the per-batch jackknife intervals. " + MCCANDLISH_TABLE_1 + ")")
        lines.append(_agreement(analysis))
    trend = (analysis.get("gap_trend") or {}).get("gap")
    if trend is not None:
        ci = trend.get("ci")
        lines.append(f"gap phase ({analysis.get('gap_criterion')}): train - test accuracy "
                     f"{100 * trend['slope']:+.2f} points per doubling of the batch"
                     + (f" [{100 * ci[0]:+.2f}, {100 * ci[1]:+.2f}]" if ci else ""))
    sharp = (analysis.get("gap_trend") or {}).get("log2_sharpness")
    if sharp is not None:
        ci = sharp.get("ci")
        lines.append(f"sharpness (train-mode top Hessian eigenvalue) x {2 ** sharp['slope']:.2f} per doubling"
                     + (f" [{2 ** ci[0]:.2f}, {2 ** ci[1]:.2f}]" if ci else ""))
    lines += outlier_lines(analysis)
    if analysis.get("added_batches"):
        lines.append(f"batch sizes added to bracket B_crit (search.add_batches): {analysis['added_batches']}")
    if analysis.get("outside_swept_range"):
        lines.append(f"outside the swept range: {analysis['outside_swept_range']}")
    if analysis.get("edge_batches"):
        lines.append(f"best lr still at an edge of the lr grid (S there is an upper bound): {analysis['edge_batches']}")
    if analysis.get("note"):
        lines.append(f"note: {analysis['note']}")
    return lines


def outlier_lines(analysis: dict[str, Any]) -> list[str]:
    """The gap phase's Hessian outliers vs batch (Sagun et al.: larger batches, larger outliers;
    Gur-Ari et al. 2018: the gradient in the top eigenspace), one line, when recorded."""
    rows = analysis.get("gap_outliers") or []
    if not rows:
        return []
    trend = analysis.get("gap_trend") or {}

    def factor(key: str) -> str:
        t = trend.get(key)
        if t is None:
            return "n/a"
        return f"x {2 ** t['slope']:.2f} per doubling" + (f" [{2 ** t['ci'][0]:.2f}, {2 ** t['ci'][1]:.2f}]" if t.get("ci") else "")

    def per_batch(key: str, digits: int) -> str:
        return ", ".join(f"{fmt(r['batch'])}: {fmt(r[key], digits)}" for r in rows if r.get(key) is not None)

    c, k = rows[0].get("num_classes"), rows[0]["k"]
    return [f"Hessian outliers (gap phase, top-{k} at the sharpness micro-batch, median over seeds): lambda_1 "
            f"{factor('log2_sharpness')}, lambda_{c} (C = classes) {factor('log2_class_eigenvalue')}; "
            f"outliers by the gap rule per batch {per_batch('outliers', 2)}; gradient in the top-{k} space "
            f"{per_batch('grad_fraction_top_k', 2)}"]
