"""trials.jsonl records from a run's summary and metrics rows, and the report from records (no Ray)."""

from __future__ import annotations

import json

import pytest

from bigbatch.study import critical
from bigbatch.study.report import write_report
from bigbatch.study.records import trial_record

POINT = {"batch": 64, "lr_multiplier": 0.5, "seed": 1}


def rows():
    # metrics.jsonl as the loop writes it: log rows (loss, online GNS) and eval rows.
    out = []
    for step, epoch, tr, te, gns in [(10, 0.25, 0.70, 0.69, 100.0), (20, 0.5, 0.82, 0.80, 150.0),
                                      (30, 0.75, 0.90, 0.86, 200.0), (40, 1.0, 0.95, 0.90, 400.0)]:
        out.append({"step": step, "epoch": epoch, "loss": 0.5, "gns/b_simple": gns})
        out.append({"step": step, "epoch": epoch, "train_acc": tr, "test_acc": te, "train_loss": 1 - tr,
                    "test_loss": 1 - te, "sharpness/top": 10.0 * step})
    return out


SUMMARY = {"status": "target_reached", "steps": 40, "epochs": 1.0, "peak_lr": 0.05, "steps_to_target": 30,
           "examples_to_target": 1920, "train_acc": 0.95, "test_acc": 0.90, "train_loss": 0.05, "test_loss": 0.1,
           "world_size": 1, "wall_s": 3.0}


def test_record_reads_target_gap_budget_and_measurements():
    rec = trial_record(POINT, SUMMARY, rows(), gap_epochs=0.6, status="ok")
    assert (rec["batch"], rec["lr_multiplier"], rec["seed"], rec["lr"]) == (64, 0.5, 1, 0.05)
    assert rec["steps_to_target"] == 30 and rec["examples_to_target"] == 1920
    assert rec["gap"] == pytest.approx(0.05) and rec["loss_gap"] == pytest.approx(0.05)
    # the last evaluation within 0.6 epochs is the one at 0.5
    assert rec["train_acc_at_budget"] == 0.82 and rec["gap_at_budget"] == pytest.approx(0.02)
    # online B_simple: the last value up to steps_to_target (30), not the one after it
    assert rec["b_simple_online_at_target"] == 200.0 and rec["b_simple_at_target"] == 200.0
    assert rec["b_simple_source"] == "online"
    # averaged over training up to the target, each value weighted by the steps it covers
    assert rec["b_simple_online_mean_to_target"] == pytest.approx((10 * 100 + 10 * 150 + 10 * 200) / 30)
    assert rec["sharpness"] == 400.0


def test_the_train_mode_measurement_wins_and_budget_beyond_the_run_is_not_invented():
    rec = trial_record(POINT, SUMMARY, rows(), gap_epochs=2.0, status="ok",
                       measured={"b_simple": 321.0, "b_noise": 150.0, "micro_batch": 32})
    assert rec["b_noise_at_target"] == 150.0 and rec["micro_batch"] == 32
    assert rec["b_simple_at_target"] == 321.0 and rec["b_simple_source"] == "train_mode"
    assert rec["gap_at_budget"] is None  # the run stopped at 1 epoch, before the 2-epoch budget


def test_a_measured_bound_is_kept_with_its_reason_and_not_replaced_by_the_online_ema():
    bound = {"b_simple": None, "b_simple_lower_bound": 900.0, "b_simple_interval": [900.0, None],
             "b_simple_reason": "grad_sq estimate -0.01 <= 0 at b K = 8192 examples: ...", "micro_batch": 32,
             "own_b": {"micro_batch": 64, "b_simple": 1200.0}}
    rec = trial_record(POINT, SUMMARY, rows(), gap_epochs=None, status="ok", measured=bound)
    assert rec["b_simple_at_target"] is None and rec["b_simple_source"] == "train_mode"
    assert rec["b_simple_lower_bound_at_target"] == 900.0 and "<= 0" in rec["b_simple_reason_at_target"]
    assert rec["b_simple_own_b_at_target"] == 1200.0 and rec["own_micro_batch"] == 64


