"""Does the large-minibatch recipe recover small-batch accuracy? MNIST-1D CNN on the CPU.

Claim tested: at the same epoch budget, a large global batch (default 4096, 32x the baseline's 128)
loses accuracy with the small-batch lr, and the recipe (linear scaling + gradual warmup, Goyal et
al. 2017; LARS + warmup + poly, You et al. 2017; batch-size control, Mikami et al. 2018 / Smith et
al. 2018; LAMB, You et al. 2019) wins some or all of it back. Every method trains the model of
configs/mnist1d-cnn.toml for that config's epochs through `bigbatch.trainer.loop.run`, over several
seeds (model init and data order; the dataset is fixed), and reports mean +- std test accuracy.

Prints one JSON object (hardware, torch version, per-method accuracies, mean, std, steps, wall
time) and writes a plot: test accuracy per method, and the lr / global batch each method used.

    flock /tmp/bigbatch-cpu.lock python benchmarks/recipe.py --seeds 5 --json recipe.json --plot recipe.png

--sweep: the same question across global batches (default 128 ... 8192, from the baseline to ~11x
the measured critical batch) for eight methods, each a rule that sets the lr/warmup/optimizer as a
function of the batch (`sweep_method`). It prints and writes one JSON (a row per method x batch x
seed, mean +- std per method x batch, CPU and wall time) and a plot of test error vs batch with
B_crit marked (from --critical CRITICAL_JSON, else B_crit = 458 [408, 580] measured by `bigbatch study`
on this task, benchmarks/RESULTS.md). Runs go to --jobs worker processes with one torch thread each; every
finished run is appended to --rows at once, so --resume continues a cut sweep. It measures accuracy,
not time: run it at low priority without the CPU lock.

    nice -n 19 python benchmarks/recipe.py --sweep --seeds 3 --json docs/recipe-sweep.json --plot docs/recipe-sweep.png
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import platform
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
BASE_CONFIG = ROOT / "configs" / "mnist1d-cnn.toml"
LARGE_BATCH_CONFIG = ROOT / "configs" / "mnist1d-cnn-large-batch.toml"


def methods(small: int, large: int, epochs: float) -> dict[str, tuple[Path, list[str]]]:
    """name -> (config file, overrides). Everything not overridden is configs/mnist1d-cnn.toml."""
    big = [f"batch.global_batch={large}"]
    warm = max(round(epochs / 6, 2), 0.25)  # gradual warmup: a sixth of the budget (Goyal: 5 of 90 epochs)
    quarter, half = large // 4, large // 2
    return {
        f"baseline B={small}": (BASE_CONFIG, [f"batch.global_batch={small}"]),
        "(a) unscaled lr": (BASE_CONFIG, big + ["optim.scaling='none'", "schedule.warmup_epochs=0"]),
        "(b) linear, no warmup": (BASE_CONFIG, big + ["schedule.warmup_epochs=0"]),
        "(c) linear + gradual warmup": (BASE_CONFIG, big + [f"schedule.warmup_epochs={warm}", "schedule.warmup_start='base'"]),
        "(d) LARS + warmup + poly": (BASE_CONFIG, big + [
            "optim.name='lars'", "optim.scaling='none'", "optim.base_lr=20.0", "schedule.name='poly'",
            f"schedule.warmup_epochs={warm}", "schedule.warmup_start=0.0", "schedule.end_lr=1e-4"]),
        "(e) batch schedule": (BASE_CONFIG, big + [
            f"batch.phases=[[0, {quarter}], [{epochs / 3:g}, {half}], [{2 * epochs / 3:g}, {large}]]",
            "optim.base_lr=0.4", f"optim.base_batch={quarter}", "batch.lr_follows_batch=false",
            f"schedule.warmup_epochs={warm}", "schedule.warmup_start=0.0", "schedule.name='constant'"]),
        "(f) LAMB + warmup + cosine (shipped config)": (LARGE_BATCH_CONFIG, big),
    }


def run_method(config_path: Path, overrides: list[str], seed: int, num_samples: int | None, workdir: Path) -> dict:
    from bigbatch import config
    from bigbatch.trainer.loop import run

    extra = [f"train.seed={seed}", "train.log_every=1", "train.eval_every=0", "track.progress='off'", "track.wandb=false"]
    if num_samples:
        extra.append(f"data.num_samples={num_samples}")
    cfg = config.load(config_path, overrides + extra)
    out = workdir / f"{cfg.name}-{abs(hash(tuple(overrides))) % 10**8}-s{seed}"
    t0 = time.perf_counter()
    summary = run(cfg, out)
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines() if '"loss"' in line]
    return {
        "test_acc": summary["test_acc"], "train_acc": summary["train_acc"], "steps": summary["steps"],
        "epochs": summary.get("epochs"), "wall_s": time.perf_counter() - t0,
        "curve": {k: [r[k] for r in rows] for k in ("epoch", "lr", "global_batch", "loss")},
        "final_global_batch": rows[-1]["global_batch"], "epochs_budget": cfg.train.epochs,
    }


def plot(results: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(results)
    fig, (ax_acc, ax_lr, ax_b) = plt.subplots(1, 3, figsize=(16, 4.8))
    means = [results[n]["mean"] for n in names]
    stds = [results[n]["std"] for n in names]
    ax_acc.barh(range(len(names)), means, xerr=stds, color="tab:blue", alpha=0.8, capsize=3)
    ax_acc.set_yticks(range(len(names)), names)
    ax_acc.invert_yaxis()
    ax_acc.axvline(0.94, color="k", ls="--", lw=1, label="94 %")
    ax_acc.set_xlim(min(min(means) - 0.05, 0.9), 1.0)
    ax_acc.set_xlabel("test accuracy (mean ± std over seeds)")
    ax_acc.legend(loc="lower right")
    for n in names:
        c = results[n]["curve_seed0"]
        ax_lr.plot(c["epoch"], c["lr"], label=n)
        ax_b.plot(c["epoch"], c["global_batch"], label=n)
    ax_lr.set_yscale("log")
    ax_lr.set_xlabel("epoch")
    ax_lr.set_ylabel("learning rate")
    ax_b.set_yscale("log", base=2)
    ax_b.set_xlabel("epoch")
    ax_b.set_ylabel("global batch")
    ax_b.legend(fontsize=7, loc="lower right")
    fig.suptitle("MNIST-1D CNN, same epoch budget: small batch vs large batch with and without the recipe")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


# --- the sweep across batch sizes -----------------------------------------------------------------

SWEEP_BATCHES = (128, 256, 512, 1024, 2048, 4096, 8192)
# method -> how it sets the run at global batch B (W = the warmup, E = the epoch budget)
SWEEP_METHODS = {
    "unscaled": "SGD at the small-batch lr (0.05) at every batch, no warmup, cosine",
    "linear": "SGD, linear rule (0.05 per 128), no warmup, cosine",
    "linear+constant": "SGD, linear rule, constant warmup: 0.05 for W epochs, then the scaled lr (Goyal 2.2), cosine",
    "linear+gradual": "SGD, linear rule, gradual warmup from 0.05 over W epochs (Goyal), cosine",
    "sqrt+gradual": "SGD, square-root rule, gradual warmup from 0.05 over W epochs, cosine",
    "lars": "LARS (eta 0.001), lr 20 at 4096 by the sqrt rule, warmup from 0 over W epochs, poly (power 2)",
    "lamb": "LAMB as configs/mnist1d-cnn-large-batch.toml (lr 0.1 at 4096) by the sqrt rule, warmup from 0 over W, cosine",
    "batch-schedule": "batch B/4 -> B/2 -> B at epochs 0, E/3, 2E/3; lr 0.05 per 128 at B/4, held; warmup from 0 over W",
}
SGD_RULES = ("unscaled", "linear", "linear+constant", "linear+gradual", "sqrt+gradual")
# The critical batch of this task when no --critical is given: `bigbatch study` on configs/mnist1d-cnn.toml.
MEASURED_B_CRIT = {
    "b_crit": 458.0, "interval": [408.0, 580.0],
    "source": "benchmarks/RESULTS.md, 'Critical batch size of the MNIST-1D CNN': bigbatch study (issue 13), 79 trials, "
              "batches 16-2048, 3 seeds at the best lrs, target 95 %, 95 % bootstrap interval over seeds "
              "(the earlier single-seed study, batches 8-4096, gave 730.5)",
}
CHANCE_ACC = 0.1  # MNIST-1D has 10 classes: a diverged run counts as chance accuracy


def sweep_method(method: str, batch: int, *, base_lr: float, base_batch: int, warmup_epochs: float,
                 epochs: float) -> tuple[Path, list[str]]:
    """(config file, overrides) of `method` at global batch `batch`; see SWEEP_METHODS.

    At the base batch every SGD rule gives the base lr and a warmup from it is flat, so all five
    are one run there: the baseline config itself (its 0.5-epoch warmup from the base lr is a no-op,
    so it is dropped: then a budget shorter than 0.5 epochs works too).
    """
    b = [f"batch.global_batch={batch}"]
    sgd = [f"optim.base_lr={base_lr:g}", f"optim.base_batch={base_batch}"]
    w = f"schedule.warmup_epochs={warmup_epochs:g}"
    if method in SGD_RULES and batch == base_batch:
        return BASE_CONFIG, b + sgd + ["schedule.warmup_epochs=0"]
    if method == "unscaled":
        return BASE_CONFIG, b + sgd + ["optim.scaling='none'", "schedule.warmup_epochs=0"]
    if method == "linear":
        return BASE_CONFIG, b + sgd + ["optim.scaling='linear'", "schedule.warmup_epochs=0"]
    if method == "linear+constant":
        return BASE_CONFIG, b + sgd + ["optim.scaling='linear'", w, "schedule.warmup_start='base'", "schedule.warmup_shape='constant'"]
    if method == "linear+gradual":
        return BASE_CONFIG, b + sgd + ["optim.scaling='linear'", w, "schedule.warmup_start='base'"]
    if method == "sqrt+gradual":
        return BASE_CONFIG, b + sgd + ["optim.scaling='sqrt'", w, "schedule.warmup_start='base'"]
    if method == "lars":
        return BASE_CONFIG, b + ["optim.name='lars'", "optim.base_lr=20.0", "optim.base_batch=4096", "optim.scaling='sqrt'",
                                 "schedule.name='poly'", w, "schedule.warmup_start=0.0", "schedule.end_lr=1e-4"]
    if method == "lamb":
        return LARGE_BATCH_CONFIG, b + ["optim.scaling='sqrt'", w, "schedule.warmup_start=0.0"]
    if method == "batch-schedule":
        if batch % 4:
            raise ValueError(f"--batches: the batch schedule needs batches divisible by 4, got {batch}")
        return BASE_CONFIG, b + sgd + [
            f"batch.phases=[[0, {batch // 4}], [{epochs / 3:g}, {batch // 2}], [{2 * epochs / 3:g}, {batch}]]",
            "optim.scaling='linear'", "batch.lr_follows_batch=false", w, "schedule.warmup_start=0.0", "schedule.name='constant'"]
    raise ValueError(f"--methods: unknown method {method!r}; expected one of {', '.join(SWEEP_METHODS)}")


def _sweep_worker_init() -> None:
    import torch

    torch.set_num_threads(1)  # one core's worth per run: no spin-waiting threads on a shared CPU
    logging.disable(logging.WARNING)


def sweep_one(task: dict) -> dict:
    """One run of the sweep: trains `task`'s config through `bigbatch.trainer.loop.run` and returns its row."""
    from bigbatch import config
    from bigbatch.trainer.loop import run

    extra = [f"train.seed={task['seed']}", f"train.epochs={task['epochs']:g}", "train.log_every=10", "train.eval_every=0",
             "track.progress='off'", "track.wandb=false"]
    if task["num_samples"]:
        extra.append(f"data.num_samples={task['num_samples']}")
    cfg = config.load(ROOT / task["config"], task["overrides"] + extra)
    t0, c0 = time.perf_counter(), time.process_time()
    try:
        with tempfile.TemporaryDirectory(prefix="bigbatch-recipe-sweep-") as out:
            summary = run(cfg, Path(out))
    except Exception as e:  # the project's errors do not pickle back from a worker: send the text
        raise RuntimeError(f"{task['key']} seed {task['seed']}: {type(e).__name__}: {e}") from None
    if summary["status"] not in ("completed", "diverged"):  # e.g. "preempted" by a SIGTERM: not a result
        raise RuntimeError(f"{task['key']} seed {task['seed']}: run ended {summary['status']!r}")
    diverged = summary["status"] == "diverged"
    return {
        "key": task["key"], "seed": task["seed"], "status": summary["status"],
        "test_acc": CHANCE_ACC if diverged else summary["test_acc"], "train_acc": None if diverged else summary["train_acc"],
        "test_loss": None if diverged else summary["test_loss"], "steps": summary["steps"], "epochs": summary["epochs"],
        "peak_lr": summary["peak_lr"], "final_global_batch": summary["global_batch"],
        "wall_s": time.perf_counter() - t0, "cpu_s": time.process_time() - c0,
    }


