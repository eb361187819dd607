"""The foundation's claims, on real runs: global-batch semantics across world sizes and
accumulation, exact resume after SIGTERM, one W&B run for a multi-process job."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time

import pytest

from _helpers import assert_same_run, bigbatch, preempt_at, read_jsonl, step_losses
from _wandb_offline import has_exit, history
from bigbatch import config
from bigbatch.trainer.loop import run

MLP = "configs/mnist1d-mlp.toml"


@pytest.fixture(scope="module")
def two_process_run(tmp_path_factory):
    """50 steps of the MLP on 2 gloo processes (torchrun), W&B on in offline mode."""
    out = tmp_path_factory.mktemp("two") / "run"
    sets = ["data.num_samples=4000", "data.train_eval_samples=1000", "train.log_every=1", "train.eval_every=25",
            "train.amp='off'", "track.progress='off'", "train.steps=50", "track.wandb=true"]
    p = bigbatch("train", MLP, "--nproc", "2", "--out", str(out), *sum((["--set", s] for s in sets), []),
                 env={"WANDB_MODE": "offline"})
    assert p.returncode == 0, p.stderr[-3000:]
    return out


def test_global_batch_gives_the_same_loss_on_1_and_2_processes_and_with_accumulation(tmp_path, mlp_overrides, two_process_run):
    ov = mlp_overrides + ["train.steps=50"]
    one = run(config.load(MLP, ov), tmp_path / "one")
    acc = run(config.load(MLP, ov + ["batch.accum_steps=4"]), tmp_path / "acc")
    l1, l4, l2 = step_losses(tmp_path / "one"), step_losses(tmp_path / "acc"), step_losses(two_process_run)
    assert sorted(l1) == sorted(l2) == sorted(l4) == list(range(1, 51))
    for step in l1:
        assert abs(l1[step] - l2[step]) < 1e-4, (step, l1[step], l2[step])
        assert abs(l1[step] - l4[step]) < 1e-4, (step, l1[step], l4[step])
    assert l1[50] < l1[1]  # and it learns
    assert one["steps"] == acc["steps"] == 50


def test_metrics_and_summary_have_the_contract_keys(two_process_run):
    rows = read_jsonl(two_process_run / "metrics.jsonl")
    train_row = next(r for r in rows if "loss" in r)
    assert {"step", "examples", "epoch", "lr", "global_batch", "loss", "samples_per_s"} <= set(train_row)
    eval_row = next(r for r in rows if "test_acc" in r)
    assert {"test_loss", "test_acc", "train_loss", "train_acc"} <= set(eval_row)
    import json

    summary = json.loads((two_process_run / "summary.json").read_text())
    assert {"steps", "examples", "test_acc", "test_loss", "train_acc", "train_loss", "steps_to_target",
            "examples_to_target", "wall_s", "samples_per_s"} <= set(summary)
    assert summary["steps"] == 50 and summary["examples"] == 50 * 128 and summary["world_size"] == 2
    # the resolved config loads back identically
    assert config.load(two_process_run / "config.toml") == config.load(MLP, [
        "data.num_samples=4000", "data.train_eval_samples=1000", "train.log_every=1", "train.eval_every=25",
        "train.amp='off'", "track.progress='off'", "train.steps=50", "track.wandb=true"])


def test_two_process_run_makes_exactly_one_wandb_run_with_the_history(two_process_run):
    runs = list((two_process_run / "wandb").glob("offline-run-*"))
    assert len(runs) == 1, runs
    files = list(runs[0].glob("run-*.wandb"))
    assert len(files) == 1
    assert has_exit(files[0])
    logged = {int(r["_step"]): r for r in history(files[0]) if "loss" in r}
    local = step_losses(two_process_run)
    assert sorted(logged) == sorted(local)
    assert all(abs(logged[s]["loss"] - local[s]) < 1e-9 for s in local)
    assert any("test_acc" in r for r in history(files[0]))


def test_sigterm_checkpoints_and_resume_ends_exactly_like_an_uninterrupted_run(tmp_path, mlp_overrides):
    ov = mlp_overrides + ["train.steps=60", "train.eval_every=30"]

    first = run(config.load(MLP, ov), tmp_path / "cut", reporter=preempt_at(23))
    assert first["status"] == "preempted" and first["steps"] == 23
    assert not (tmp_path / "cut" / "summary.json").exists()
    resumed = run(config.load(tmp_path / "cut" / "config.toml"), tmp_path / "cut", resume=True)
    whole = run(config.load(MLP, ov), tmp_path / "whole")
    assert resumed["steps"] == whole["steps"] == 60
    assert_same_run(tmp_path / "cut", tmp_path / "whole")  # every step's loss and the weights, exactly
    assert resumed["test_loss"] == whole["test_loss"] and resumed["train_loss"] == whole["train_loss"]


def test_cli_exits_3_on_sigterm_and_resumes(tmp_path):
    out = tmp_path / "run"
    cmd = [sys.executable, "-m", "bigbatch", "train", MLP, "--out", str(out), "--set", "train.steps=1000000",
           "--set", "data.num_samples=4000", "--set", "train.log_every=5", "--set", "track.progress='off'"]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 120
    while not ((out / "metrics.jsonl").exists() and (out / "metrics.jsonl").read_text().count("\n") >= 2):
        assert proc.poll() is None and time.time() < deadline, proc.communicate()[1][-2000:]
        time.sleep(0.2)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 3, err[-2000:]
    assert (out / "checkpoint.pt").exists() and "--resume" in err
    stopped = read_jsonl(out / "metrics.jsonl")[-1]["step"]
    p = bigbatch("train", "--resume", str(out), "--set", f"train.steps={stopped + 7}")
    assert p.returncode == 0, p.stderr[-2000:]
    assert read_jsonl(out / "metrics.jsonl")[-1]["step"] == stopped + 7
    assert (out / "summary.json").exists()


def test_a_diverged_run_stops_at_the_first_non_finite_loss_and_exits_4(tmp_path):
    """lr 1e6 blows the MLP up within the first log interval: both ranks stop there (not after
    200 steps of NaN), summary.json says diverged, no checkpoint of NaN weights is written."""
    out = tmp_path / "run"
    sets = ["data.num_samples=4000", "optim.base_lr=1e6", "train.steps=200", "train.log_every=10",
            "track.progress='off'"]
    p = bigbatch("train", MLP, "--nproc", "2", "--out", str(out), *sum((["--set", s] for s in sets), []))
    assert p.returncode == 4, p.stderr[-3000:]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["status"] == "diverged" and summary["steps"] == 10
    assert read_jsonl(out / "metrics.jsonl")[-1]["loss"] is None  # non-finite is written as null
    assert not (out / "checkpoint.pt").exists()


BREAKDOWN = ("time/data(s)", "time/compute(s)", "time/comm_exposed(s)")


def test_step_time_parts_sum_to_the_step_on_two_ranks(two_process_run):
    rows = [r for r in read_jsonl(two_process_run / "metrics.jsonl") if "loss" in r][1:]  # step 1 warms up
    assert len(rows) == 49 and all({*BREAKDOWN, "time/step(s)", "flops_per_example"} <= set(r) for r in rows)
    assert all(r["flops_per_example"] == 449536 for r in rows)  # MLP 40-256-256-10: see tests/unit/test_flops.py
    parts = sum(r[k] for r in rows for k in BREAKDOWN)
    step = sum(r["time/step(s)"] for r in rows)
    wall = sum(r["global_batch"] / r["samples_per_s"] for r in rows)  # the loop's own clock around each step
    assert 0.9 * step <= parts <= step * (1 + 1e-9), (parts, step)
    assert abs(parts - wall) <= 0.1 * wall, (parts, wall)
    # one bucket: DDP starts the all-reduce after the last gradient, so all of it is exposed
    assert sorted(r["time/comm_exposed(s)"] for r in rows)[len(rows) // 2] > 0
    assert all(min(r[k] for k in BREAKDOWN) >= 0 for r in rows)
    assert "mfu" not in rows[0]  # no peak known on a CPU


def test_one_process_logs_no_exposed_comm_and_mfu_from_the_configured_peak(tmp_path, mlp_overrides):
    summary = run(config.load(MLP, mlp_overrides + ["train.steps=4", "train.peak_tflops=0.5"]), tmp_path / "one")
    rows = [r for r in read_jsonl(tmp_path / "one" / "metrics.jsonl") if "loss" in r]
    assert len(rows) == 4 and all(r["time/comm_exposed(s)"] == 0.0 for r in rows)
    for r in rows:
        assert r["mfu"] == pytest.approx(449536 * r["samples_per_s"] / 0.5e12)
    assert summary["flops_per_example"] == 449536
