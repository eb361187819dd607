"""Claim: online GNS (measure.gns at its default measure.gns_every) costs at most 2 % of the step
time under 2-rank DDP on CPU.

Evidence, from one spawn of 2 gloo ranks running the real training loop (`bigbatch.trainer.loop.run`)
on MNIST-1D, in rounds:
- the in-run measurement (the headline): one training with GNS measured every max(k, 2) steps
  (k = measure.gns_every) and a log row per step; the loop's own time of each step (from its start
  to its end, the log row excluded) is read from the rows, and the run's median ratio of each
  measured step to the unmeasured step after it, minus 1, is what a measured step costs
  (`measured_step_pct`: median over rounds, IQR, `rounds_measured_step_pct`). Unmeasured steps run
  the same code with the hooks returning at once, so the cost per step at gns_every = k is that
  divided by k: `overhead_pct` (median over rounds, and its IQR). Left out: the estimate's read at
  log rows (a host copy of the queued norms; its rank average rides on the loss all-reduce) and
  the hooks' return on unmeasured steps (a Python call per parameter).
- separate runs (a cross-check, not the headline): runs with measure.gns off and on, back to back,
  their order alternating; each run's time per step is the median over its log intervals, and
  `separate_runs_overhead_pct` is the median over rounds of the on/off ratio. Such rounds scatter by
  +-10-15 % on a busy 2-core machine (each run lands its ranks and gloo's threads differently),
  more than the effect.
Prints one JSON object. Usage:

    flock /tmp/bigbatch-cpu.lock python benchmarks/measure_overhead.py [--model mlp|cnn] [--steps 300] [--rounds 5] [--gns-every K]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
from pathlib import Path

import torch

from bigbatch.config.sections import MeasureConfig
from bigbatch.distributed.env import spawn_local

CONFIGS = Path(__file__).resolve().parents[1] / "configs"


def _config(args, log_every: int, gns: bool, gns_every: int):
    """The benchmark's training run: the model's MNIST-1D config, no evaluation, amp off."""
    from bigbatch import config

    return config.load(CONFIGS / f"mnist1d-{args.model}.toml", [
        f"train.steps={args.steps}", "train.eval_every=0", f"train.log_every={log_every}", "track.progress=off",
        "data.train_eval_samples=500", f"batch.global_batch={args.global_batch}",
        f"measure.gns={'true' if gns else 'false'}", f"measure.gns_every={gns_every}", "train.amp=off",
    ])


def _rounds(args) -> dict[str, list[float]]:
    """On every rank of the spawned group: alternate GNS off/on runs, seconds per training step."""
    from bigbatch.trainer.loop import run

    import os

    import torch.distributed as dist

    if args.pin and hasattr(os, "sched_setaffinity") and len(os.sched_getaffinity(0)) >= 2:
        # one core per rank, like one GPU per rank (off by default: see docs/plan.md on pinning)
        cores = sorted(os.sched_getaffinity(0))
        os.sched_setaffinity(0, {cores[dist.get_rank() % len(cores)]})
    times: dict[str, list[float]] = {"off": [], "on": [], "paired": []}
    with tempfile.TemporaryDirectory() as tmp:
        for i in range(args.rounds):
            for mode in (("off", "on") if i % 2 == 0 else ("on", "off")):  # alternate the order: drift cancels
                cfg = _config(args, args.log_every, mode == "on", args.gns_every)
                intervals: list[float] = []  # seconds per training step, per log interval

                def reporter(row, intervals=intervals):
                    if "samples_per_s" in row and row["step"] > args.log_every:  # the first interval warms up
                        intervals.append(row["global_batch"] / row["samples_per_s"])

                summary = run(cfg, Path(tmp) / f"{mode}-{i}", reporter=reporter)
                # the reporter sees rows on the logging rank only (rank 0's result is printed)
                times[mode].append(statistics.median(intervals) if intervals else summary["train_s"] / summary["steps"])
            times["paired"].append(_paired_ratio(args, Path(tmp) / f"paired-{i}"))
    return times


def _paired_ratio(args, out: Path) -> float:
    """One run with GNS measured every max(k, 2) steps: median of measured / next unmeasured step time."""
    from bigbatch.trainer.loop import run

    every = max(args.gns_every, 2)
    cfg = _config(args, log_every=1, gns=True, gns_every=every)
    step_s: dict[int, float] = {}

    def reporter(row):
        if "samples_per_s" in row:  # one step per row: its own time (the row's logging is not in it)
            step_s[row["step"]] = row["global_batch"] / row["samples_per_s"]

    run(cfg, out, reporter=reporter)
    # row k is the step that started at st.step = k - 1, measured when every divides k - 1
    ratios = [step_s[k] / step_s[k + 1] for k in sorted(step_s) if k > args.log_every and (k - 1) % every == 0
              and k + 1 in step_s]
    return statistics.median(ratios) if ratios else float("nan")


def _iqr(values: list[float]) -> list[float]:
    if len(values) < 2:
        return [values[0], values[0]]
    q = statistics.quantiles(values, n=4)
    return [q[0], q[2]]


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", choices=["mlp", "cnn"], default="mlp")
    p.add_argument("--steps", type=int, default=300)
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--global-batch", type=int, default=256)
    p.add_argument("--pin", action="store_true",
                   help="pin each rank to its own core (steadier compute, but gloo's wake-ups then stall for a time slice at times)")
    p.add_argument("--log-every", type=int, default=10, help="steps per timed interval (the median interval is the run's step time)")
    every = MeasureConfig().gns_every  # the config's default
    p.add_argument("--gns-every", type=int, default=every,
                   help=f"measure.gns_every, steps between measurements (default {every}, the config's)")
    args = p.parse_args()
    if args.gns_every < 1 or args.rounds < 1 or args.steps <= 2 * args.log_every:
        p.error("--gns-every and --rounds must be >= 1, --steps > 2 x --log-every")
    times = spawn_local(2, _rounds, args, backend="gloo")
    off, on = statistics.median(times["off"]), statistics.median(times["on"])
    separate = sorted(100.0 * (b / a - 1.0) for a, b in zip(times["off"], times["on"]))  # per round, back to back
    measured = [100.0 * (r - 1.0) for r in times["paired"]]  # what one measured step costs, per round
    k = args.gns_every
    print(json.dumps({
        "benchmark": "measure_overhead", "world_size": 2, "backend": "gloo", "device": "cpu",
        "model": args.model, "global_batch": args.global_batch, "gns_every": k, "steps": args.steps, "rounds": args.rounds,
        "torch": torch.__version__,
        "overhead_pct": statistics.median(measured) / k,  # per step at gns_every = k, from the in-run measurement
        "overhead_pct_iqr": [q / k for q in _iqr(measured)],
        "measured_step_pct": statistics.median(measured),
        "measured_step_pct_iqr": _iqr(measured),
        "rounds_measured_step_pct": measured,
        "separate_runs_overhead_pct": statistics.median(separate),
        "separate_runs_overhead_pct_iqr": _iqr(separate),
        "step_ms_gns_off": 1e3 * off, "step_ms_gns_on": 1e3 * on,
        "rounds_ms_off": [1e3 * t for t in times["off"]], "rounds_ms_on": [1e3 * t for t in times["on"]],
    }, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
