"""The critical batch along training, and what it predicts: pure numpy arithmetic.

Merrill et al. 2025 ("Critical Batch Size Revisited") measure the critical batch directly: branch
one base run (batch B0) at a checkpoint into short runs at k x B0 over the *same window of
examples* and see how much of the loss decrease per example survives the larger batch. This
module holds the arithmetic; `bigbatch.study.branch_runs` trains the branches.

The local model (McCandlish et al. 2018, eq. 2.11, read per example): at a point of training with
critical batch B_c(t), a step at batch B makes eps(B) = 1 / (1 + B / B_c) of the progress per
example that infinitely small batches would. Over a short window of W examples the loss decrease
at batch B is then A eps(B) with A the small-batch decrease, so the decreases at k x B0 give B_c
(`fit_local`: least squares over a log grid of B_c, A eliminated in closed form).

The global answer (`Segments`): the base run's examples to the target, E0, cut into segments
around the checkpoints, segment i with E0_i examples at B0 and critical batch B_c,i. The segment
needs E_min,i = E0_i eps(B0) examples with tiny batches and S_min,i = E_min,i / B_c,i steps with
huge ones, and at any batch B (McCandlish eq. 2.11 per segment)

    S_i(B) = S_min,i + E_min,i / B        E_i(B) = E_min,i + B S_min,i.

Summed: S(B) = S_min + E_min / B with S_min = sum S_min,i and E_min = sum E_min,i, so every
constant batch lies on the hyperbola (S / S_min - 1)(E / E_min - 1) = 1 with the global
B_crit = E_min / S_min; a constant B_c(t) gives back S(B) = S_min (1 + B_c / B), and S(B0) is the
base run's own steps, exactly. A batch per segment B_i (a ramp) costs sum S_i(B_i) steps and
sum E_i(B_i) examples:

- proportional, B_i = c B_c,i: (S / S_min - 1)(E / E_min - 1) = 1, on the constant-batch
  hyperbola, so it saves nothing against the best constant batch at the same examples;
- sqrt, B_i = c sqrt(B_c,i): fewest steps at a fixed number of examples (Lagrangian of
  sum E_min,i / B_i + lambda sum B_i S_min,i), with (S - S_min)(E - E_min) = (sum S_min,i
  sqrt(B_c,i))^2 <= S_min E_min (Cauchy-Schwarz): the gain grows with how much B_c(t) varies.

`ramp_phases` writes a ramp as `batch.phases` ([from_epoch, global_batch]), the epochs those of
the ramp's own example stream.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence

import numpy as np

from bigbatch.errors import UsageError

GRID_POINTS = 2000
GRID_SPAN = 64.0  # B_c searched over [B_min / 64, B_max * 64]: beyond, the branches cannot tell
RAMP_KINDS = ("sqrt", "proportional")


# --- the local fit --------------------------------------------------------------------------


def _grid(batches: np.ndarray) -> np.ndarray:
    return np.geomspace(batches.min() / GRID_SPAN, batches.max() * GRID_SPAN, GRID_POINTS)


def _fit_rows(batches: np.ndarray, progress: np.ndarray) -> np.ndarray:
    """Least-squares B_c of progress[r, k] ~ A_r / (1 + batches[k] / B_c) for every row r."""
    grid = _grid(batches)
    e = 1.0 / (1.0 + batches[None, :] / grid[:, None])  # (grid, k)
    pe = progress @ e.T  # (rows, grid)
    ee = (e * e).sum(axis=1)
    # residual sum of squares with the best A >= 0 at each grid point: sum P^2 - max(P.e, 0)^2 / e.e
    rss = (progress ** 2).sum(axis=1, keepdims=True) - np.maximum(pe, 0.0) ** 2 / ee[None, :]
    return grid[np.argmin(rss, axis=1)]


@dataclass(frozen=True)
class LocalFit:
    """B_c at one checkpoint: the point estimate, its bootstrap interval and draws, and whether it
    hit the grid's edge (efficiency did not drop over the batches tried: a lower bound)."""

    b_crit: float
    low: float
    high: float
    draws: np.ndarray
    at_edge: bool
    progress: np.ndarray  # mean decrease per batch
    efficiency: np.ndarray  # progress / fitted A: eps(B) as measured


def fit_local(batches: Sequence[float], decreases: np.ndarray, *, n_boot: int = 1000, level: float = 0.95,
              seed: int = 0) -> LocalFit:
    """Fit eps(B) = 1 / (1 + B / B_c) to loss decreases over one window of examples.

    `decreases[k, j]`: the decrease of example j's loss (an evaluation set, the same examples for
    every batch) after the branch at batches[k]. The interval is the percentile bootstrap over the
    evaluation examples (resampled jointly across batches, as they are shared): the evaluation
    noise, not the branches' own SGD noise (each branch is one run).
    """
    b = np.asarray(batches, dtype=float)
    d = np.asarray(decreases, dtype=float)
    if d.ndim != 2 or d.shape[0] != b.size or b.size < 2:
        raise ValueError(f"decreases must be (batches={b.size} >= 2, examples); got shape {d.shape}")
    mean = d.mean(axis=1)
    point = float(_fit_rows(b, mean[None, :])[0])
    rng = np.random.default_rng(seed)
    idx = rng.integers(0, d.shape[1], size=(n_boot, d.shape[1]))
    boot = np.stack([d[k][idx].mean(axis=1) for k in range(b.size)], axis=1)  # (n_boot, k)
    draws = _fit_rows(b, boot)
    tail = 100 * (1 - level) / 2
    low, high = np.percentile(draws, [tail, 100 - tail])
    e = 1.0 / (1.0 + b / point)
    amp = float(mean @ e / (e @ e))
    return LocalFit(point, float(low), float(high), draws, bool(point >= _grid(b)[-2]), mean,
                    mean / amp if amp > 0 else np.full_like(mean, np.nan))