def run_key(config_path: Path, overrides: list[str]) -> str:
    """One name per distinct run (methods that coincide at a batch share it)."""
    return f"{config_path.name}|" + "|".join(overrides)


def sweep_tasks(batches: list[int], method_names: list[str], seeds: int, *, base_lr: float, base_batch: int,
                warmup_epochs: float, epochs: float, num_samples: int | None) -> tuple[list[dict], dict]:
    """The distinct runs, in batch order then seed then method, and (method, batch) -> run key."""
    cells: dict[tuple[str, int], str] = {}
    runs: dict[str, tuple[Path, list[str]]] = {}
    for batch in batches:
        for m in method_names:
            path, overrides = sweep_method(m, batch, base_lr=base_lr, base_batch=base_batch,
                                           warmup_epochs=warmup_epochs, epochs=epochs)
            key = run_key(path, overrides)
            cells[(m, batch)] = key
            runs.setdefault(key, (path, overrides))
    tasks = []
    for batch in batches:  # a sweep cut short loses whole (largest-listed) batches, never seeds of one
        keys = list(dict.fromkeys(cells[(m, batch)] for m in method_names))
        for seed in range(seeds):
            for key in keys:
                path, overrides = runs[key]
                tasks.append({"key": key, "seed": seed, "config": str(path.relative_to(ROOT)), "overrides": overrides,
                              "epochs": epochs, "num_samples": num_samples})
    return tasks, cells