def test_failed_trial_without_summary():
    rec = trial_record(POINT, None, [], gap_epochs=None, status="failed", error="RuntimeError: boom")
    assert rec["status"] == "failed" and rec["steps_to_target"] is None and rec["error"] == "RuntimeError: boom"
    assert rec["b_simple_at_target"] is None and rec["gap"] is None


def test_report_from_records(tmp_path):
    trials = []
    for b, s in [(16, 4000), (64, 1100), (256, 400), (1024, 220), (4096, 260)]:
        t = trial_record({"batch": b, "lr_multiplier": 1.0, "seed": 0},
                         {**SUMMARY, "steps_to_target": s, "examples_to_target": s * b, "peak_lr": 0.01 * b},
                         [], None, "ok", measured={"b_simple": 500.0, "b_noise": 250.0})
        trials.append({**t, "trial": f"b{b}", "run_dir": str(tmp_path / "none")})
    trials.append({**trial_record({"batch": 64, "lr_multiplier": 2.0, "seed": 0}, None, [], None, "diverged"), "trial": "x"})
    (tmp_path / "trials.jsonl").write_text("".join(json.dumps(t) + "\n" for t in trials))
    analysis = critical.analyse(trials)
    (tmp_path / "critical.json").write_text(json.dumps(analysis))
    html = write_report(tmp_path).read_text()
    md = (tmp_path / "report.md").read_text()
    # One seed per batch: the rise at 4096 cannot be told from seed noise (it stays in the fit),
    # and there is no interval: none printed, no "95 %" claimed.
    assert analysis["excluded_batches"] == [] and analysis["b_crit_ci"] is None
    assert "[n/a (1 seed)]" in md and "95 %" not in md
    assert f"B_crit = {analysis['b_crit']:.4g}" in md and "B_simple at target = 500" in md
    assert "B_noise at target = 250" in md and f"B_crit / B_noise = {analysis['b_crit'] / 250:.2g}" in md
    assert f"B_crit / B_simple = {analysis['b_crit'] / 500:.2g}" in md and "Table 1" in md
    for name in ("steps_vs_batch", "pareto", "lr_sensitivity"):
        assert (tmp_path / f"{name}.png").stat().st_size > 1000 and f"{name}.png" in md
    assert not (tmp_path / "b_simple.png").exists()  # no online GNS rows, no gap phase: not drawn, and said so
    assert "Not plotted (no data): gap_vs_batch, outliers_vs_batch, b_simple" in md
    assert html.count("data:image/png;base64,") == 3 and "diverged" in html


def test_report_shows_outliers_vs_batch_from_gap_records(tmp_path):
    trials = []
    for b, lam in [(64, 1.2), (512, 4.0), (2048, 6.0)]:
        for sd in (0, 1):
            f = 1 + 0.1 * sd
            rec = trial_record({"batch": b, "lr_multiplier": 1.0, "seed": sd, "phase": "gap"}, SUMMARY, [], None, "ok",
                               extra={"sharpness": f * lam, "top_eigenvalues": [f * lam, f * lam / 1.5, 0.5, 0.4],
                                      "num_classes": 3, "outliers": 2, "outliers_saturated": False,
                                      "grad_fraction_top_k": 0.6 + 0.1 * sd, "grad_fraction_classes": 0.55})
            trials.append({**rec, "trial": f"gap-b{b}-s{sd}", "run_dir": str(tmp_path / "none")})
    (tmp_path / "trials.jsonl").write_text("".join(json.dumps(t) + "\n" for t in trials))
    write_report(tmp_path)
    md = (tmp_path / "report.md").read_text()
    assert (tmp_path / "outliers_vs_batch.png").stat().st_size > 10_000 and "outliers_vs_batch.png" in md
    line = next(l for l in md.splitlines() if l.startswith("- Hessian outliers"))
    slope = critical.analyse(trials)["gap_trend"]["log2_sharpness"]["slope"]
    assert f"lambda_1 x {2 ** slope:.2f} per doubling" in line and "lambda_3 (C = classes)" in line
    assert "64: 2, 512: 2, 2,048: 2" in line and "64: 0.65" in line  # outliers and gradient share per batch (medians)
    head = next(l for l in md.splitlines() if l.startswith("| batch | lr | seeds"))
    assert head.endswith("| outliers | gradient in top-k |")
    assert "| 2 ± 0 | 0.65 ± 0.071 |" in md
