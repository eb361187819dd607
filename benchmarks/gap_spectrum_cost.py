"""What the gap phase's top-k Hessian (gap.spectrum_k) adds to a study: per gap trial of a finished
sweep folder, the seconds of the old measurement (the top eigenvalue alone, k = 1) and of the new
one (top-k + the gradient's share of their space), at the gap phase's fixed micro-batch, one thread.

    flock /tmp/bigbatch-cpu.lock python benchmarks/gap_spectrum_cost.py SWEEP_DIR   # e.g. a `bigbatch study` folder

Prints one JSON object: seconds per trial for both, their sums and the added CPU seconds.
"""

from __future__ import annotations

import dataclasses
import json
import sys
import time
from pathlib import Path

import torch

from bigbatch import config, folders
from bigbatch.study import spec as spec_mod
from bigbatch.study.trial import gap_hessian


def main(sweep_dir: Path) -> dict:
    torch.set_num_threads(1)  # as a study's trials run
    spec = spec_mod.from_dict(folders.SweepFolder(sweep_dir).read_spec())
    micro_batch = min(spec.gap.batch_sizes)
    rows = []
    for run in sorted((sweep_dir / folders.RUNS).glob("gap-*")):
        cfg = config.load(run / folders.CONFIG)
        row = {"trial": run.name}
        for name, k in (("top_1", 0), ("top_k", spec.gap.spectrum_k)):
            t = time.perf_counter()
            m = gap_hessian(dataclasses.replace(spec.gap, spectrum_k=k), cfg, run, micro_batch)
            row[f"{name}_s"] = round(time.perf_counter() - t, 3)
        row |= {"k": m.get("spectrum_k"), "lanczos_steps": m.get("spectrum_lanczos_steps")}
        rows.append(row)
    old, new = sum(r["top_1_s"] for r in rows), sum(r["top_k_s"] for r in rows)
    return {"sweep": str(sweep_dir), "micro_batch": micro_batch, "trials": rows, "top_1_s": round(old, 2),
            "top_k_s": round(new, 2), "added_cpu_s": round(new - old, 2), "ratio": round(new / old, 3) if old else None}


if __name__ == "__main__":
    print(json.dumps(main(Path(sys.argv[1])), indent=1))
