"""Which trials a study runs next: lr-grid extension, seeds at the deciding lrs, the gap phase.

Pure functions of the sweep spec and the records of finished trials; the Ray Tune searcher in
`bigbatch.study.sweep` asks `TrialQueue.next` for the next trial and tells it when one finished.

Per batch size (Shallue et al. 2018: re-tune the lr at every batch before comparing):
1. seed 0 at every multiplier of the grid, the one the scaling rule predicts (1x) first, then
   outwards, so racing (a trial stopped once it used `search.race` x the steps of its batch's
   best finished trial) has a best to race against early;
2. once every trial of the batch finished: when the best lr (majority rule,
   `critical.best_per_batch`) is the smallest or largest multiplier run, one more multiplier
   beyond that edge (the grid's own ratio), up to `search.extend` times;
3. otherwise every seed at the best lr and at its neighbours that reached the target within
   `search.close` x the best's steps (the lrs that could decide the answer); this can change the
   best (the majority and the median move), and then 2-3 repeat for the new best;
4. when nothing is left for the batch and it is one of `gap.batch_sizes`: the gap phase, the
   best lr trained to the training criterion, `gap.seeds` seeds.
"""

from __future__ import annotations

import math
from typing import Any

from bigbatch.study import critical


def point_name(point: dict[str, Any]) -> str:
    """The trial's name (and run folder): b<batch>-lr<multiplier>-s<seed>, gap- for the gap phase."""
    name = f"b{point['batch']}-lr{point['lr_multiplier']:g}-s{point['seed']}"
    return f"gap-{name}" if point.get("phase") == "gap" else name


def initial_points(spec, batch: int) -> list[dict[str, Any]]:
    """Seed 0 at every grid multiplier, nearest the scaling rule's prediction (1x) first."""
    mults = sorted(spec.lr_multipliers, key=lambda m: (abs(math.log(m)), -m))
    return [{"batch": batch, "lr_multiplier": m, "seed": spec.seeds[0]} for m in mults]


def _extension(spec, mults: list[float], edge: str) -> float:
    """The next multiplier beyond an edge of the grid run so far (the grid's ratio there, else 2)."""
    if edge == "high":
        ratio = mults[-1] / mults[-2] if len(mults) >= 2 else 2.0
        return mults[-1] * ratio
    ratio = mults[1] / mults[0] if len(mults) >= 2 else 2.0
    return mults[0] / ratio


def critical_next(spec, batch: int, points: list[dict[str, Any]], records: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The next critical-phase points at `batch` once all of `points` finished (records)."""
    best = critical.best_per_batch(records).get(batch)
    if best is None:
        return []
    mults = sorted({p["lr_multiplier"] for p in points})
    issued = {point_name(p) for p in points}
    extended = sum(1 for m in mults if m not in spec.lr_multipliers)
    if best["edge"] and extended < spec.search.extend:
        m = _extension(spec, mults, best["edge"])
        return [{"batch": batch, "lr_multiplier": m, "seed": spec.seeds[0]}]
    m_best = best["lr_multiplier"]
    i = mults.index(m_best)
    groups = critical.lr_groups(records).get(batch, {})

    def close(m: float) -> bool:  # reached, and within search.close of the best: it could decide the answer
        steps = groups.get(m, {}).get("steps_to_target")
        return steps is not None and steps <= spec.search.close * best["steps_to_target"]

    deciding = [m_best] + [mults[j] for k in range(1, spec.search.neighbours + 1) for j in (i - k, i + k)
                           if 0 <= j < len(mults) and close(mults[j])]
    new = [{"batch": batch, "lr_multiplier": m, "seed": s} for m in deciding for s in spec.seeds]
    return [p for p in new if point_name(p) not in issued]


def gap_points(spec, batch: int, records: list[dict[str, Any]]) -> list[dict[str, Any]]:
    best = critical.best_per_batch(records).get(batch)
    if best is None:
        return []
    return [{"batch": batch, "lr_multiplier": best["lr_multiplier"], "seed": s, "phase": "gap"}
            for s in spec.gap.seeds]


class TrialQueue:
    """The study's queue of trials: what to run next given what has finished.

    `next()` returns the next point, None when the trials still running must finish first, or
    "FINISHED". `finished(point, record)` records a trial's outcome (its trials.jsonl record).
    """

    FINISHED = "FINISHED"

    def __init__(self, spec) -> None:
        self.spec = spec
        self.issued: dict[str, dict[str, Any]] = {}
        self.records: dict[str, dict[str, Any]] = {}
        self.queue: list[dict[str, Any]] = []
        for b in spec.batch_sizes:
            self._enqueue(initial_points(spec, b))

    def _enqueue(self, points: list[dict[str, Any]], first: bool = False) -> None:
        new = [p for p in points if point_name(p) not in self.issued]
        for p in new:
            self.issued[point_name(p)] = p
        self.queue = new + self.queue if first else self.queue + new

    def _propose(self) -> None:
        for b in self.spec.batch_sizes:
            pts = [p for n, p in self.issued.items() if p["batch"] == b and p.get("phase") != "gap"]
            if any(point_name(p) not in self.records for p in pts):
                continue  # wait until every critical trial of this batch finished
            recs = [self.records[point_name(p)] for p in pts]
            new = critical_next(self.spec, b, pts, recs)
            if new:
                self._enqueue(new)
            elif b in self.spec.gap.batch_sizes:  # ahead of the queue: the last link of the batch's chain
                self._enqueue(gap_points(self.spec, b, recs), first=True)

    def finished(self, point: dict[str, Any], record: dict[str, Any]) -> None:
        self.records[point_name(point)] = record
        self._propose()

    def next(self) -> dict[str, Any] | str | None:
        if self.queue:
            return self.queue.pop(0)
        if len(self.records) < len(self.issued):
            return None
        return self.FINISHED

    def planned(self) -> int:
        """Trials issued so far (the total grows as the queue adapts)."""
        return len(self.issued)
