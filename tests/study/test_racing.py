"""Racing as documented: against the best lr so far (majority rule, censored median), never the
best itself, and a result that does not depend on the order trials finish (issue 32). No Ray:
the real queue (`adaptive.TrialQueue`) and the real stop rule (`adaptive.race_check`) driven by
an event simulation of trials running side by side."""

from __future__ import annotations

import heapq
import math

import numpy as np
import pytest

from bigbatch.study import critical
from bigbatch.study.adaptive import TrialQueue, point_name, race_check, unsettled_races
from bigbatch.study.spec import from_dict

BASE = {"data": {"name": "synthetic", "num_samples": 2000}, "model": {"name": "mlp"},
        "optim": {"base_lr": 0.1, "base_batch": 128, "scaling": "sqrt"}}


def spec(race=1.5):
    return from_dict({"name": "t", "base": BASE, "batch_sizes": [16, 256], "lr_multipliers": [0.5, 1.0, 2.0],
                      "seeds": [0, 1, 2], "target": {"test_acc": 0.9}, "trial": {"max_steps": 100},
                      "search": {"adaptive": True, "race": race}, "gap": {"batch_sizes": []}})


# True outcomes: steps to target per (batch, multiplier, seed); None = diverges (at step 20).
# At 16, 1x has one lucky seed (100) and two that diverge: it loses the majority; 2x (160-170)
# is the answer, and a race against 1x's seed 0 (x 1.5 = 150) stops 2x's seed 0 if 1x finished first.
TRUE = {16: {0.5: (240, 250, 260), 1.0: (100, None, None), 2.0: (160, 165, 170), 4.0: (None, None, None)},
        256: {0.5: (60, 62, 64), 1.0: (40, 41, 45), 2.0: (44, 43, 47), 4.0: (90, 95, 99)}}


def outcome(point):
    steps = TRUE[point["batch"]].get(point["lr_multiplier"], (None,) * 3)[point["seed"]]
    return steps if steps is not None else None


def simulate(spec_, speeds, workers=2):
    """Run the queue with `workers` trials at a time; a trial takes speed x steps of time. Racing:
    at every finish, each running trial checks `race_check` at the step it has reached, and is
    scheduled to stop at the step where the current reference would stop it."""
    queue, t, running, records, events = TrialQueue(spec_), 0.0, {}, [], []
    finished = []  # the race/ folder: outcomes of finished critical trials

    def finish(name, status, steps, lower=None):
        p, _ = running.pop(name)
        rec = {**p, "lr": 0.01 * p["lr_multiplier"], "status": status, "steps_to_target": steps,
               "steps_lower_bound": lower}
        records.append(rec)
        finished.append(rec)
        queue.finished(p, rec)

    def schedule(name):
        p, t0 = running[name]
        true = outcome(p)
        end = 20 if true is None else true
        stop_at = end
        best = critical.best_per_batch([r for r in finished if r["batch"] == p["batch"]]).get(p["batch"])
        if spec_.search.race and best is not None and p.get("race") is not False and best["lr_multiplier"] != p["lr_multiplier"]:
            stop_at = min(end, math.floor(spec_.search.race * best["steps_to_target"]) + 1)
        now_step = (t - t0) / speeds[name]
        if spec_.search.race and race_check(finished, p, math.floor(now_step), spec_.search.race):
            stop_at = math.floor(now_step)
        heapq.heappush(events, (t0 + speeds[name] * max(stop_at, now_step), name, stop_at, end))

    while True:
        while len(running) < workers and (p := queue.next()) not in (None, TrialQueue.FINISHED):
            name = point_name(p)
            running[name] = (p, t)
            speeds.setdefault(name, 1.0)
            schedule(name)
        if not running:
            break
        t_ev, name, stop_at, end = heapq.heappop(events)
        if name not in running or t_ev < t:
            continue
        t = t_ev
        p = running[name][0]
        if stop_at < end and race_check(finished, p, stop_at, spec_.search.race):
            finish(name, "slower", None, stop_at)
        elif stop_at < end:
            schedule(name)  # the reference moved: re-plan
            continue
        else:
            finish(name, "ok" if outcome(p) is not None else "diverged", outcome(p))
        for other in list(running):
            schedule(other)
    return records


def result(records):
    best = critical.best_per_batch(records)
    return {b: (e["lr_multiplier"], e["steps_to_target"], e["n_seeds"]) for b, e in best.items()}