def read_critical(path: Path | None) -> dict:
    """B_crit to mark: a study's critical.json (its `b_crit`, and an interval if it has one), else MEASURED_B_CRIT."""
    if path is None:
        return dict(MEASURED_B_CRIT)
    data = json.loads(path.read_text())
    b = data.get("b_crit")
    if not isinstance(b, (int, float)) or not b > 0:
        raise ValueError(f"{path} has no positive b_crit (got {b!r})")
    out = {"b_crit": float(b), "source": str(path)}
    for name in ("b_crit_interval", "b_crit_ci", "b_crit_90"):
        iv = data.get(name) or (data.get("fit") or {}).get(name)
        if isinstance(iv, (list, tuple)) and len(iv) == 2 and all(isinstance(v, (int, float)) for v in iv):
            out["interval"] = [float(iv[0]), float(iv[1])]
            break
    return out


def summarise_sweep(rows: list[dict], cells: dict[tuple[str, int], str], method_names: list[str], batches: list[int]) -> dict:
    """method -> batch -> mean +- std (over seeds) of test accuracy and the run's settings."""
    by_key: dict[str, list[dict]] = {}
    for r in rows:
        by_key.setdefault(r["key"], []).append(r)
    table: dict[str, dict[str, dict]] = {}
    for m in method_names:
        table[m] = {}
        for batch in sorted(batches):
            runs = sorted(by_key.get(cells[(m, batch)], []), key=lambda r: r["seed"])
            if not runs:
                continue
            accs = [r["test_acc"] for r in runs]
            table[m][str(batch)] = {
                "test_acc": accs, "seeds": [r["seed"] for r in runs],
                "mean": statistics.fmean(accs), "std": statistics.stdev(accs) if len(accs) > 1 else 0.0,
                "diverged": sum(r["status"] == "diverged" for r in runs),
                "steps": runs[0]["steps"], "epochs": runs[0]["epochs"], "peak_lr": runs[0]["peak_lr"],
                "final_global_batch": runs[0]["final_global_batch"],
                "shared_with": sorted(o for o in method_names if o != m and cells[(o, batch)] == cells[(m, batch)]),
                "run": cells[(m, batch)],
            }
    return table


