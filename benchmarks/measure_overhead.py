"""Claim: online GNS (measure.gns) costs at most 5 % of the step time under 2-rank DDP on CPU.

Evidence: one spawn of 2 gloo ranks runs the real training loop (`bigbatch.trainer.loop.run`)
on MNIST-1D, alternating runs with measure.gns off and on (same seed, same data order), and
compares the loop's own training time per step (evaluation excluded). Median over rounds.
Prints one JSON object. Usage:

    flock /tmp/bigbatch-cpu.lock python benchmarks/measure_overhead.py [--model mlp|cnn] [--steps 300] [--rounds 3] [--gns-every 1]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
from pathlib import Path

import torch

from bigbatch.distributed.env import spawn_local

CONFIGS = Path(__file__).resolve().parents[1] / "configs"


def _rounds(args) -> dict[str, list[float]]:
    """On every rank of the spawned group: alternate GNS off/on runs, seconds per training step."""
    from bigbatch import config
    from bigbatch.trainer.loop import run

    times: dict[str, list[float]] = {"off": [], "on": []}
    with tempfile.TemporaryDirectory() as tmp:
        for i in range(args.rounds):
            for mode in ("off", "on"):
                cfg = config.load(CONFIGS / f"mnist1d-{args.model}.toml", [
                    f"train.steps={args.steps}", "train.eval_every=0", "train.log_every=50", "track.progress=off",
                    "data.train_eval_samples=500", f"batch.global_batch={args.global_batch}",
                    f"measure.gns={'true' if mode == 'on' else 'false'}", f"measure.gns_every={args.gns_every}",
                    "train.amp=off",
                ])
                summary = run(cfg, Path(tmp) / f"{mode}-{i}")
                times[mode].append(summary["train_s"] / summary["steps"])
    return times


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", choices=["mlp", "cnn"], default="mlp")
    p.add_argument("--steps", type=int, default=300)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--global-batch", type=int, default=256)
    p.add_argument("--gns-every", type=int, default=1, help="measure.gns_every (steps between measurements)")
    args = p.parse_args()
    times = spawn_local(2, _rounds, args, backend="gloo")
    off, on = statistics.median(times["off"]), statistics.median(times["on"])
    print(json.dumps({
        "benchmark": "measure_overhead", "world_size": 2, "backend": "gloo", "device": "cpu",
        "model": args.model, "global_batch": args.global_batch, "gns_every": args.gns_every, "steps": args.steps, "rounds": args.rounds,
        "torch": torch.__version__,
        "step_ms_gns_off": 1e3 * off, "step_ms_gns_on": 1e3 * on,
        "overhead_pct": 100.0 * (on / off - 1.0),
        "rounds_ms_off": [1e3 * t for t in times["off"]], "rounds_ms_on": [1e3 * t for t in times["on"]],
    }, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
