"""Which trials a study runs next: lr-grid extension, seeds at the deciding lrs, the gap phase.

Pure functions of the sweep spec and the records of finished trials; the Ray Tune searcher in
`bigbatch.study.sweep` asks `TrialQueue.next` for the next trial and tells it when one finished.

Per batch size (Shallue et al. 2018: re-tune the lr at every batch before comparing):
1. seed 0 at every multiplier of the grid, the one the scaling rule predicts (1x) first, then
   outwards, so racing (`race_check`: a trial stopped once it used `search.race` x the censored
   median of its batch's best lr so far) has a best to race against early; once the batch's
   trials finished, a raced seed that could still change the answer is rerun unraced
   (`unsettled_races`), so the result is that of a sweep without racing;
2. once every trial of the batch finished: when the best lr (majority rule,
   `critical.best_per_batch`) is the smallest or largest multiplier run, one more multiplier
   beyond that edge (the grid's own ratio), up to `search.extend` times;
3. otherwise every seed at the best lr and at its neighbours that reached the target within
   `search.close` x the best's steps (the lrs that could decide the answer); this can change the
   best (the majority and the median move), and then 2-3 repeat for the new best;
4. when nothing is left for the batch and it is one of `gap.batch_sizes`: the gap phase, the
   best lr trained to the training criterion, `gap.seeds` seeds.

Across batch sizes, once every critical trial finished: when the fit does not bracket B_crit
(B_crit or its interval's upper end above the largest batch, or the smallest batch not in
perfect scaling), one more batch size, twice the largest or half the smallest, runs 1-3 (up to
`search.add_batches`; `batch_extension`) before the study concludes.
"""

from __future__ import annotations

import math
from typing import Any

from bigbatch.errors import ConfigError
from bigbatch.study import axes, critical


def point_name(point: dict[str, Any]) -> str:
    """The trial's name (and run folder): b<batch>-lr<multiplier>-s<seed>, gap- for the gap phase,
    -unraced for the rerun of a raced seed that could have changed the answer (`unsettled_races`);
    the values of any further axes follow the seed (b16-lr1-s0-model.hidden64)."""
    name = f"b{point['batch']}-lr{point['lr_multiplier']:g}-s{point['seed']}"
    if point.get("axes"):  # a sweep over more axes (`bigbatch.study.axes`): -model.hidden16
        name += axes.name_suffix(point["axes"])
    if point.get("race") is False:
        name += "-unraced"
    return f"gap-{name}" if point.get("phase") == "gap" else name


# --- racing ----------------------------------------------------------------------------------


def race_check(finished: list[dict[str, Any]], point: dict[str, Any], step: float, factor: float) -> dict[str, Any] | None:
    """Whether a running trial at `step` stops as `slower`: a pure function of the set of finished
    trials of its batch (`finished`, any order), so the order they finished in does not matter.

    The reference is the best lr so far by the majority rule (`critical.best_per_batch` on the
    finished trials) and its censored median, not a single (possibly lucky) seed. A trial at that
    lr is never raced; nothing is raced while no lr has a majority. Otherwise the trial stops once
    step > factor x that median. Returns the stop details or None (go on).
    """
    if point.get("race") is False or point.get("phase") == "gap":
        return None
    best = critical.best_per_batch([r for r in finished if r.get("batch") == point["batch"]]).get(point["batch"])
    if best is None or best["lr_multiplier"] == point["lr_multiplier"]:
        return None
    if step > factor * best["steps_to_target"]:
        return {"status": "slower", "steps_lower_bound": int(step), "raced_against": best["steps_to_target"],
                "raced_against_lr": best["lr_multiplier"]}
    return None


