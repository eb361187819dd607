"""The study's adaptive queue: lr-grid extension at an edge, seeds at the deciding lrs, the gap phase (no Ray)."""

import math

from bigbatch.study import critical
from bigbatch.study.adaptive import TrialQueue, point_name
from bigbatch.study.spec import from_dict

BASE = {"data": {"name": "synthetic", "num_samples": 2000}, "model": {"name": "mlp"},
        "optim": {"base_lr": 0.1, "base_batch": 128, "scaling": "sqrt"}}


def spec(**kw):
    # steps here do not fall with the batch (no S(B) to fit): the batch range stays as configured
    raw = {"name": "t", "base": BASE, "batch_sizes": [16, 256], "lr_multipliers": [0.5, 1.0, 2.0], "seeds": [0, 1, 2],
           "target": {"test_acc": 0.9}, "trial": {"max_steps": 100}, "search": {"adaptive": True, "add_batches": 0},
           "gap": {"batch_sizes": [256], "seeds": [0, 1], "train_samples": 1000}}
    raw.update(kw)
    return from_dict(raw)


def outcome(point, best_mult, curv=0.2):
    """Steps = 100 x (1 + curv (log2 m/m*)^2) x seed scatter; lrs 8x above the best diverge."""
    m = point["lr_multiplier"]
    rec = {**point, "lr": m * 0.01, "phase": point.get("phase", "critical")}
    if m >= 8 * best_mult[point["batch"]]:  # a diverged run leaves no summary: no lr recorded
        return {**rec, "lr": None, "status": "diverged", "steps_to_target": None}
    steps = 100 * (1 + curv * math.log2(m / best_mult[point["batch"]]) ** 2) * (1 + 0.02 * point["seed"])
    return {**rec, "status": "ok", "steps_to_target": steps}


def run_plan(queue, best_mult, curv=0.2):
    order = []
    while (p := queue.next()) != TrialQueue.FINISHED:
        assert p is not None  # nothing runs concurrently here, so the queue never has to wait
        order.append(p)
        queue.finished(p, outcome(p, best_mult, curv))
    return order


def test_first_trials_start_at_the_scaling_rule_then_go_outwards():
    queue = TrialQueue(spec())
    first = [queue.next() for _ in range(3)]
    assert [p["lr_multiplier"] for p in first] == [1.0, 2.0, 0.5]
    assert all(p["batch"] == 16 and p["seed"] == 0 for p in first)


def test_best_lr_at_the_edge_extends_the_grid_then_seeds_go_to_the_deciding_lrs():
    # At 16 the optimum is inside the grid (1x); at 256 it is 4x: above the grid's top (2x).
    order = run_plan(TrialQueue(spec()), {16: 1.0, 256: 4.0})
    mults_256 = sorted({p["lr_multiplier"] for p in order if p["batch"] == 256 and p.get("phase") != "gap"})
    assert mults_256 == [0.5, 1.0, 2.0, 4.0, 8.0]  # two extensions: 4x was best at the edge, then 8x is worse
    recs = [outcome(p, {16: 1.0, 256: 4.0}) for p in order]
    best = critical.best_per_batch([r for r in recs if r["phase"] == "critical"])
    assert best[16]["lr_multiplier"] == 1.0 and best[256]["lr_multiplier"] == 4.0
    for b, m in ((16, 1.0), (256, 4.0)):
        assert best[b]["n_seeds"] == 3 and best[b]["edge"] is None
    seeded = {(p["batch"], p["lr_multiplier"]) for p in order if p["seed"] == 2}
    assert seeded == {(16, 0.5), (16, 1.0), (16, 2.0), (256, 2.0), (256, 4.0), (256, 8.0)}  # best and neighbours
    # neighbours 2x slower than the best (outside search.close = 1.25) do not decide the answer: no seeds
    steep = run_plan(TrialQueue(spec()), {16: 1.0, 256: 4.0}, curv=1.0)
    assert {(p["batch"], p["lr_multiplier"]) for p in steep if p["seed"] == 2} == {(16, 1.0), (256, 4.0)}
    # the gap phase: only for 256, at its best lr, two seeds, after its critical trials
    gap = [p for p in order if p.get("phase") == "gap"]
    assert [(p["batch"], p["lr_multiplier"], p["seed"]) for p in gap] == [(256, 4.0, 0), (256, 4.0, 1)]
    assert point_name(gap[0]) == "gap-b256-lr4-s0"
    assert order.index(gap[0]) > max(i for i, p in enumerate(order) if p["batch"] == 256 and p.get("phase") != "gap")


def test_extension_budget_is_respected_and_the_edge_is_reported():
    order = run_plan(TrialQueue(spec(search={"adaptive": True, "extend": 1, "add_batches": 0})), {16: 1.0, 256: 16.0})
    recs = [outcome(p, {16: 1.0, 256: 16.0}) for p in order if p.get("phase") != "gap"]
    assert max(p["lr_multiplier"] for p in order if p["batch"] == 256) == 4.0
    assert critical.best_per_batch(recs)[256]["edge"] == "high"


def test_plan_waits_for_running_trials_of_a_batch():
    queue = TrialQueue(spec(batch_sizes=[16], gap={"batch_sizes": []}))
    pts = [queue.next() for _ in range(3)]
    assert queue.next() is None  # all three lrs issued, none finished: wait
    for p in pts[:2]:
        queue.finished(p, outcome(p, {16: 1.0}))
    assert queue.next() is None  # still one running at this batch
    queue.finished(pts[2], outcome(pts[2], {16: 1.0}))
    assert queue.next()["seed"] == 1