def matches_baseline(table: dict, baseline_mean: float, b_crit: float, tolerance: float = 0.005) -> dict:
    """method -> the largest batch up to which every measured batch's mean test accuracy is within
    `tolerance` (0.5 points) of the baseline's, and that batch as a multiple of B_crit (means only:
    with 3 seeds the stds here are 0.1-0.3 points, so a cell at the edge can fall either way)."""
    out = {}
    for m, cells in table.items():
        ok = None
        for b in sorted(int(k) for k in cells):
            if cells[str(b)]["mean"] < baseline_mean - tolerance:
                break
            ok = b
        out[m] = {"batch": ok, "x_b_crit": None if ok is None else ok / b_crit}
    return out


def markdown_table(table: dict, b_crit: float) -> str:
    """The method x batch table (test accuracy %, mean ± std over seeds) as Markdown; n < 3 seeds is marked."""
    batches = sorted({int(b) for cells in table.values() for b in cells})
    head = "| method | " + " | ".join(f"{b} ({b / b_crit:.2g}×)" for b in batches) + " |"
    lines = [head, "|---|" + "---|" * len(batches)]
    for m, cells in table.items():
        out = []
        for b in batches:
            c = cells.get(str(b))
            if c is None:
                out.append("—")
                continue
            text = f"{100 * c['mean']:.2f} ± {100 * c['std']:.2f}"
            if len(c["seeds"]) < 3:
                text += f" (n={len(c['seeds'])})"
            if c["diverged"]:
                text += f" ({c['diverged']} diverged)"
            out.append(text)
        lines.append(f"| {m} | " + " | ".join(out) + " |")
    return "\n".join(lines) + "\n"


