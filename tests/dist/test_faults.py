"""Nothing lost: a checkpoint that does not load is skipped for the previous one, a full disk
stops the run with the previous checkpoint intact, and a rank that stops answering ends the run
with one line (step, timeout, checkpoint) and exit code 5, after which the run resumes exactly.
Real runs, real files, real gloo ranks under the `--nproc` launcher."""

from __future__ import annotations

import hashlib
import json
import os
import resource
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from _helpers import bigbatch, read_jsonl, step_losses

MLP = "configs/mnist1d-mlp.toml"
SMALL = ["data.num_samples=4000", "data.train_eval_samples=500", "train.log_every=1", "train.eval_every=0",
         "train.amp='off'", "track.progress='off'", "schedule.name='constant'"]


def _sets(*extra: str) -> list[str]:
    return sum((["--set", s] for s in SMALL + list(extra)), [])


def _one_line(stderr: str) -> str:
    lines = [l for l in stderr.strip().splitlines() if l.strip()]
    assert "Traceback" not in stderr, stderr[-3000:]
    return lines[-1]


def _digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.mark.timeout(1800)  # several real runs; each start-up takes long on 2 loaded cores
def test_a_truncated_newest_checkpoint_is_named_the_previous_is_used_and_the_run_ends_as_if_uninterrupted(tmp_path):
    out = tmp_path / "run"
    p = bigbatch("train", MLP, "--out", str(out), *_sets("train.steps=40", "checkpoint.every=10"), timeout=600)
    assert p.returncode == 0, p.stderr[-3000:]
    assert sorted(x.name for x in out.glob("checkpoint*")) == ["checkpoint-00000030.pt", "checkpoint-00000040.pt", "checkpoint.pt"]
    whole_losses = step_losses(out)
    whole_model = torch.load(out / "checkpoint.pt", weights_only=True)["model"]
    newest = out / "checkpoint-00000040.pt"
    newest.write_bytes(newest.read_bytes()[:100_000])  # a node lost mid-copy

    p = bigbatch("train", "--resume", str(out), timeout=600)
    assert p.returncode == 0, p.stderr[-3000:]
    warnings = [l for l in p.stderr.splitlines() if "did not load" in l]
    assert len(warnings) == 1 and "checkpoint-00000040.pt" in warnings[0] and "checkpoint-00000030.pt" in warnings[0], p.stderr
    assert "resumed from" in p.stderr and "at step 30" in p.stderr
    assert step_losses(out) == whole_losses  # metrics cut back to step 30 and re-logged: every step, exactly
    assert [r["step"] for r in read_jsonl(out / "metrics.jsonl") if "loss" in r] == list(range(1, 41))
    resumed_model = torch.load(out / "checkpoint.pt", weights_only=True)["model"]
    assert all(torch.equal(whole_model[k], resumed_model[k]) for k in whole_model)
    assert (out / "checkpoint-00000040.pt.corrupt").exists()


@pytest.mark.timeout(1800)  # several real runs; each start-up takes long on 2 loaded cores
def test_when_no_checkpoint_loads_resume_exits_2_with_one_line_and_changes_nothing(tmp_path):
    out = tmp_path / "run"
    p = bigbatch("train", MLP, "--out", str(out), *_sets("train.steps=20", "checkpoint.every=10"), timeout=600)
    assert p.returncode == 0, p.stderr[-3000:]
    for f in out.glob("checkpoint-*.pt"):
        f.write_bytes(f.read_bytes()[:5000])
    before = {f.name: _digest(f) for f in out.iterdir()}
    for launcher in ([], ["--nproc", "2"]):
        p = bigbatch("train", "--resume", str(out), *launcher, timeout=600)
        assert p.returncode == 2, p.stderr[-3000:]
        line = _one_line(p.stderr)
        assert p.stderr.strip() == line and "--resume" in line
        assert "checkpoint-00000020.pt" in line and "checkpoint-00000010.pt" in line
        assert {f.name: _digest(f) for f in out.iterdir()} == before


def _file_size_limit(limit: int):
    def apply() -> None:
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))
    return apply


