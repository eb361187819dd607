"""The arithmetic of `bigbatch plan`: steps, examples and time to target over global batch x GPUs.

Pure functions (no training, no timing); `bigbatch.study.plan` feeds them what one short run and a
few timed steps measured.

Statistics (McCandlish, Kaplan, Amodei 2018, eq. 2.11-2.12 and section 2.3): steps S and examples
E = B S to reach a fixed target trade off as (S/S_min - 1)(E/E_min - 1) = 1, i.e.

    S(B) = S_min (1 + B_crit / B)        E(B) = E_min (1 + B / B_crit)       E_min = S_min B_crit

and B_crit is predicted by the gradient noise scale measured near the target. One run at batch
B0 that took S0 steps pins the curve: S_min = S0 / (1 + B_crit / B0).

Hardware: a step on `world` devices at global batch B costs

    step_s = compute(B / world) + (1 - overlap) * allreduce(world)
    compute(b) = overhead_s + b * per_example_s       (fitted to timed steps at 2-3 per-device batches)

allreduce from the alpha-beta model (bigbatch.distributed.alphabeta) for the model's gradient bytes;
overlap is the fraction of the all-reduce the backward pass hides (measured by `bigbatch scaling`,
else 0). Scaling efficiency at a fixed global batch is strong scaling against one device:

    efficiency(B, N) = step_s(B, 1) / (N * step_s(B, N))

so both the all-reduce and the per-step overhead that a smaller per-device batch no longer
amortises count against it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Iterable, Sequence

from bigbatch.distributed.allreduce import most_square_rows
from bigbatch.distributed.alphabeta import hierarchical_time, ring_time, torus_time
from bigbatch.study.critical import predict_steps

ALGORITHMS = ("ring", "torus2d", "hierarchical")
BEST_EFFICIENCY = 0.8  # `best_efficient`: the fastest row at >= 80 % scaling efficiency


# --- statistics ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class Tradeoff:
    """S(B) = S_min (1 + B_crit / B) (McCandlish et al. 2018, eq. 2.11)."""

    s_min: float
    b_crit: float

    @classmethod
    def from_run(cls, steps: float, batch: float, b_crit: float) -> "Tradeoff":
        """The curve through one measured run: S0 steps at batch B0 -> S_min = S0 / (1 + B_crit / B0)."""
        if steps <= 0 or batch <= 0 or b_crit <= 0:
            raise ValueError(f"need steps, batch and b_crit > 0, got {steps}, {batch}, {b_crit}")
        return cls(s_min=steps / (1.0 + b_crit / batch), b_crit=float(b_crit))

    @property
    def e_min(self) -> float:
        return self.s_min * self.b_crit

    def steps(self, batch: float) -> float:
        return predict_steps({"s_min": self.s_min, "e_min": self.e_min}, batch)

    def examples(self, batch: float) -> float:
        """E(B) = B S(B) = E_min (1 + B / B_crit)."""
        return batch * self.steps(batch)


def noise_near_target(history: Sequence[tuple[int, float]], target_step: int, window: float = 0.25) -> dict:
    """The noise scale where the run reached its target, and how much it moved on the way.

    history: (step, noise scale) pairs in step order, e.g. the online EMA of B_simple from
    metrics.jsonl. The noise scale grows as the loss falls, so an average over the run would
    under-state it: the value used is the median of the points in the last `window` of the run,
    [(1 - window) * target_step, target_step] (the median, because single EMA readings spike).
    `last` is the reading at the target; `moved_ratio` is the value over the reading at the
    window's start; `min`/`max` span the window.
    """
    import statistics

    pts = [(s, v) for s, v in history if s <= target_step and v is not None and math.isfinite(v) and v > 0]
    if not pts:
        raise ValueError("no positive noise-scale value at or before the target step")
    start = (1.0 - window) * target_step
    recent = [v for s, v in pts if s >= start] or [pts[-1][1]]
    earlier = [(s, v) for s, v in pts if s <= start]
    ref_step, ref = earlier[-1] if earlier else pts[0]
    value = statistics.median(recent)
    return {"value": value, "last": pts[-1][1], "step": pts[-1][0], "window_start_step": ref_step,
            "window_start_value": ref, "moved_ratio": value / ref, "min": min(recent), "max": max(recent),
            "window_points": len(recent), "points": len(pts)}


# --- hardware ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class ComputeModel:
    """Seconds of one optimizer step on one device: overhead_s + per_device_batch * per_example_s."""

    overhead_s: float
    per_example_s: float

    @classmethod
    def fit(cls, per_device_batches: Sequence[int], step_seconds: Sequence[float]) -> "ComputeModel":
        """Least squares on relative error through timed steps at >= 2 per-device batch sizes.

        Both terms are kept >= 0: a negative intercept or slope is timing noise (it would make
        tiny or huge per-device batches look free); the fit then drops that term."""
        if len(set(per_device_batches)) < 2 or len(per_device_batches) != len(step_seconds):
            raise ValueError("need step times at 2 or more distinct per-device batch sizes")
        import numpy as np

        b = np.asarray(per_device_batches, float)
        t = np.asarray(step_seconds, float)
        a = np.stack([np.ones_like(b), b], axis=1) / t[:, None]
        (t0, te), *_ = np.linalg.lstsq(a, np.ones_like(t), rcond=None)
        if te < 0:  # no visible cost per example: a constant
            t0, te = float(np.sum(1 / t) / np.sum(1 / t ** 2)), 0.0
        elif t0 < 0:  # refit through the origin
            t0, te = 0.0, float(np.sum(b / t) / np.sum(b * b / t ** 2))
        return cls(overhead_s=float(t0), per_example_s=float(te))

    def step_s(self, per_device_batch: float) -> float:
        return self.overhead_s + per_device_batch * self.per_example_s


@dataclass(frozen=True)
class CommModel:
    """All-reduce seconds of `grad_bytes` per step from the alpha-beta model.

    alpha (s per latency step) and beta (bytes/s) are the inter-node link's; the hierarchical
    algorithm uses alpha_intra/beta_intra inside a node of `local_size` devices (default: the same).
    """

    grad_bytes: float
    alpha_s: float
    beta_bytes_per_s: float
    local_size: int = 8
    alpha_intra_s: float | None = None
    beta_intra_bytes_per_s: float | None = None

    def allreduce_s(self, algo: str, world: int) -> float:
        if world <= 1:
            return 0.0
        a, b, s = self.alpha_s, self.beta_bytes_per_s, self.grad_bytes
        if algo == "ring":
            return ring_time(world, s, a, b)
        if algo == "torus2d":
            rows = most_square_rows(world)
            return torus_time(rows, world // rows, s, a, b)
        if algo == "hierarchical":
            local = math.gcd(world, self.local_size)  # one node when world <= local_size
            return hierarchical_time(world, local, s, a, b, self.alpha_intra_s, self.beta_intra_bytes_per_s)
        raise ValueError(f"unknown all-reduce algorithm {algo!r}; expected one of {', '.join(ALGORITHMS)}")

    def fastest(self, world: int, algos: Iterable[str] = ALGORITHMS) -> tuple[str, float]:
        """(algorithm, seconds) of the fastest of `algos` at this world size (ties: the first)."""
        return min(((a, self.allreduce_s(a, world)) for a in algos), key=lambda p: p[1])


def overlap_from_scaling(measured_comm_s: float, world: int, comm: CommModel, algo: str = "ring") -> float:
    """The fraction of the modelled all-reduce the backward pass hid in a `bigbatch scaling` run.

    scaling's comm_s is the exposed part (step with all-reduce minus step under no_sync), so
    overlap = 1 - exposed / modelled, clipped to [0, 1]."""
    modelled = comm.allreduce_s(algo, world)
    if modelled <= 0:
        return 0.0
    return min(max(1.0 - measured_comm_s / modelled, 0.0), 1.0)


def step_time(global_batch: int, world: int, compute: ComputeModel, comm: CommModel, algos: Sequence[str],
              overlap: float = 0.0) -> dict:
    """One step of global_batch on world devices: compute + the exposed part of the fastest all-reduce."""
    algo, allreduce = comm.fastest(world, algos) if world > 1 else ("none", 0.0)
    compute_s = compute.step_s(global_batch / world)
    comm_s = (1.0 - overlap) * allreduce
    return {"per_device_batch": global_batch / world, "algo": algo, "compute_s": compute_s, "comm_s": comm_s,
            "step_s": compute_s + comm_s}


# --- the table and the answer ------------------------------------------------------------------


def plan_rows(tradeoff: Tradeoff, compute: ComputeModel, comm: CommModel, batches: Iterable[int],
              worlds: Iterable[int], algos: Sequence[str] = ALGORITHMS, overlap: float = 0.0) -> list[dict]:
    """One row per (global batch, world size) with at least one example per device."""
    worlds = sorted(set(worlds))
    rows = []
    for b in sorted(set(batches)):
        one = step_time(b, 1, compute, comm, algos, overlap)["step_s"]
        steps = tradeoff.steps(b)
        for n in worlds:
            if b < n:
                continue
            t = step_time(b, n, compute, comm, algos, overlap)
            rows.append({"global_batch": b, "world_size": n, "steps": steps, "examples": b * steps, **t,
                         "time_s": steps * t["step_s"], "efficiency": one / (n * t["step_s"]),
                         "examples_over_e_min": b * steps / tradeoff.e_min})
    return rows


def choose_best(rows: Sequence[dict], min_efficiency: float | None = None) -> dict | None:
    """The row with the least time to target (ties: fewer devices, then the smaller batch);
    with min_efficiency, only among rows at or above it. None when no row qualifies."""
    pool = [r for r in rows if min_efficiency is None or r["efficiency"] >= min_efficiency - 1e-12]
    if not pool:
        return None
    return min(pool, key=lambda r: (r["time_s"], r["world_size"], r["global_batch"]))


def default_batches(b0: int, b_crit: float, max_world: int) -> list[int]:
    """Powers of two from 8 (or below B0/16) up to the larger of 64 B_crit and the largest world."""
    lo = min(8, 2 ** max(int(math.log2(max(b0, 1))) - 4, 0))
    hi = max(64 * b_crit, max_world, 2 * b0)
    out, b = [], lo
    while b <= hi:
        out.append(b)
        b *= 2
    return out