def test_race_check_uses_the_majority_best_and_its_median_never_a_lucky_seed():
    point = {"batch": 16, "lr_multiplier": 2.0, "seed": 1}
    fin = [{"batch": 16, "lr_multiplier": 1.0, "seed": 0, "status": "ok", "steps_to_target": 100.0},
           {"batch": 16, "lr_multiplier": 1.0, "seed": 1, "status": "diverged", "steps_to_target": None},
           {"batch": 16, "lr_multiplier": 2.0, "seed": 0, "status": "ok", "steps_to_target": 160.0}]
    # 1x: 1 of 2 reached, no majority: the reference is 2x (160); the trial at 2x is never raced.
    assert race_check(fin, point, 10_000, 1.5) is None
    other = {"batch": 16, "lr_multiplier": 0.5, "seed": 0}
    assert race_check(fin, other, 240, 1.5) is None
    assert race_check(fin, other, 241, 1.5)["raced_against"] == 160.0
    assert race_check(list(reversed(fin)), other, 241, 1.5) == race_check(fin, other, 241, 1.5)
    # The reference is a censored median: 2x with 160, 180 and a raced seed is 180, not 160.
    fin += [{"batch": 16, "lr_multiplier": 2.0, "seed": 1, "status": "ok", "steps_to_target": 180.0},
            {"batch": 16, "lr_multiplier": 2.0, "seed": 2, "status": "slower", "steps_to_target": None}]
    assert race_check(fin, other, 269, 1.5) is None and race_check(fin, other, 271, 1.5)["raced_against"] == 180.0


def test_a_race_that_could_change_the_answer_is_rerun_unraced():
    recs = [{"batch": 16, "lr_multiplier": 1.0, "seed": 0, "status": "ok", "steps_to_target": 100.0},
            {"batch": 16, "lr_multiplier": 2.0, "seed": 0, "status": "slower", "steps_to_target": None,
             "steps_lower_bound": 151},
            {"batch": 16, "lr_multiplier": 0.5, "seed": 0, "status": "slower", "steps_to_target": None,
             "steps_lower_bound": 120}]
    # Best 100 (1x): 2x is known to need > 151 > 1.25 x 100, settled; 0.5x only > 120: it could be
    # a close neighbour, unsettled.
    assert [r["lr_multiplier"] for r in unsettled_races(recs, 16, 1.25)] == [0.5]
    # Once 1x loses its majority there is no best: every race is unsettled.
    recs += [{"batch": 16, "lr_multiplier": 1.0, "seed": s, "status": "diverged", "steps_to_target": None} for s in (1, 2)]
    assert sorted(r["lr_multiplier"] for r in unsettled_races(recs, 16, 1.25)) == [0.5, 2.0]
    # The unraced rerun supersedes the raced record of the same seed.
    rerun = {"batch": 16, "lr_multiplier": 2.0, "seed": 0, "status": "ok", "steps_to_target": 160.0, "race": False}
    assert critical.lr_groups(recs + [rerun])[16][2.0]["steps_to_target"] == 160.0


@pytest.mark.parametrize("workers", [2, 3])
def test_the_result_does_not_depend_on_the_order_trials_finish(workers):
    # 40 random speeds per trial (so 40 finish orders) give the same best lr, median and seeds at
    # every batch as a sweep without racing; racing still stops trials.
    reference = result(simulate(spec(race=0), {}, workers))
    assert reference[16] == (2.0, 165, 3) and reference[256][0] == 1.0
    rng = np.random.default_rng(workers)
    raced = reruns = 0
    orders, without_reruns = set(), set()
    for _ in range(40):
        speeds = {}
        names = [point_name({"batch": b, "lr_multiplier": m, "seed": s, **r}) for b in TRUE for m in TRUE[b]
                 for s in range(3) for r in ({}, {"race": False})]
        speeds.update({n: float(rng.uniform(0.2, 3.0)) for n in names})
        recs = simulate(spec(), speeds, workers)
        assert result(recs) == reference
        raced += sum(r["status"] == "slower" for r in recs)
        reruns += sum(r.get("race") is False for r in recs)
        orders.add(tuple(point_name(r) for r in recs))
        # the raced records alone (the reruns left out): what racing without settling would read
        without_reruns.add(tuple(sorted(result([r for r in recs if r.get("race") is not False]).items())))
    assert raced > 0 and reruns > 0 and len(orders) > 10
    assert len(without_reruns) > 1  # without the reruns the answer would depend on the order