@pytest.mark.timeout(1800)  # several real runs; each start-up takes long on 2 loaded cores
def test_a_full_disk_while_checkpointing_stops_the_run_with_one_line_and_the_previous_checkpoint_intact(tmp_path):
    out = tmp_path / "run"
    p = bigbatch("train", MLP, "--out", str(out), *_sets("train.steps=20", "checkpoint.every=10"), timeout=600)
    assert p.returncode == 0, p.stderr[-3000:]
    previous = out / "checkpoint-00000020.pt"
    digest = _digest(previous)
    # a checkpoint is ~650 kB; 200 kB per file leaves room for the logs but not for the next one
    cmd = [sys.executable, "-m", "bigbatch", "train", "--resume", str(out), "--set", "train.steps=40"]
    p = subprocess.run(cmd, capture_output=True, text=True, timeout=600, preexec_fn=_file_size_limit(200_000))
    assert p.returncode == 1, p.stderr[-3000:]
    line = _one_line(p.stderr)
    assert "could not write checkpoint" in line and "checkpoint-00000030.pt" in line, line
    assert f"the previous checkpoint {previous} is intact" in line, line
    assert _digest(previous) == digest and os.readlink(out / "checkpoint.pt") == previous.name
    assert not list(out.glob(".checkpoint-*")) and not (out / "checkpoint-00000030.pt").exists()
    assert "Traceback" in (out / "train.log").read_text()  # the traceback went to the log


def _rank_pid(out: Path, rank: int) -> int | None:
    """The pid of `rank` of the run writing to `out` (its environment says so)."""
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            cmdline = (proc / "cmdline").read_bytes().split(b"\0")
            environ = (proc / "environ").read_bytes().split(b"\0")
        except OSError:
            continue
        if str(out).encode() in cmdline and f"RANK={rank}".encode() in environ and b"LOCAL_RANK" in b" ".join(environ):
            if any(e.startswith(b"BIGBATCH_STATUS_DIR=") for e in environ) and b"torch.distributed.run" not in cmdline:
                return int(proc.name)
    return None


@pytest.mark.timeout(1800)  # several real runs; each start-up takes long on 2 loaded cores
def test_a_stopped_rank_ends_the_run_with_one_line_exit_5_and_the_run_resumes_exactly(tmp_path):
    out = tmp_path / "cut"
    sets = _sets("train.steps=100000", "checkpoint.every=10", "dist.timeout_s=10")
    cmd = [sys.executable, "-m", "bigbatch", "train", MLP, "--nproc", "2", "--out", str(out), *sets]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 600
    while not list(out.glob("checkpoint-*.pt")) or len(read_jsonl(out / "metrics.jsonl")) < 25:
        assert proc.poll() is None and time.time() < deadline, proc.communicate()[1][-3000:]
        time.sleep(0.2)
    pid = _rank_pid(out, 1)
    assert pid is not None
    os.kill(pid, signal.SIGSTOP)
    try:
        _, err = proc.communicate(timeout=600)
    finally:
        with_pid_gone = not Path(f"/proc/{pid}").exists()
        if not with_pid_gone:
            os.kill(pid, signal.SIGKILL)
    assert proc.returncode == 5, err[-3000:]
    line = _one_line(err)
    assert line.startswith("bigbatch train: rank 0: collective failed in step "), err[-3000:]
    assert "a peer rank stopped answering within dist.timeout_s = 10 s" in line, line
    last = max(out.glob("checkpoint-*.pt"))
    assert f"resume from {last.name} with `bigbatch train --resume {out}`" in line, line
    assert sum("bigbatch train:" in l for l in err.splitlines()) == 1, err  # printed once, no torchrun dump
    assert "Timed out" in (out / "launcher.log").read_text() + (out / "train.log").read_text()
    failed_step = int(line.split("in step ")[1].split(":")[0])
    saved_step = int(last.stem.split("-")[1])
    assert saved_step < failed_step

    end = saved_step + 12
    p = bigbatch("train", "--resume", str(out), "--nproc", "2", "--set", f"train.steps={end}", timeout=600)
    assert p.returncode == 0, p.stderr[-3000:]
    whole = tmp_path / "whole"
    p = bigbatch("train", MLP, "--nproc", "2", "--out", str(whole),
                 *_sets(f"train.steps={end}", "checkpoint.every=10", "dist.timeout_s=10"), timeout=600)
    assert p.returncode == 0, p.stderr[-3000:]
    assert step_losses(out) == step_losses(whole)  # every step, exactly
    assert json.loads((out / "summary.json").read_text())["test_loss"] == json.loads((whole / "summary.json").read_text())["test_loss"]
