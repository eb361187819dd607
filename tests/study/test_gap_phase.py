"""The gap phase measures a gap when one exists: noisy training labels that the model memorises.

Real training runs (no Ray): the gap phase's trial config (`SweepSpec.trial_config` with
phase = "gap"), the loop stopping at the training criterion, the trial record with train-mode
sharpness and the Hessian's top-k (`trial.gap_hessian`, what a Ray gap trial records), and
`critical.gap_rows` / `outlier_rows` over them.
"""

from __future__ import annotations

import pytest

from bigbatch.study import critical
from bigbatch.study.spec import from_dict
from bigbatch.study.records import RUNS_DIR, record_trial, trial_status
from bigbatch.measure.spectrum import count_outliers
from bigbatch.study.trial import gap_criterion, gap_hessian, train_mode_sharpness, trial_target
from bigbatch.trainer.loop import run

# 40 % of the labels random: a wide MLP fits the 800 training labels, noise included; the test
# labels carry the same noise, which no model can predict, so test accuracy stays far below.
BASE = {"data": {"name": "synthetic", "num_samples": 600, "num_features": 16, "label_noise": 0.4, "train_eval_samples": 0},
        "model": {"name": "mlp", "hidden": 256, "depth": 2},
        "optim": {"name": "sgd", "base_lr": 0.1, "base_batch": 64, "momentum": 0.9},
        "schedule": {"name": "constant"}, "train": {"amp": "off"}}


def test_memorised_label_noise_shows_a_gap_clearly_above_zero(tmp_path):
    spec = from_dict({"name": "memorise", "base": BASE, "batch_sizes": [32, 128], "target": {"test_acc": 0.5},
                      "trial": {"max_steps": 10, "b_simple_samples": 0},
                      "gap": {"batch_sizes": [32, 128], "seeds": [0, 1], "train_acc": 0.98, "train_samples": 0,
                              "max_epochs": 60, "eval_every_epochs": 5, "sharpness_samples": 256}})
    records = []
    for batch in (32, 128):
        for seed in (0, 1):
            point = {"batch": batch, "lr_multiplier": 1.0, "seed": seed, "phase": "gap"}
            cfg = spec.trial_config(point)
            assert cfg.target.train_acc == 0.98 and cfg.train.stop_at_target
            run_dir = tmp_path / RUNS_DIR / spec.trial_name(point)
            summary = run(cfg, run_dir)
            extra = {"criterion": gap_criterion(spec)} | gap_hessian(spec.gap, cfg, run_dir, micro_batch=32)
            if seed == 0:  # the top-k run's lambda_1 is the k = 1 sharpness of the same operator (1 % residuals)
                assert extra["sharpness"] == pytest.approx(train_mode_sharpness(cfg, run_dir, 256, 32), rel=0.02)
            records.append(record_trial(run_dir, point, None, summary, trial_status(summary),
                                        target=trial_target(spec, point), extra=extra))
    assert all(r["status"] == "ok" and r["phase"] == "gap" for r in records), [(r["status"], r["train_acc"]) for r in records]
    rows = critical.gap_rows(records)
    assert [r["batch"] for r in rows] == [32, 128] and all(r["n_seeds"] == 2 for r in rows)
    for r in rows:
        assert r["train_acc"] >= 0.98  # every row at the criterion ...
        assert r["gap"] > 0.2  # ... and test accuracy far below it: the gap the measurement must show
        assert r["loss_gap"] > 0.5 and r["sharpness"] > 0
    assert "train_acc >= 0.98" in records[0]["criterion"]
    # the Hessian's top-k at one micro-batch: k = classes + 3 by default, descending, the gap rule's
    # count, and the gradient's share of nested spaces (top-C inside top-k)
    for r in records:
        eigs = r["top_eigenvalues"]
        assert r["spectrum_k"] == len(eigs) == r["num_classes"] + 3 and eigs == sorted(eigs, reverse=True)
        assert r["sharpness"] == eigs[0] and r["outliers"] == count_outliers(eigs).count
        assert 0 < r["grad_fraction_classes"] <= r["grad_fraction_top_k"] <= 1
    out = critical.analyse(records)
    assert [o["batch"] for o in out["gap_outliers"]] == [32, 128]
    assert all(o["n_seeds"] == 2 and o["lambda_1_range"][0] <= o["lambda_1"] <= o["lambda_1_range"][1]
               and o["lambda_k"] <= o["lambda_c"] <= o["lambda_1"] for o in out["gap_outliers"])
    assert out["gap_trend"]["log2_class_eigenvalue"] is not None and out["gap"][0]["grad_fraction_top_k"] is not None
