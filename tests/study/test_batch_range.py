"""An adaptive batch range (issue 32): when the fit does not bracket B_crit the study adds batch
sizes (twice the largest, half the smallest, up to `search.add_batches`) before concluding, and
the report says when B_crit still lies outside the swept range. The real queue on synthetic
outcomes S(B) = S_min (1 + B_crit / B) (no Ray, no training)."""

from __future__ import annotations

import math

import pytest

from bigbatch.errors import ConfigError
from bigbatch.study import critical
from bigbatch.study.adaptive import TrialQueue, batch_extension
from bigbatch.study.records import headline
from bigbatch.study.spec import from_dict

BASE = {"data": {"name": "synthetic", "num_samples": 20000}, "model": {"name": "mlp"},
        "optim": {"base_lr": 0.1, "base_batch": 128, "scaling": "sqrt"}}


def spec(batch_sizes, **search):
    return from_dict({"name": "t", "base": BASE, "batch_sizes": batch_sizes, "lr_multipliers": [0.5, 1.0, 2.0],
                      "seeds": [0, 1, 2], "target": {"test_acc": 0.9}, "trial": {"max_steps": 100},
                      "search": {"adaptive": True, **search}, "gap": {"batch_sizes": []}})


def outcome(point, b_crit, s_min=50.0):
    """Best lr 1x; 0.5x and 2x 20 % slower; seeds scatter by -2, 0, +2 %."""
    m = point["lr_multiplier"]
    steps = s_min * (1 + b_crit / point["batch"]) * (1 + 0.2 * math.log2(m) ** 2) * (1 + 0.02 * (point["seed"] - 1))
    return {**point, "lr": 0.01 * m, "status": "ok", "steps_to_target": steps, "phase": "critical"}


def run(queue, b_crit):
    recs = []
    while (p := queue.next()) != TrialQueue.FINISHED:
        assert p is not None
        recs.append(outcome(p, b_crit))
        queue.finished(p, recs[-1])
    return recs


def test_b_crit_above_the_largest_batch_adds_doublings_up_to_the_limit_and_is_marked_outside():
    queue = TrialQueue(spec([16, 64, 256], add_batches=2))
    recs = run(queue, b_crit=2000.0)
    assert [a["batch"] for a in queue.added] == [512, 1024] and "above the largest batch" in queue.added[0]["reason"]
    a = critical.analyse(recs, reps=500)
    assert a["b_crit"] == pytest.approx(2000.0, rel=0.05) and a["swept_batches"] == [16, 1024]
    a["added_batches"] = critical.added_batches(recs, [16, 64, 256])
    text = "\n".join(headline(a))
    assert "above the swept range 16-1024" in text and "added to bracket B_crit" in text and "[512, 1024]" in text


def test_enough_doublings_bracket_b_crit_and_the_extension_stops():
    queue = TrialQueue(spec([16, 64, 256], add_batches=6))
    recs = run(queue, b_crit=700.0)
    added = [a["batch"] for a in queue.added]
    assert added[:2] == [512, 1024] and len(added) < 6  # stopped once the interval's upper end was inside
    a = critical.analyse(recs, reps=500)
    assert a["b_crit_ci"][1] < max(added) and a["outside_swept_range"] is None


def test_a_smallest_batch_past_perfect_scaling_adds_halvings():
    # B_crit = 100: perfect scaling needs B <= 25; 64 is not, 32 is not, 16 is.
    queue = TrialQueue(spec([64, 256, 1024], add_batches=4))
    run(queue, b_crit=100.0)
    assert [a["batch"] for a in queue.added] == [32, 16] and "perfect scaling" in queue.added[0]["reason"]


def test_a_range_that_brackets_b_crit_or_a_zero_limit_adds_nothing():
    queue = TrialQueue(spec([16, 64, 256, 1024], add_batches=2))
    recs = run(queue, b_crit=150.0)
    assert queue.added == [] and critical.analyse(recs, reps=200)["outside_swept_range"] is None
    queue = TrialQueue(spec([16, 64, 256], add_batches=0))
    run(queue, b_crit=2000.0)
    assert queue.added == [] and queue.batches == [16, 64, 256]
    assert batch_extension(spec([16, 64], add_batches=2), [16, 64], []) is None  # nothing to fit yet


def test_add_batches_is_checked():
    with pytest.raises(ConfigError, match="search.add_batches"):
        spec([16, 64], add_batches=-1)
    assert spec([16, 64]).search.add_batches == 2
