"""Real Ray Tune sweeps, small: digits + a tiny MLP, a few trials each.

- a trial that raises is recorded as failed and the others complete; with W&B offline every
  trial's run is in the sweep's group;
- a sweep interrupted mid-way (SIGINT, as Ctrl-C) resumes without re-running finished trials;
- a trial with workers_per_trial = 2 trains as 2 gloo processes inside Ray (Ray Train);
- an adaptive sweep races, seeds the best lr, and adds a batch size when its range cannot bracket B_crit.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import tomli_w

from _wandb_offline import records
from bigbatch.study import spec as spec_mod
from bigbatch.study.report import write_report
from bigbatch.study.records import TRIAL_RECORD
from bigbatch.study.sweep import run_sweep

BASE = {
    "data": {"name": "digits", "train_eval_samples": 300},
    "model": {"name": "mlp", "hidden": 32, "depth": 1},
    "optim": {"base_lr": 0.1, "base_batch": 64},
    "train": {"amp": "off"},
}


def sweep_dict(name: str, **over) -> dict:
    d = {"name": name, "base": BASE, "batch_sizes": [16, 32, 64], "lr_multipliers": [1.0], "seeds": [0],
         "target": {"test_acc": 0.7}, "trial": {"max_steps": 60, "eval_every_examples": 256, "gap_epochs": 0.2}}
    for k, v in over.items():
        d[k] = {**d[k], **v} if isinstance(v, dict) and isinstance(d.get(k), dict) else v
    return d


def read_trials(out: Path) -> dict[str, dict]:
    return {t["trial"]: t for t in map(json.loads, (out / "trials.jsonl").read_text().splitlines())}


def test_failed_trial_is_recorded_others_complete_and_wandb_groups_trials(tmp_path, local_ray):
    # 500x the scaled lr (lr 125..500): the loss blows up, the trial stops as diverged, not failed.
    d = sweep_dict("grouped", wandb=True, lr_multipliers=[1.0, 500.0])
    out = tmp_path / "sweep"
    # A file where trial b32's run folder must go: its training run raises (FileExistsError).
    (out / "runs").mkdir(parents=True)
    (out / "runs" / "b32-lr1-s0").write_text("in the way")
    analysis = run_sweep(spec_mod.from_dict(d), d, out, num_cpus=2, quiet=True)

    trials = read_trials(out)
    assert set(trials) == {f"b{b}-lr{m}-s0" for b in (16, 32, 64) for m in ("1", "500")}
    for b in (16, 32, 64):
        hot = trials[f"b{b}-lr500-s0"]
        assert hot["status"] == "diverged" and hot["steps_to_target"] is None and hot["steps"] < 60, hot
        # the loop ended the run: its summary says so, and no exception went through Ray
        assert json.loads((out / "runs" / f"b{b}-lr500-s0" / "summary.json").read_text())["status"] == "diverged"
    assert {p.parent.name for p in (out / "tune").rglob("error.txt")} == {"b32-lr1-s0"}  # only the real failure
    failed = trials["b32-lr1-s0"]
    assert failed["status"] == "failed" and "FileExistsError" in failed["error"]
    for name in ("b16-lr1-s0", "b64-lr1-s0"):
        t = trials[name]
        assert t["status"] == "ok", t
        assert t["steps_to_target"] * t["batch"] == t["examples_to_target"]
        assert t["test_acc"] >= 0.7 and t["lr"] == pytest.approx(0.1 * t["batch"] / 64)
        assert t["b_simple_at_target"] > 0 and t["b_simple_source"] == "train_mode"  # measured after the sweep (at_target)
        assert t["gap"] == pytest.approx(t["train_acc"] - t["test_acc"])
    assert analysis["trials"] == {"ok": 2, "failed": 1, "diverged": 3}
    assert json.loads((out / "critical.json").read_text())["best"][0]["batch"] == 16

    # W&B offline: one run per finished trial, each in the sweep's group.
    for name in ("b16-lr1-s0", "b64-lr1-s0"):
        files = sorted((out / "runs" / name / "wandb").glob("offline-run-*/run-*.wandb"))
        assert len(files) == 1, files
        groups = [r.run.run_group for r in records(files[0]) if r.WhichOneof("record_type") == "run"]
        assert groups and set(groups) == {"grouped"}

    html = write_report(out)
    assert html.is_file() and (out / "report.md").is_file() and (out / "steps_vs_batch.png").is_file()
    assert "data:image/png;base64," in html.read_text()


def test_interrupted_sweep_resumes_without_rerunning_finished_trials(tmp_path):
    # Target out of reach: every trial trains its whole budget, one at a time.
    d = sweep_dict("resumable", batch_sizes=[16, 32, 64], target={"test_acc": 1.0},
                   trial={"max_steps": 120, "max_concurrent": 1, "eval_every_examples": 512})
    cfg, out = tmp_path / "sweep.toml", tmp_path / "sweep"
    cfg.write_text(tomli_w.dumps(d))
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "bigbatch", "sweep", str(cfg), "--out", str(out), "--num-cpus", "2"],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
    try:
        deadline = time.monotonic() + 120
        while len(list(out.glob(f"runs/*/{TRIAL_RECORD}"))) < 1:
            assert proc.poll() is None, proc.stdout.read()
            assert time.monotonic() < deadline, "no trial finished"
            time.sleep(0.2)
        proc.send_signal(signal.SIGINT)
        log, _ = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 130, log
    assert "--resume" in log
    finished = {p.parent.name: (p.parent / "summary.json").stat().st_mtime_ns for p in out.glob(f"runs/*/{TRIAL_RECORD}")}
    assert 1 <= len(finished) < 3

    spec = spec_mod.from_dict(d)
    run_sweep(spec, d, out, resume=True, num_cpus=2, quiet=True)
    trials = read_trials(out)
    assert [t["status"] for t in trials.values()] == ["not_reached"] * 3
    assert all(t["steps"] == 120 for t in trials.values())
    for name, mtime in finished.items():  # finished trials were not trained again
        assert (out / "runs" / name / "summary.json").stat().st_mtime_ns == mtime
    for name in trials:  # and the restarted one logged each step once
        steps = [r["step"] for r in map(json.loads, (out / "runs" / name / "metrics.jsonl").read_text().splitlines())
                 if "loss" in r]
        assert steps == sorted(set(steps))


def test_trial_with_two_workers_trains_ddp_with_two_gloo_processes_inside_ray(tmp_path, local_ray):
    d = sweep_dict("ddp", batch_sizes=[32],
                   trial={"workers_per_trial": 2, "cpus_per_worker": 0.5, "max_steps": 40, "b_simple_samples": 0})
    out = tmp_path / "sweep"
    run_sweep(spec_mod.from_dict(d), d, out, num_cpus=2, quiet=True)
    t = read_trials(out)["b32-lr1-s0"]
    assert t["status"] == "ok", t
    assert t["world_size"] == 2
    log = (out / "runs" / "b32-lr1-s0" / "train.log").read_text()
    assert "2 rank(s) x 16 per device" in log and "backend gloo" in log


def test_adaptive_study_seeds_the_best_lr_races_the_slow_one_and_refits_to_its_critical_json(tmp_path, local_ray):
    # lr 0.05x is hopeless next to 1x: once a 1x trial finished it is raced (stopped as slower).
    d = sweep_dict("adaptive", batch_sizes=[16, 64], lr_multipliers=[1.0, 0.05], seeds=[0, 1, 2],
                   trial={"max_steps": 400, "eval_every_examples": 256, "gap_epochs": None, "b_simple_samples": 0},
                   search={"adaptive": True, "race": 1.5, "extend": 0, "add_batches": 0},  # the range as given
                   gap={"batch_sizes": [16, 64], "seeds": [0, 1], "train_acc": 0.9, "train_samples": 0,
                        "max_epochs": 30, "eval_every_epochs": 1, "sharpness_samples": 128})
    d["base"] = {**BASE, "train": {**BASE["train"], "eval_fine": 0.03, "eval_fine_within": 0.1}}
    out = tmp_path / "sweep"
    analysis = run_sweep(spec_mod.from_dict(d), d, out, num_cpus=2, quiet=True)
    trials = list(read_trials(out).values())
    best = {r["batch"]: r for r in analysis["best"]}
    assert set(best) == {16, 64}
    for b, r in best.items():
        assert r["lr_multiplier"] == 1.0 and r["n_seeds"] == 3 and len(r["seed_steps"]) == 3  # 3 seeds at the best lr
    assert analysis["n_seeds"] == 3 and analysis["b_crit_ci"] is not None
    slow = [t for t in trials if t["lr_multiplier"] == 0.05]
    raced = [t for t in slow if t["status"] == "slower"]
    assert any(t["steps_lower_bound"] > 1.5 * t["raced_against"] for t in raced), slow
    for t in raced:  # stopped by the loop's stopper, through the run's summary: no exception through Ray
        summary = json.loads((out / "runs" / t["trial"] / "summary.json").read_text())
        assert summary["status"] == "slower" and summary["stopped_by"]["steps_lower_bound"] == t["steps_lower_bound"]
        assert t["error"] is None
    assert not list((out / "tune").rglob("error.txt"))
    # interpolated crossings: not the step of an evaluation
    ok = [t for t in trials if t["status"] == "ok" and t["phase"] == "critical"]
    assert ok and all(t["steps_to_target"] < t["steps_to_target_eval"] or t["crossing_resolution"] == 1.0 for t in ok)
    assert any(t["steps_to_target"] != int(t["steps_to_target"]) for t in ok)
    # the gap phase: every row at the training criterion, two seeds each
    assert [g["batch"] for g in analysis["gap"]] == [16, 64]
    for g in analysis["gap"]:
        assert g["n_seeds"] == 2 and g["train_acc"] >= 0.9 and g["sharpness"] > 0
    # refitting trials.jsonl by the stated rule reproduces critical.json
    critical_json = json.loads((out / "critical.json").read_text())
    write_report(out)
    assert json.loads((out / "critical.json").read_text()) == critical_json
    from bigbatch.study import critical

    refit = critical.analyse(trials)
    assert refit["b_crit"] == critical_json["b_crit"] and refit["b_crit_ci"] == critical_json["b_crit_ci"]
    assert (out / "gap_vs_batch.png").is_file()


def test_adaptive_sweep_adds_a_batch_size_when_its_range_cannot_bracket_b_crit(tmp_path, local_ray):
    # Two batch sizes cannot bracket B_crit: either B_crit (the fit through both points) lies
    # above 64 or 16 is past perfect scaling (16 > B_crit / 4). The queue adds 128 or 8 (up to
    # search.add_batches = 1), Ray runs it, and critical.json says so.
    d = sweep_dict("range", batch_sizes=[16, 64], trial={"max_steps": 400, "gap_epochs": None, "b_simple_samples": 0},
                   search={"adaptive": True, "race": 0, "extend": 0, "add_batches": 1})
    out = tmp_path / "sweep"
    analysis = run_sweep(spec_mod.from_dict(d), d, out, num_cpus=2, quiet=True)
    trials = read_trials(out)
    assert analysis["added_batches"] in ([128], [8]), analysis["added_batches"]
    added = analysis["added_batches"][0]
    assert trials[f"b{added}-lr1-s0"]["status"] == "ok" and added in [r["batch"] for r in analysis["best"]]
    assert analysis["ci_unavailable"] == "n/a (1 seed)" and "95 %" not in (out / "report.md").read_text()
