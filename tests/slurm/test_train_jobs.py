"""Training jobs on the real local SLURM cluster (2 emulated nodes, tests/slurm/cluster.sh).

Three jobs of one tiny config (digits, MLP, global batch 64, constant lr), submitted together:
  (a) 1 node x 2 processes, uninterrupted: the reference;
  (b) 2 nodes x 1 process: torchrun on both nodes, c10d rendezvous on n1's NodeAddr;
  (c) as (a), but signalled (USR2 to the batch script, as SLURM does before a time limit) while
      training: it checkpoints, requeues itself and resumes.
The same world size, batch and seed give the same computation, so (b) and (c) must reproduce
(a)'s losses.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest

from _slurm_helpers import cli, squeue_state, wait_gone

ROOT = Path(__file__).resolve().parents[2]
MLP = str(ROOT / "configs" / "mnist1d-mlp.toml")
STEPS = 1200  # long enough (~2.5 s on 2 vCPUs) that job c is signalled mid-training
STEPS_2NODE = 200
TINY = ["data.name='digits'", "model.hidden=64", "batch.global_batch=64", "schedule.name='constant'",
        "train.eval_every=0", "train.log_every=10", "train.amp='off'", "track.progress='off'"]


def submit(name: str, steps: int, job_args: list[str], env, cwd: Path) -> str:
    sets = [a for o in TINY + [f"train.steps={steps}"] for a in ("--set", o)]
    proc = cli("slurm", "submit", MLP, *sets, "--out", str(cwd / name), "--job-name", name,
               "--python", sys.executable, *job_args, env=env, cwd=cwd)
    assert proc.returncode == 0, proc.stderr
    return proc.stdout.strip()


def rows(run_dir: Path) -> list[dict]:
    return [json.loads(l) for l in (run_dir / "metrics.jsonl").read_text().splitlines() if l.strip()]


def log_of(cwd: Path, name: str, job_id: str) -> str:
    return (cwd / "slurm-logs" / f"{name}-{job_id}.out").read_text()


@pytest.fixture(scope="module")
def jobs(slurm_env, tmp_path_factory):
    cwd = tmp_path_factory.mktemp("slurm-train")
    ids = {
        "a": submit("a", STEPS, ["--procs-per-node", "2"], slurm_env, cwd),
        "b": submit("b", STEPS_2NODE, ["--nodes", "2", "--procs-per-node", "1"], slurm_env, cwd),
        "c": submit("c", STEPS, ["--procs-per-node", "2"], slurm_env, cwd),
    }
    status = cli("slurm", "status", ids["a"], "--json", env=slurm_env, cwd=cwd)
    # (c): preempt once training runs: USR2 to the batch script, like --signal=B:USR2@90.
    metrics = cwd / "c" / "metrics.jsonl"
    deadline = time.monotonic() + 180
    while not (metrics.exists() and metrics.read_text().strip()):
        assert time.monotonic() < deadline and squeue_state(ids["c"], slurm_env), "job c never started training"
        time.sleep(0.05)
    signalled = cli("slurm", "cancel", ids["c"], "--signal", "USR2", env=slurm_env, cwd=cwd)
    assert signalled.returncode == 0, signalled.stderr
    # The requeued job is held until the requeue revoked its credential (AuthInfo=cred_expire=10 in
    # cluster.sh): it must not be started earlier (`scontrol update StartTime=now` did, and slurmctld
    # killed it about half the time: "Killing non-startable batch JobId=..: Job credential revoked").
    # So wait for the requeue to show, then let SLURM start the job itself (~10-15 s later).
    deadline = time.monotonic() + 120
    while squeue_state(ids["c"], slurm_env) != "PENDING" and "restart 1 " not in log_of(cwd, "c", ids["c"]):
        assert time.monotonic() < deadline, "job c was not requeued:\n" + log_of(cwd, "c", ids["c"])
        time.sleep(0.2)
    wait_gone(list(ids.values()), slurm_env)
    return cwd, ids, status


def test_a_one_node_two_process_job_completes_with_right_summary(jobs, slurm_env):
    cwd, ids, status = jobs
    assert status.returncode == 0 and json.loads(status.stdout.splitlines()[0])["state"] in (
        "PENDING", "CONFIGURING", "RUNNING", "COMPLETING"), status.stdout
    summary = json.loads((cwd / "a" / "summary.json").read_text())
    assert summary["status"] == "completed" and summary["world_size"] == 2 and summary["global_batch"] == 64
    assert summary["steps"] == STEPS and summary["examples"] == STEPS * 64
    assert 0.5 < summary["test_acc"] <= 1.0 and 0 < summary["test_loss"] < 1.0  # digits is learnt
    r = rows(cwd / "a")
    assert [x["step"] for x in r if "loss" in x][-1] == STEPS
    log = log_of(cwd, "a", ids["a"])
    assert "1 node(s) x 2 process(es)" in log and "training exited with code 0" in log
    gone = cli("slurm", "status", ids["a"], "--json", env=slurm_env, cwd=cwd)
    assert json.loads(gone.stdout)["state"] == "NOT_IN_QUEUE"


def test_b_two_node_job_runs_torchrun_on_both_nodes(jobs):
    cwd, ids, _ = jobs
    log = log_of(cwd, "b", ids["b"])
    assert "node n1 (node index 0) starts" in log and "node n2 (node index 1) starts" in log, log
    assert "torch.distributed.run" in log  # one torchrun agent per node
    assert "2 node(s) x 1 process(es), rendezvous 127.0.0.1:" in log  # n1's NodeAddr: the name does not resolve
    summary = json.loads((cwd / "b" / "summary.json").read_text())
    assert summary["status"] == "completed" and summary["world_size"] == 2 and summary["steps"] == STEPS_2NODE
    # 2 nodes x 1 process is the same computation as 1 node x 2 processes.
    a = {x["step"]: x["loss"] for x in rows(cwd / "a") if "loss" in x}
    b = {x["step"]: x["loss"] for x in rows(cwd / "b") if "loss" in x}
    assert sorted(b) == list(range(10, STEPS_2NODE + 1, 10))
    for step, loss in b.items():
        assert loss == pytest.approx(a[step], rel=1e-6, abs=1e-7), step


def test_c_signalled_job_checkpoints_requeues_resumes_and_matches(jobs):
    cwd, ids, _ = jobs
    log = log_of(cwd, "c", ids["c"])
    assert "SIGUSR2" in log and "requeueing job" in log, log
    assert f"job {ids['c']} restart 1 " in log, log
    resumed = re.search(r"resumed from .*checkpoint(-\d+)?\.pt at step (\d+)", log)  # checkpoint-<step>.pt: keep-k files
    assert resumed and 0 < int(resumed.group(2)) < STEPS, log
    a = json.loads((cwd / "a" / "summary.json").read_text())
    c = json.loads((cwd / "c" / "summary.json").read_text())
    assert c["status"] == "completed" and c["steps"] == STEPS and c["examples"] == STEPS * 64
    for key in ("train_loss", "test_loss", "test_acc", "train_acc"):
        assert c[key] == pytest.approx(a[key], rel=1e-6, abs=1e-7), key
    last = lambda d: [x["loss"] for x in rows(cwd / d) if x.get("step") == STEPS and "loss" in x][-1]  # noqa: E731
    assert last("c") == pytest.approx(last("a"), rel=1e-6, abs=1e-7)


def test_unknown_partition_reported_by_sbatch_is_exit_2(slurm_env, tmp_path):
    proc = cli("slurm", "submit", MLP, "--partition", "nosuchpartition", env=slurm_env, cwd=tmp_path)
    err = proc.stderr.strip()
    assert proc.returncode == 2 and "\n" not in err and "Traceback" not in err, err
    assert "--partition:" in err and "invalid partition" in err.lower(), err
