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
"""

from __future__ import annotations

import argparse
import json
import logging
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
    args = p.parse_args(argv)
    if args.seeds < 1 or args.small_batch < 1 or args.large_batch < 4:
        p.error("--seeds, --small-batch must be >= 1 and --large-batch >= 4")

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
