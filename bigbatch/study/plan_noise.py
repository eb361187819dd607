"""`bigbatch plan --method noise` (or both): McCandlish et al. 2018's one-run answer, the gradient
noise scale near the target as B_crit (the online B_simple of the short run, or B_noise / B_simple
of `bigbatch measure` at its checkpoint), and how it is printed."""

from __future__ import annotations

import json
from pathlib import Path

from bigbatch.errors import UsageError
from bigbatch.study import plan_model as pm


def noise_history(metrics: list[dict], key: str = "gns/b_simple") -> list[tuple[int, float]]:
    return [(int(r["step"]), float(r[key])) for r in metrics if r.get(key) is not None and "step" in r]


def read_measured_noise(path: str, key: str) -> dict:
    """The noise scale `key` (b_noise or b_simple) from a `bigbatch measure RUN_DIR --json` file."""
    p = Path(path)
    if not p.is_file():
        raise UsageError("--noise-from", f"file {path!r} not found")
    try:
        data = json.loads(p.read_text())
    except json.JSONDecodeError:
        raise UsageError("--noise-from", f"{path!r} is not the JSON of `bigbatch measure RUN_DIR --json`") from None
    value = data.get(key) if isinstance(data, dict) else None
    if not isinstance(value, (int, float)) or not value > 0:
        raise UsageError("--noise-from", f"{path!r} has no positive {key!r} (got {value!r}); "
                         f"`bigbatch measure` leaves b_noise null with --hessian-examples 0")
    return {"value": float(value), "key": key, "file": path, "step": data.get("step")}


def noise_estimate(history: list[tuple[int, float]], target_step: int) -> dict:
    n = pm.noise_near_target(history, target_step)
    return {**n, "source": "online B_simple (two-batch EMA, McCandlish et al. 2018 app. A.1), median over the last quarter "
                         "of the run to the target"}


def noise_line(noise: dict, measured: dict | None, b_crit_noise: float, s0: int, b0: int, branches: dict | None) -> str:
    """The noise-scale answer in one line (beside the branching one when both ran)."""
    line = (f"noise scale near the target {noise['value']:.0f} (median of the last quarter of the run, {noise['window_points']} "
            f"readings {noise['min']:.0f}-{noise['max']:.0f}; x{noise['moved_ratio']:.2f} since step {noise['window_start_step']}; "
            f"{noise['last']:.0f} at step {noise['step']})")
    if measured:
        line += f"; {measured['key']} from {measured['file']}: {b_crit_noise:.0f}"
    if branches:
        s_min = pm.Tradeoff.from_run(s0, b0, b_crit_noise).s_min
        line += (f"\nnoise-scale answer: B_crit ~ {b_crit_noise:.0f}, S_min {s_min:.1f}; branching answer: B_crit "
                 f"{branches['b_crit']:.0f}, S_min {branches['s_min']:.1f} (x{branches['b_crit'] / b_crit_noise:.2f} the noise scale's)")
    return line
