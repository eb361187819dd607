"""The alpha-beta model of an all-reduce (Hockney; nccl-tests doc/PERFORMANCE.md): alpha seconds
per latency step and 1/beta seconds per byte on the wire, fitted from `bigbatch bench allreduce`
rows (ring) by least squares on relative error, then:

    ring (n ranks)             2(n-1) alpha + 2(n-1)/n * S/beta
    2D torus (rows x cols)     2(cols-1) alpha + 2(rows-1) alpha + 2(rows*cols-1)/(rows*cols) * S/beta
    hierarchical (L per node)  2 ceil(log2 L) (alpha_i + S/beta_i) + ring over n/L leaders

The torus moves the same bytes as the ring but needs 2(X-1) + 2(Y-1) latency steps instead of
2(XY-1) (Mikami et al. 2018). Pure functions: no process group, no trainer.
"""

from __future__ import annotations

import math

from bigbatch.distributed.allreduce import most_square_rows
from bigbatch.errors import UsageError

MODEL_WORLDS = tuple(2 ** k for k in range(3, 13))  # 8 ... 4096


def ring_time(n: int, nbytes: float, alpha: float, beta: float) -> float:
    """Seconds for a ring all-reduce of nbytes on n ranks (nccl-tests' ring formula)."""
    if n <= 1:
        return 0.0
    return 2 * (n - 1) * alpha + 2 * (n - 1) / n * nbytes / beta


def torus_time(rows: int, cols: int, nbytes: float, alpha: float, beta: float) -> float:
    """Mikami et al.'s 2D torus: reduce-scatter on rows, all-reduce 1/cols along columns, all-gather."""
    n = rows * cols
    if n <= 1:
        return 0.0
    steps = 2 * (cols - 1) + 2 * (rows - 1)
    wire = 2 * (cols - 1) / cols * nbytes + 2 * (rows - 1) / rows * nbytes / cols
    return steps * alpha + wire / beta


def hierarchical_time(n: int, local: int, nbytes: float, alpha: float, beta: float,
                      alpha_intra: float | None = None, beta_intra: float | None = None) -> float:
    """Tree reduce to the node leader, ring among n/local leaders, tree broadcast back."""
    ai = alpha if alpha_intra is None else alpha_intra
    bi = beta if beta_intra is None else beta_intra
    rounds = math.ceil(math.log2(local)) if local > 1 else 0
    return 2 * rounds * (ai + nbytes / bi) + ring_time(n // local, nbytes, alpha, beta)


def latency_steps(algo: str, n: int, rows: int | None = None, local: int | None = None) -> int:
    if algo == "ring":
        return 2 * (n - 1)
    if algo == "torus2d":
        cols = n // rows
        return 2 * (cols - 1) + 2 * (rows - 1)
    rounds = math.ceil(math.log2(local)) if local > 1 else 0
    return 2 * rounds + 2 * (n // local - 1)


def fit_alpha_beta(rows: list[dict], algo: str = "ring") -> dict:
    """alpha (s per step) and beta (bytes/s) from bench rows of one algorithm, ring model.

    Least squares on relative error (times span orders of magnitude, so absolute error would
    fit only the largest sizes). Needs rows on more than one rank and two or more sizes.
    """
    import numpy as np

    mine = [r for r in rows if r["algo"] == algo and r["world_size"] > 1 and r["time_us"] > 0]
    if len({r["bytes"] for r in mine}) < 2:
        raise UsageError("--bench", f"need {algo} rows on more than 1 rank at 2 or more sizes to fit alpha and beta")
    t = np.array([r["time_us"] * 1e-6 for r in mine])
    a = np.array([[2 * (r["world_size"] - 1), 2 * (r["world_size"] - 1) / r["world_size"] * r["bytes"]] for r in mine])
    coef, *_ = np.linalg.lstsq(a / t[:, None], np.ones_like(t), rcond=None)
    alpha, inv_beta = (max(float(c), 1e-12) for c in coef)
    pred = a @ np.array([alpha, inv_beta])
    rel = np.abs(pred - t) / t
    return {"algo": algo, "alpha_s": alpha, "beta_bytes_per_s": 1.0 / inv_beta, "points": len(mine),
            "median_rel_err": float(np.median(rel)), "max_rel_err": float(np.max(rel))}


def predict(nbytes: float, alpha: float, beta: float, local: int = 8, worlds=MODEL_WORLDS,
            alpha_intra: float | None = None, beta_intra: float | None = None) -> list[dict]:
    """Predicted all-reduce time (ms) of ring, 2D torus (most square) and hierarchical per world size."""
    out = []
    for n in worlds:
        rows = most_square_rows(n)
        loc = local if n % local == 0 else 1
        out.append({
            "world_size": n, "grid": f"{rows}x{n // rows}", "local_size": loc,
            "ring_ms": ring_time(n, nbytes, alpha, beta) * 1e3,
            "torus2d_ms": torus_time(rows, n // rows, nbytes, alpha, beta) * 1e3,
            "hierarchical_ms": hierarchical_time(n, loc, nbytes, alpha, beta, alpha_intra, beta_intra) * 1e3,
            "ring_steps": latency_steps("ring", n), "torus2d_steps": latency_steps("torus2d", n, rows=rows),
            "hierarchical_steps": latency_steps("hierarchical", n, local=loc),
        })
    return out