def plot_sweep(table: dict, critical: dict, baseline: dict | None, path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import matplotlib.ticker

    fig, (ax_err, ax_acc) = plt.subplots(1, 2, figsize=(15, 5.5))
    styles = ["o-", "s-", "^-", "D-", "v-", "P-", "X-", "*-"]
    for i, (m, cells) in enumerate(table.items()):
        bs = sorted(int(b) for b in cells)
        if not bs:
            continue
        mean = [cells[str(b)]["mean"] for b in bs]
        std = [cells[str(b)]["std"] for b in bs]
        ax_err.errorbar(bs, [100 * (1 - a) for a in mean], yerr=[100 * s for s in std], fmt=styles[i % len(styles)],
                        ms=5, capsize=3, label=m)
        ax_acc.errorbar(bs, [100 * a for a in mean], yerr=[100 * s for s in std], fmt=styles[i % len(styles)],
                        ms=5, capsize=3, label=m)
    bc = critical["b_crit"]
    batches = sorted({int(b) for cells in table.values() for b in cells})
    for ax in (ax_err, ax_acc):
        ax.set_xscale("log", base=2)
        ax.set_xticks(batches, [str(b) for b in batches])
        ax.xaxis.set_minor_locator(matplotlib.ticker.NullLocator())
        ax.axvline(bc, color="k", ls="--", lw=1.2, label=f"B_crit = {bc:.0f}")
        if "interval" in critical:
            ax.axvspan(*critical["interval"], color="k", alpha=0.08)
        ax.set_xlabel("global batch (same epoch budget)")
        ax.grid(True, which="both", alpha=0.3)
    if baseline:
        lo = 100 * (baseline["mean"] - 0.005)
        ax_acc.axhspan(lo, 100 * baseline["mean"], color="tab:green", alpha=0.12, label="baseline - 0.5 points")
        ax_err.axhspan(100 * (1 - baseline["mean"]), 100 - lo, color="tab:green", alpha=0.12)
    ax_err.set_yscale("log")
    ax_err.yaxis.set_major_formatter(matplotlib.ticker.FormatStrFormatter("%g"))
    ax_err.yaxis.set_minor_formatter(matplotlib.ticker.FormatStrFormatter("%g"))
    ax_err.set_ylabel("test error % (mean ± std over seeds, log)")
    ax_acc.set_ylabel("test accuracy % (mean ± std over seeds)")
    ax_acc.set_ylim(bottom=max(0.0, ax_acc.get_ylim()[0]))
    ax_acc.legend(fontsize=8, loc="lower left")
    top = ax_err.secondary_xaxis("top", functions=(lambda x: x / bc, lambda x: x * bc))
    top.set_xticks([b / bc for b in batches], [f"{b / bc:.2g}" for b in batches])
    top.xaxis.set_minor_locator(matplotlib.ticker.NullLocator())
    top.set_xlabel("global batch / B_crit")
    fig.suptitle(title + f"; B_crit = {bc:.0f} from {critical['source'].split(',')[0].split(':')[0]}", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def check_sweep_args(args: argparse.Namespace) -> str | None:
    """The first bad --sweep flag as 'flag: why', or None; also parses --batches/--methods/--critical."""
    try:
        args.batches = [int(v) for v in args.batches.split(",")] if args.batches else list(SWEEP_BATCHES)
    except ValueError:
        return f"--batches: expected comma-separated integers, got {args.batches!r}"
    if not args.batches or min(args.batches) < 4 or len(set(args.batches)) != len(args.batches):
        return f"--batches: expected distinct global batches >= 4, got {args.batches}"
    args.methods = [m for m in args.methods.split(",") if m] if args.methods else list(SWEEP_METHODS)
    bad = [m for m in args.methods if m not in SWEEP_METHODS]
    if bad or not args.methods:
        return f"--methods: unknown {', '.join(bad) or '(none given)'}; expected some of {','.join(SWEEP_METHODS)}"
    if "batch-schedule" in args.methods and any(b % 4 for b in args.batches):
        return "--batches: the batch schedule needs batches divisible by 4"
    if args.report_only and not args.rows.is_file():
        return f"--rows: --report-only needs the rows of a sweep, no such file {args.rows}"
    if args.jobs < 1:
        return f"--jobs: must be >= 1, got {args.jobs}"
    if args.epochs is not None and not args.epochs > 0:
        return f"--epochs: must be > 0, got {args.epochs}"
    if args.warmup_epochs is not None and args.warmup_epochs < 0:
        return f"--warmup-epochs: must be >= 0, got {args.warmup_epochs}"
    if args.num_samples is not None and args.num_samples < 100:
        return f"--num-samples: must be >= 100, got {args.num_samples}"
    try:
        args.critical_info = read_critical(args.critical)
    except (OSError, ValueError) as e:  # json.JSONDecodeError is a ValueError
        return f"--critical: {e}"
    return None


def sweep(args: argparse.Namespace) -> int:
    import concurrent.futures as cf
    import multiprocessing as mp
    import resource

    import torch

    from bigbatch import config

    base = config.load(BASE_CONFIG)
    epochs = args.epochs if args.epochs is not None else base.train.epochs
    warmup = args.warmup_epochs if args.warmup_epochs is not None else epochs / 6  # Goyal: 5 of 90 epochs; here 1 of 6
    method_names, batches, critical = args.methods, args.batches, args.critical_info
    tasks, cells = sweep_tasks(batches, method_names, args.seeds, base_lr=base.optim.base_lr, base_batch=args.small_batch,
                               warmup_epochs=warmup, epochs=epochs, num_samples=args.num_samples)
    rows: list[dict] = []
    if (args.resume or args.report_only) and args.rows.exists():
        wanted = {(t["key"], t["seed"]) for t in tasks}
        rows = [r for r in map(json.loads, args.rows.read_text().splitlines()) if (r["key"], r["seed"]) in wanted]
    done = {(r["key"], r["seed"]) for r in rows}
    todo = [] if args.report_only else [t for t in tasks if (t["key"], t["seed"]) not in done]
    print(f"sweep: {len(tasks)} distinct runs ({len(method_names)} methods x {len(batches)} batches x {args.seeds} seeds, "
          f"coinciding runs shared), {len(todo)} to run on {args.jobs} worker(s)", file=sys.stderr, flush=True)
    args.rows.parent.mkdir(parents=True, exist_ok=True)
    t_start, c_start = time.perf_counter(), time.process_time()
    with args.rows.open("a" if (args.resume or args.report_only) else "w") as sink, contextlib.ExitStack() as stack:
        if todo:
            pool = stack.enter_context(cf.ProcessPoolExecutor(max_workers=args.jobs, mp_context=mp.get_context("spawn"),
                                                              initializer=_sweep_worker_init))
            futures = [pool.submit(sweep_one, t) for t in todo]
            for i, fut in enumerate(cf.as_completed(futures), 1):
                row = {**fut.result(), "finished_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
                rows.append(row)
                sink.write(json.dumps(row) + "\n")
                sink.flush()
                print(f"[{i}/{len(todo)}] {row['key']} seed {row['seed']}: {row['test_acc']:.4f} ({row['status']}, "
                      f"{row['wall_s']:.0f} s)", file=sys.stderr, flush=True)
    wall = time.perf_counter() - t_start
    cpu = time.process_time() - c_start
    children = resource.getrusage(resource.RUSAGE_CHILDREN)
    table = summarise_sweep(rows, cells, method_names, batches)
    # the baseline: SGD at the base batch, where every SGD rule is the same run (configs/mnist1d-cnn.toml)
    base_cell = next((table[m][str(args.small_batch)] for m in method_names
                      if m in SGD_RULES and str(args.small_batch) in table[m]), None)
    report = {
        "benchmark": "recipe-sweep", "dataset": "mnist1d", "model": "cnn1d", "base_config": str(BASE_CONFIG.relative_to(ROOT)),
        "epochs": epochs, "warmup_epochs": warmup, "seeds": args.seeds, "batches": batches, "base_batch": args.small_batch,
        "base_lr": base.optim.base_lr, "num_samples": args.num_samples or base.data.num_samples,
        "methods": {m: SWEEP_METHODS[m] for m in method_names}, "critical": critical,
        "command": "python benchmarks/recipe.py " + " ".join(args.argv),
        "hardware": {"machine": platform.machine(), "processor": platform.processor() or platform.machine(),
                     "cpus": os.cpu_count(), "torch_threads_per_run": 1, "workers": args.jobs, "device": "cpu"},
        "torch": torch.__version__, "python": platform.python_version(),
        "time": {"wall_s": wall, "cpu_s_workers": children.ru_utime + children.ru_stime, "cpu_s_main": cpu,
                 "cpu_s_runs_sum": sum(r["cpu_s"] for r in rows), "runs": len(rows), "runs_this_invocation": len(todo),
                 "note": "cpu_s_runs_sum covers every row (also rows resumed from --rows); the other fields this invocation"},
        "baseline": None if base_cell is None else {"batch": args.small_batch, "mean": base_cell["mean"], "std": base_cell["std"],
                                                     "run": base_cell["run"]},
        "matches_baseline_within_0.5_points": None if base_cell is None else matches_baseline(table, base_cell["mean"],
                                                                                                critical["b_crit"]),
        "table": table, "rows": rows,
    }
    if rows and args.plot:
        title = (f"MNIST-1D CNN, {epochs:g} epochs at every batch, {args.seeds} seeds"
                 + (f"; baseline {100 * base_cell['mean']:.2f} % at {args.small_batch}" if base_cell else ""))
        plot_sweep(table, critical, base_cell, args.plot, title)
        report["plot"] = str(args.plot)
    text = json.dumps(report, indent=2)
    if args.json:
        args.json.write_text(text + "\n")
    if args.markdown and rows:
        args.markdown.write_text(markdown_table(table, critical["b_crit"]))
    for m in method_names:
        cells_m = table[m]
        print(f"{m:16s} " + "  ".join(f"{b}: {100 * c['mean']:.2f}±{100 * c['std']:.2f}" for b, c in cells_m.items()),
              file=sys.stderr)
    print(text)
    return 0


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--seeds", type=int, default=3, help="seeds per method (model init and data order)")
    p.add_argument("--small-batch", type=int, default=128)
    p.add_argument("--large-batch", type=int, default=4096)
    p.add_argument("--num-samples", type=int, default=None, help="MNIST-1D examples (default: the config's)")
    p.add_argument("--only", action="append", default=[], help="run only methods whose name contains this (repeatable)")
    p.add_argument("--json", type=Path, default=None, help="also write the JSON here")
    p.add_argument("--plot", type=Path, default=Path("recipe.png"))
    p.add_argument("--keep", type=Path, default=None, help="keep the run folders here (default: a temp folder)")
    p.add_argument("--sweep", action="store_true", help="test accuracy across global batches for every method (see above)")
    p.add_argument("--batches", default=None, help="--sweep: comma-separated global batches, run in this order "
                   f"(default {','.join(map(str, SWEEP_BATCHES))})")
    p.add_argument("--methods", default=None, help=f"--sweep: comma-separated methods (default all: {','.join(SWEEP_METHODS)})")
    p.add_argument("--epochs", type=float, default=None, help="--sweep: epoch budget at every batch (default: the base config's)")
    p.add_argument("--warmup-epochs", type=float, default=None, help="--sweep: warmup W (default: a sixth of the epochs)")
    p.add_argument("--critical", type=Path, default=None, help="--sweep: a study's critical.json whose B_crit the plot marks")
    p.add_argument("--jobs", type=int, default=2, help="--sweep: worker processes, one torch thread each")
    p.add_argument("--rows", type=Path, default=Path("recipe-sweep-rows.jsonl"), help="--sweep: one JSON line per finished run")
    p.add_argument("--resume", action="store_true", help="--sweep: keep the runs already in --rows and run the rest")
    p.add_argument("--markdown", type=Path, default=None, help="--sweep: also write the method x batch table as Markdown here")
    p.add_argument("--report-only", action="store_true",
                   help="--sweep: run nothing; the JSON and plot from the runs in --rows (a cut sweep: cells list their seeds)")
    args = p.parse_args(argv)
    args.argv = list(sys.argv[1:] if argv is None else argv)
    if args.seeds < 1 or args.small_batch < 1 or args.large_batch < 4:
        p.error("--seeds, --small-batch must be >= 1 and --large-batch >= 4")
    if args.sweep:
        problem = check_sweep_args(args)
        if problem:  # one line naming the flag, exit 2, before any run folder or worker exists
            print(f"recipe.py: {problem}", file=sys.stderr)
            return 2
        return sweep(args)

    import torch

    from bigbatch import config

    logging.disable(logging.WARNING)  # the runs' own logs go to their train.log files
    epochs = config.load(BASE_CONFIG).train.epochs
    workdir = args.keep or Path(tempfile.mkdtemp(prefix="bigbatch-recipe-"))
    results: dict[str, dict] = {}
    t_start = time.perf_counter()
    for name, (cfg_path, overrides) in methods(args.small_batch, args.large_batch, epochs).items():
        if args.only and not any(o in name for o in args.only):
            continue
        runs = [run_method(cfg_path, overrides, seed, args.num_samples, workdir) for seed in range(args.seeds)]
        accs = [r["test_acc"] for r in runs]
        results[name] = {
            "config": str(cfg_path.relative_to(ROOT)), "overrides": overrides,
            "global_batch_final": runs[0]["final_global_batch"], "epochs": runs[0]["epochs"], "steps": runs[0]["steps"],
            "test_acc": accs, "mean": statistics.fmean(accs), "std": statistics.stdev(accs) if len(accs) > 1 else 0.0,
            "train_acc_mean": statistics.fmean(r["train_acc"] for r in runs),
            "wall_s_mean": statistics.fmean(r["wall_s"] for r in runs),
            "curve_seed0": runs[0]["curve"],
        }
        print(f"{name:38s} {results[name]['mean']:.4f} ± {results[name]['std']:.4f}  ({results[name]['steps']} steps)",
              file=sys.stderr, flush=True)
    if args.keep is None:
        shutil.rmtree(workdir, ignore_errors=True)
    if results:
        plot(results, args.plot)
    report = {
        "benchmark": "recipe", "dataset": "mnist1d", "model": "cnn1d", "epochs": epochs, "seeds": args.seeds,
        "small_batch": args.small_batch, "large_batch": args.large_batch,
        "hardware": {"machine": platform.machine(), "processor": platform.processor() or platform.machine(),
                     "torch_threads": torch.get_num_threads(), "device": "cpu"},
        "torch": torch.__version__, "python": platform.python_version(),
        "total_wall_s": time.perf_counter() - t_start, "plot": str(args.plot),
        "methods": {k: {kk: vv for kk, vv in v.items() if kk != "curve_seed0"} for k, v in results.items()},
    }
    text = json.dumps(report, indent=2)
    print(text)
    if args.json:
        args.json.write_text(text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