# --- the global answer ---------------------------------------------------------------------


@dataclass(frozen=True)
class Segments:
    """Training cut into segments: per segment the minimal examples and steps (module docstring)."""

    e_min: np.ndarray
    s_min: np.ndarray

    @classmethod
    def from_base(cls, base_examples: Sequence[float], b_crit: Sequence[float], b0: float) -> "Segments":
        """Segment i: base_examples[i] examples of the base run at batch b0, critical batch b_crit[i]."""
        e0 = np.asarray(base_examples, dtype=float)
        bc = np.asarray(b_crit, dtype=float)
        if e0.shape != bc.shape or e0.ndim != 1 or not e0.size:
            raise ValueError("one critical batch per segment")
        e_min = e0 / (1.0 + b0 / bc)
        return cls(e_min, e_min / bc)

    @property
    def b_crit(self) -> np.ndarray:
        return self.e_min / self.s_min

    @property
    def S_min(self) -> float:
        return float(self.s_min.sum())

    @property
    def E_min(self) -> float:
        return float(self.e_min.sum())

    @property
    def B_crit(self) -> float:
        return self.E_min / self.S_min

    def cost(self, batches) -> tuple[float, float]:
        """(steps, examples) with batch batches[i] in segment i (a number: one constant batch)."""
        b = np.broadcast_to(np.asarray(batches, dtype=float), self.e_min.shape)
        return float((self.s_min + self.e_min / b).sum()), float((self.e_min + b * self.s_min).sum())

    def segment_examples(self, batches) -> np.ndarray:
        b = np.broadcast_to(np.asarray(batches, dtype=float), self.e_min.shape)
        return self.e_min + b * self.s_min

    def frontier_steps(self, examples: float) -> float:
        """Steps of the constant batch that spends `examples` to the target (inf at or below E_min)."""
        if examples <= self.E_min:
            return math.inf
        b = (examples - self.E_min) / self.S_min
        return self.S_min + self.E_min / b


def global_interval(base_examples, b_crit_draws: np.ndarray, b0: float, level: float = 0.95) -> dict:
    """Percentile intervals of the global B_crit, S_min, E_min over joint draws of B_c per segment
    (`b_crit_draws[draw, segment]`)."""
    draws = np.asarray(b_crit_draws, dtype=float)
    e_min = np.asarray(base_examples, dtype=float)[None, :] / (1.0 + b0 / draws)
    s_min = (e_min / draws).sum(axis=1)
    e_min = e_min.sum(axis=1)
    tail = 100 * (1 - level) / 2
    out = {}
    for name, v in (("b_crit", e_min / s_min), ("s_min", s_min), ("e_min", e_min)):
        lo, hi = np.percentile(v, [tail, 100 - tail])
        out[name] = [float(lo), float(hi)]
    return out


# --- ramps ---------------------------------------------------------------------------------


def ramp_batches(seg: Segments, kind: str, examples: float) -> np.ndarray:
    """Per-segment batches of a ramp (`kind` in RAMP_KINDS) that spends `examples` in all."""
    if examples <= seg.E_min:
        raise ValueError(f"a ramp needs more than E_min = {seg.E_min:.4g} examples, got {examples:.4g}")
    if kind == "proportional":
        return (examples - seg.E_min) / seg.E_min * seg.b_crit
    if kind == "sqrt":
        root = np.sqrt(seg.b_crit)
        return (examples - seg.E_min) / float((seg.s_min * root).sum()) * root
    raise ValueError(f"ramp kind must be one of {RAMP_KINDS}, got {kind!r}")


def ramp_gain(seg: Segments, batches) -> dict:
    """A ramp's predicted steps and examples, and its gain against the constant batch that spends
    the same examples (1 - S_ramp / S_constant)."""
    steps, examples = seg.cost(batches)
    const = seg.frontier_steps(examples)
    return {"steps": steps, "examples": examples, "constant_steps": const,
            "constant_batch": (examples - seg.E_min) / seg.S_min, "gain": 1.0 - steps / const}


def round_batches(batches, unit: int) -> np.ndarray:
    """Each batch to the nearest multiple of `unit` (world size x accumulation), at least one unit."""
    b = np.asarray(batches, dtype=float)
    return np.maximum(np.rint(b / unit), 1).astype(int) * unit


def ramp_phases(seg: Segments, batches, num_train: int, world_size: int = 1, accum_steps: int | None = None,
                key: str = "--write-ramp") -> list[list]:
    """`batch.phases` of a ramp: [[from_epoch, global_batch], ...], a phase starting where the
    ramp's own stream of examples reaches its segment (consecutive equal batches merged).
    UsageError when a batch does not split over world_size x accum_steps."""
    b = [int(v) for v in np.asarray(batches).ravel()]
    unit = world_size * (accum_steps or 1)
    for v in b:
        if v < 1 or v % unit:
            raise UsageError(key, f"ramp batch {v} is not divisible by world size {world_size} x accum_steps "
                                  f"{accum_steps or 1}; round the ramp to multiples of {unit}")
    starts = np.concatenate([[0.0], np.cumsum(seg.segment_examples(b))[:-1]]) / num_train
    phases: list[list] = []
    for start, v in zip(starts, b):
        if phases and phases[-1][1] == v:
            continue
        epoch = 0 if not phases else round(float(start), 4)
        if phases and epoch <= phases[-1][0]:
            phases[-1][1] = v  # two boundaries closer than 1e-4 epochs: the later batch wins
            continue
        phases.append([epoch, v])
    return phases