def unsettled_races(records: list[dict[str, Any]], batch: int, close: float) -> list[dict[str, Any]]:
    """Raced seeds at `batch` whose true steps could change what the study decides: rerun them unraced.

    A raced seed is known only to need more than its `steps_lower_bound` L. Its lr's optimistic
    median (each of its raced seeds at its L and counted as reached, the censored median
    otherwise) is a lower bound of the median it would have without racing. When that bound is
    above `close` x the batch's best median, the lr is neither the best nor a neighbour that gets
    seeds (`critical_next`), whatever the raced seeds' true steps; else (its lr is the best, or no
    lr has a majority, or the bound is within `close`) the race is unsettled. Rerunning every
    unsettled race before deciding anything makes each decision, and so the result, the same as
    in a sweep without racing: independent of the order the trials finished in.
    """
    recs = [r for r in critical.unsuperseded(records) if r.get("batch") == batch and critical.phase_of(r) == "critical"]
    best = critical.best_per_batch(recs).get(batch)
    out = []
    for m, g in critical.lr_groups(recs).get(batch, {}).items():
        raced = [r for r in recs if critical._lr_key(r) == m and r.get("status") == "slower"]
        if not raced:
            continue
        bounds = [t["steps_to_target"] for t in g["reached"]] + [float(r.get("steps_lower_bound") or 0) for r in raced]
        optimistic = critical.censored_median(bounds, g["n"])
        if best is None or m == best["lr_multiplier"] or optimistic is None or optimistic <= close * best["steps_to_target"]:
            out += raced
    return out


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
    """The next critical-phase points at `batch` once all of `points` finished (records): first the
    unraced reruns of unsettled races (`unsettled_races`), then the schedule."""
    issued = {point_name(p) for p in points}
    reruns = [{"batch": batch, "lr_multiplier": r["lr_multiplier"], "seed": r["seed"], "race": False}
              for r in unsettled_races(records, batch, spec.search.close)]
    reruns = [p for p in reruns if point_name(p) not in issued]
    if reruns:
        return reruns
    best = critical.best_per_batch(records).get(batch)
    if best is None:
        return []
    mults = sorted({p["lr_multiplier"] for p in points})
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


def batch_extension(spec, batches: list[int], records: list[dict[str, Any]]) -> dict[str, Any] | None:
    """The batch size to add before concluding, once every critical trial finished, or None.

    The fit (`critical.analyse` on the critical records) must bracket B_crit: when B_crit, or the
    upper end of its interval, lies above the largest batch run (or there is no saturation), add
    twice the largest; else when the smallest batch is not in perfect scaling (B_min > B_crit /
    4), add half the smallest. At most `search.add_batches` batches beyond `spec.batch_sizes`; a
    batch whose trial config does not validate (does not split over the workers, say) is not
    added. Returns {"batch", "reason"}.
    """
    added = len(set(batches) - set(spec.batch_sizes))
    if added >= spec.search.add_batches:
        return None
    a = critical.analyse([r for r in records if critical.phase_of(r) == "critical"], reps=500)
    if a["fit"] is None:
        return None
    b_crit, hi = a["b_crit"], (a["b_crit_ci"] or [None, a["b_crit"]])[1]
    largest, smallest = max(batches), min(batches)
    if b_crit is None or hi is None or hi > largest:
        new, reason = 2 * largest, f"B_crit {_num(b_crit)} (upper end {_num(hi)}) above the largest batch {largest}"
    elif smallest > b_crit / critical.REGIME_FACTOR and smallest % 2 == 0:
        new, reason = smallest // 2, f"the smallest batch {smallest} is not in perfect scaling (B_crit {b_crit:.4g})"
    else:
        return None
    try:
        spec.trial_config({"batch": new, "lr_multiplier": spec.lr_multipliers[0], "seed": spec.seeds[0]})
    except ConfigError:  # not a batch this task can run (does not split over the workers, say)
        return None
    return {"batch": new, "reason": reason}


def _num(v: float | None) -> str:
    return "inf" if v is None else f"{v:.4g}"


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
        self.batches = list(spec.batch_sizes)
        self.added: list[dict[str, Any]] = []  # batch sizes added by `batch_extension`, with the reason
        for b in spec.batch_sizes:
            self._enqueue(initial_points(spec, b))

    def _enqueue(self, points: list[dict[str, Any]], first: bool = False) -> None:
        new = [p for p in points if point_name(p) not in self.issued]
        for p in new:
            self.issued[point_name(p)] = p
        self.queue = new + self.queue if first else self.queue + new

    def _propose(self) -> None:
        for b in self.batches:
            pts = [p for n, p in self.issued.items() if p["batch"] == b and p.get("phase") != "gap"]
            if any(point_name(p) not in self.records for p in pts):
                continue  # wait until every critical trial of this batch finished
            recs = [self.records[point_name(p)] for p in pts]
            new = critical_next(self.spec, b, pts, recs)
            if new:
                self._enqueue(new)
            elif b in self.spec.gap.batch_sizes:  # ahead of the queue: the last link of the batch's chain
                self._enqueue(gap_points(self.spec, b, recs), first=True)
        critical_points = [n for n, p in self.issued.items() if p.get("phase") != "gap"]
        if any(n not in self.records for n in critical_points) or any(p.get("phase") != "gap" for p in self.queue):
            return
        ext = batch_extension(self.spec, self.batches, [self.records[n] for n in critical_points])
        if ext is not None:  # the range does not bracket B_crit yet: one more batch before concluding
            self.batches.append(ext["batch"])
            self.added.append(ext)
            self._enqueue(initial_points(self.spec, ext["batch"]))

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
