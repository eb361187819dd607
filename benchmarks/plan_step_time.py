"""Claim: `bigbatch plan`'s step-time model (timed steps in one process + the alpha-beta all-reduce)
predicts the step time `bigbatch scaling` measures on 1 and 2 gloo ranks.

Evidence: the plan's hardware side exactly as `bigbatch plan` runs it (timed steps at per-device
batches B0/4, B0, 4 B0 with one torch thread, repeated; one 2-rank ring bench for alpha and beta;
no overlap assumed), then `bigbatch scaling`'s measurement (spawned gloo ranks, one thread each,
per-device batch B0, DDP with the config's all-reduce), repeated inside one process group per
world size (1 and 2 ranks); repeat i of each side is paired. Prints one
JSON object: per world size the median predicted and measured step time, the median of the
per-repeat ratios predicted / measured and their range; also the compute part alone (scaling's
no_sync time) and the exposed all-reduce (scaling's comm_s) against the model's.

    python benchmarks/plan_step_time.py [CONFIG] [--repeats 5] [--steps 30]

Taken on a shared 2-core VM: run it under the CPU lock, and read the spread.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics

import torch

from bigbatch import config
from bigbatch.distributed.env import spawn_local
from bigbatch.study.scaling import measure_step_times
from bigbatch.study import plan
from bigbatch.study.plan_model import CommModel, step_time


def repeated_measure(cfg, per_device: int, steps: int, repeats: int) -> list[dict]:
    """`bigbatch scaling`'s measurement, `repeats` times inside one process group (spawning ranks
    costs more than the measurement on a loaded 2-core VM)."""
    return [measure_step_times(cfg, per_device, steps, 5) for _ in range(repeats)]


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("config", nargs="?", default="configs/mnist1d-cnn.toml")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--steps", type=int, default=30)
    args = p.parse_args()
    cfg = config.load(args.config)
    b0 = cfg.batch.global_batch
    # the plan's side: timed steps in this process, one 2-rank ring bench for alpha and beta
    computes = [plan.time_compute(cfg, sorted({max(1, b0 // 4), b0, 4 * b0})) for _ in range(args.repeats)]
    ab = plan.local_alpha_beta(cfg)
    # scaling's side: spawned gloo ranks
    measured = {n: spawn_local(n, repeated_measure, cfg, b0, args.steps, args.repeats, backend=cfg.dist.backend)
                for n in (1, 2)}
    reps = []
    for i, (compute, timed) in enumerate(computes):
        comm = CommModel(timed[0]["grad_bytes"], ab["alpha_s"], ab["beta_bytes_per_s"])
        rep = {}
        for n in (1, 2):
            pred = step_time(b0 * n, n, compute, comm, ["ring"])
            meas = measured[n][i]
            rep[n] = {"pred_step_s": pred["step_s"], "meas_step_s": meas["step_s"], "pred_compute_s": pred["compute_s"],
                      "meas_compute_s": meas["compute_s"], "pred_comm_s": pred["comm_s"], "meas_comm_s": meas["comm_s"]}
        reps.append(rep)

    def summary(n: int) -> dict:
        r = [rep[n] for rep in reps]
        ratios = [x["pred_step_s"] / x["meas_step_s"] for x in r]
        med = {k: statistics.median(x[k] for x in r) for k in r[0]}
        return {**{k + "_median": v for k, v in med.items()},
                "ratio_pred_over_meas_median": statistics.median(ratios), "ratio_min": min(ratios), "ratio_max": max(ratios),
                "compute_ratio_median": statistics.median(x["pred_compute_s"] / x["meas_compute_s"] for x in r)}

    print(json.dumps({"config": args.config, "per_device_batch": b0, "repeats": args.repeats, "timed_steps": args.steps,
                      "alpha_beta": ab, "torch": torch.__version__, "python": platform.python_version(),
                      "world_1": summary(1), "world_2": summary(2), "raw": reps}, indent=1))


if __name__ == "__main__":
    main()
