"""Which trials the sweep measures at the target after its last trial (`study.at_target`): per
batch size the best lr's lowest reached seed, largest batch first, nothing measured twice."""

from __future__ import annotations

from bigbatch.study.at_target import chosen_trials


def rec(batch, mult, seed, steps, status="ok", **kw):
    return {"batch": batch, "lr_multiplier": mult, "lr": 0.1 * mult, "seed": seed, "status": status,
            "steps_to_target": steps if status == "ok" else None, "phase": "critical",
            "run_dir": f"runs/b{batch}-lr{mult}-s{seed}", **kw}


def test_one_trial_per_batch_the_best_lrs_lowest_reached_seed_largest_batch_first():
    records = [
        # batch 64: lr x1 is best (median 100 over 3 seeds); its seed 0 raced out, so seed 1 is measured
        rec(64, 1.0, 0, None, status="slower"), rec(64, 1.0, 1, 98), rec(64, 1.0, 2, 102), rec(64, 1.0, 3, 100),
        rec(64, 2.0, 0, 150), rec(64, 2.0, 1, 140), rec(64, 2.0, 2, 160),
        # batch 256: lr x2 is best
        rec(256, 1.0, 0, 60), rec(256, 2.0, 0, 40), rec(256, 2.0, 1, 42),
        # a gap-phase trial is never measured here (it measures its own sharpness)
        {**rec(512, 1.0, 0, 30), "phase": "gap"},
    ]
    chosen = chosen_trials(records)
    assert [(t["batch"], t["lr_multiplier"], t["seed"]) for t in chosen] == [(256, 2.0, 0), (64, 1.0, 1)]


def test_a_trial_measured_before_is_not_measured_again():
    records = [rec(32, 1.0, 0, 200, b_simple_source="train_mode"), rec(32, 1.0, 1, 210), rec(128, 1.0, 0, 80)]
    assert [(t["batch"], t["seed"]) for t in chosen_trials(records)] == [(128, 0)]
