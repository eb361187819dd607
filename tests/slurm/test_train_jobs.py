"""Training jobs on the real local SLURM cluster (3 emulated nodes, tests/slurm/cluster.sh).

Four jobs of one config (a generated JPEG image folder read by 2 DataLoader workers per rank,
an MLP, global batch 16, constant lr), submitted together:
  (a) 1 node x 2 processes, uninterrupted: the reference;
  (b) 2 nodes x 1 process: srun starts a launcher on each node, c10d rendezvous on n1's NodeAddr;
  (c) as (a), its config file edited right after `submit`, then the early signal (USR2 to the
      batch script, as SLURM sends before a time limit) while training;
  (d) as (a), then `scancel --signal=TERM --full` while training: SIGTERM to every process of the
      job, batch script, launcher, torchrun, ranks and DataLoader workers alike.
(c) and (d) must checkpoint at the stop, requeue, resume and end with (a)'s losses; (b) must
reproduce (a)'s per-step losses. Then the exit codes: a 2-process job that diverges ends with 4,
one whose rank 1 hangs (SIGSTOP) with 5, and `bigbatch train` in a batch script with --ntasks=2
and no srun with 2, saying why.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from _slurm_helpers import cli, squeue_state, wait_gone

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "tests"))
from _images import jpeg_folder  # noqa: E402

MLP = ROOT / "configs" / "mnist1d-mlp.toml"
STEPS = 1500  # ~25 s a job on 2 idle vCPUs, so c and d are signalled mid-training: at 300 steps a busy machine
# delivered the early signal 3 s after c had finished, at 600 (~10 s) a loaded one at c's last step (the CLI
# and SLURM took > 10 s from c's first log row): no stop mid-training to see
STEPS_2NODE = 100
IMAGES = ["data.name='imagefolder'", "data.image_size=16", "data.augment=false", "data.num_workers=2",
          "data.train_eval_samples=0", "model.hidden=32", "batch.global_batch=16", "schedule.name='constant'",
          "train.eval_every=0", "train.log_every=10", "train.amp='off'", "track.progress='off'",
          "checkpoint.stop_within_s=1.0"]
TWO_PROCS = ["--procs-per-node", "2", "--cpus-per-task", "2"]  # the nodes have 2 CPUs each
pytestmark = pytest.mark.timeout(900)  # the first test waits for 4 jobs and 2 requeues (85-300 s on 2 busy cores)


def submit(name: str, config: Path, sets: list[str], job_args: list[str], env, cwd: Path) -> str:
    proc = cli("slurm", "submit", str(config), *[a for o in sets for a in ("--set", o)], "--out", str(cwd / name),
               "--job-name", name, "--python", sys.executable, *job_args, env=env, cwd=cwd)
    assert proc.returncode == 0, proc.stderr
    return proc.stdout.strip()


def rows(run_dir: Path) -> list[dict]:
    return [json.loads(l) for l in (run_dir / "metrics.jsonl").read_text().splitlines() if l.strip()]


def log_of(cwd: Path, name: str, job_id: str) -> str:
    return (cwd / "slurm-logs" / f"{name}-{job_id}.out").read_text()


def wait_training(cwd: Path, name: str, job_id: str, env, min_rows: int = 1) -> None:
    metrics = cwd / name / "metrics.jsonl"
    deadline = time.monotonic() + 240
    while not (metrics.exists() and len(metrics.read_text().splitlines()) >= min_rows):
        assert time.monotonic() < deadline and squeue_state(job_id, env), f"job {name} never trained"
        time.sleep(0.05)


def wait_requeued(cwd: Path, name: str, job_id: str, env) -> None:
    # The requeued job is held until the requeue revoked its credential (AuthInfo=cred_expire=10 in
    # cluster.sh): it must not be started earlier (`scontrol update StartTime=now` did, and slurmctld
    # killed it about half the time: "Killing non-startable batch JobId=..: Job credential revoked").
    # So wait for the requeue to show, then let SLURM start the job itself (~10-15 s later).
    deadline = time.monotonic() + 120
    while squeue_state(job_id, env) != "PENDING" and "restart 1 " not in log_of(cwd, name, job_id):
        assert time.monotonic() < deadline, f"job {name} was not requeued:\n" + log_of(cwd, name, job_id)
        time.sleep(0.2)


def exit_code(job_id: str, env) -> str:
    """ExitCode=rc:signal of a finished job (slurmctld keeps it MinJobAge = 300 s)."""
    out = subprocess.run(["scontrol", "show", "job", "-o", job_id], env=env, capture_output=True, text=True).stdout
    return re.search(r"ExitCode=(\S+)", out).group(1)


@pytest.fixture(scope="module")
def jobs(slurm_env, tmp_path_factory):
    cwd = tmp_path_factory.mktemp("slurm-train")
    images = [f"data.root='{jpeg_folder(cwd / 'images', {'a': 40, 'b': 40})}'", *IMAGES]
    edited = cwd / "c.toml"  # (c)'s own copy of the config, edited once the job is queued
    edited.write_text(MLP.read_text())
    ids = {
        "a": submit("a", MLP, images + [f"train.steps={STEPS}"], TWO_PROCS, slurm_env, cwd),
        "c": submit("c", edited, images + [f"train.steps={STEPS}"], TWO_PROCS, slurm_env, cwd),
        "d": submit("d", MLP, images + [f"train.steps={STEPS}"], TWO_PROCS, slurm_env, cwd),
        "b": submit("b", MLP, images + [f"train.steps={STEPS_2NODE}"],
                    ["--nodes", "2", "--procs-per-node", "1", "--cpus-per-task", "2"], slurm_env, cwd),
    }
    edited.write_text(MLP.read_text().replace("[model]", "[model]\nhidden = 7"))  # the queued job must not see it
    status = cli("slurm", "status", ids["a"], "--json", env=slurm_env, cwd=cwd)

    wait_training(cwd, "c", ids["c"], slurm_env)
    signalled = cli("slurm", "cancel", ids["c"], "--signal", "USR2", env=slurm_env, cwd=cwd)  # like --signal=B:USR2@90
    assert signalled.returncode == 0, signalled.stderr
    wait_training(cwd, "d", ids["d"], slurm_env)
    term = subprocess.run(["scancel", "--signal=TERM", "--full", ids["d"]], env=slurm_env, capture_output=True, text=True)
    assert term.returncode == 0, term.stderr
    wait_requeued(cwd, "c", ids["c"], slurm_env)
    wait_requeued(cwd, "d", ids["d"], slurm_env)
    wait_gone(list(ids.values()), slurm_env, timeout_s=400)
    return cwd, ids, status


def assert_matches_reference(cwd: Path, name: str, steps: int) -> None:
    a = json.loads((cwd / "a" / "summary.json").read_text())
    x = json.loads((cwd / name / "summary.json").read_text())
    assert x["status"] == "completed" and x["steps"] == steps and x["examples"] == steps * 16, x
    for key in ("train_loss", "test_loss", "test_acc", "train_acc"):
        assert x[key] == pytest.approx(a[key], rel=1e-6, abs=1e-7), key
    ref = {r["step"]: r["loss"] for r in rows(cwd / "a") if "loss" in r}
    got = {r["step"]: r["loss"] for r in rows(cwd / name) if "loss" in r}
    assert sorted(got) == list(range(10, steps + 1, 10))
    for step, loss in got.items():
        assert loss == pytest.approx(ref[step], rel=1e-6, abs=1e-7), step


def test_a_one_node_two_process_image_folder_job_completes(jobs, slurm_env):
    cwd, ids, status = jobs
    assert status.returncode == 0 and json.loads(status.stdout.splitlines()[0])["state"] in (
        "PENDING", "CONFIGURING", "RUNNING", "COMPLETING"), status.stdout
    summary = json.loads((cwd / "a" / "summary.json").read_text())
    assert summary["status"] == "completed" and summary["world_size"] == 2 and summary["global_batch"] == 16
    assert summary["steps"] == STEPS and 0 <= summary["test_acc"] <= 1.0
    log = log_of(cwd, "a", ids["a"])
    assert "1 node(s) x 2 process(es) in the batch step" in log and "training exited with code 0" in log
    assert exit_code(ids["a"], slurm_env) == "0:0"
    assert json.loads(cli("slurm", "status", ids["a"], "--json", env=slurm_env, cwd=cwd).stdout)["state"] == "NOT_IN_QUEUE"


def test_b_two_node_job_runs_a_launcher_on_each_node_and_matches(jobs):
    cwd, ids, _ = jobs
    log = log_of(cwd, "b", ids["b"])
    assert "node n1 (node index 0) starts" in log or "node n2 (node index 0) starts" in log, log
    assert "(node index 1) starts" in log and "--nnodes 2" in log, log
    assert "2 node(s) x 1 process(es), rendezvous 127.0.0.1:" in log  # the NodeAddr: the name does not resolve
    summary = json.loads((cwd / "b" / "summary.json").read_text())
    assert summary["world_size"] == 2
    assert_matches_reference_steps(cwd, "b", STEPS_2NODE)


def assert_matches_reference_steps(cwd: Path, name: str, steps: int) -> None:
    """2 nodes x 1 process is the same computation as 1 node x 2 processes: per-step losses."""
    ref = {r["step"]: r["loss"] for r in rows(cwd / "a") if "loss" in r}
    got = {r["step"]: r["loss"] for r in rows(cwd / name) if "loss" in r}
    assert sorted(got) == list(range(10, steps + 1, 10))
    for step, loss in got.items():
        assert loss == pytest.approx(ref[step], rel=1e-6, abs=1e-7), step


def _stopped_and_resumed(log: str) -> int:
    stopped = re.search(r"stop signal \d+: checkpointed at step (\d+)", log)
    resumed = re.search(r"resumed from .*checkpoint(-\d+)?\.pt at step (\d+)", log)
    assert stopped and resumed and stopped.group(1) == resumed.group(2), log
    assert "requeueing job" in log and "restart 1 " in log and "DataLoader worker" not in log, log
    return int(resumed.group(2))


def test_c_early_signal_checkpoints_requeues_and_trains_the_config_as_submitted(jobs, slurm_env):
    cwd, ids, _ = jobs
    log = log_of(cwd, "c", ids["c"])
    assert "SIGUSR2" in log, log
    assert 0 < _stopped_and_resumed(log) < STEPS
    assert "hidden = 32" in (cwd / "c" / "submitted-config.toml").read_text()  # not the edited file's 7
    assert_matches_reference(cwd, "c", STEPS)
    assert exit_code(ids["c"], slurm_env) == "0:0"


def test_d_sigterm_to_every_process_checkpoints_requeues_and_matches(jobs, slurm_env):
    cwd, ids, _ = jobs
    log = log_of(cwd, "d", ids["d"])
    assert "SIGTERM" in log, log
    assert 0 < _stopped_and_resumed(log) < STEPS
    assert_matches_reference(cwd, "d", STEPS)
    assert exit_code(ids["d"], slurm_env) == "0:0"


# --- exit codes ------------------------------------------------------------------------------

DIGITS = ["data.name='digits'", "model.hidden=32", "batch.global_batch=64", "schedule.name='constant'",
          "train.eval_every=0", "train.log_every=5", "train.amp='off'", "track.progress='off'"]


def _rank_pid(run_dir: Path, rank: int) -> int | None:
    """The pid of `rank` of the run writing to run_dir (its command line and environment say so)."""
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            cmdline = (proc / "cmdline").read_bytes().split(b"\0")
            environ = (proc / "environ").read_bytes().split(b"\0")
        except OSError:
            continue
        if (str(run_dir).encode() in cmdline and f"RANK={rank}".encode() in environ
                and b"torch.distributed.run" not in cmdline and any(e.startswith(b"LOCAL_RANK=") for e in environ)):
            return int(proc.name)
    return None


def test_exit_codes_survive_the_launchers(slurm_env, tmp_path):
    """Diverged: 4; a hung peer: 5 (not torchrun's 1); `bigbatch train` in a --ntasks=2 batch script
    without srun: 2 and the reason, before anything is written."""
    ids = {
        "div": submit("div", MLP, DIGITS + ["train.steps=200", "optim.base_lr=1e6"], TWO_PROCS, slurm_env, tmp_path),
        "hang": submit("hang", MLP, DIGITS + ["train.steps=100000", "checkpoint.every=10", "dist.timeout_s=10"],
                       TWO_PROCS, slurm_env, tmp_path),
    }
    script = tmp_path / "ntasks2.sbatch"
    script.write_text(f"#!/bin/bash\n#SBATCH --nodes=1 --ntasks=2 --output={tmp_path}/ntasks2-%j.out\n"
                      f"{sys.executable} -m bigbatch train {MLP} --out {tmp_path}/ntasks2\necho \"rc=$?\"\n")
    batch = subprocess.run(["sbatch", "--parsable", str(script)], env=slurm_env, capture_output=True, text=True)
    assert batch.returncode == 0, batch.stderr
    ids["ntasks2"] = batch.stdout.strip()

    wait_training(tmp_path, "hang", ids["hang"], slurm_env, min_rows=3)
    pid = _rank_pid(tmp_path / "hang", 1)
    assert pid is not None
    os.kill(pid, signal.SIGSTOP)
    wait_gone(list(ids.values()), slurm_env, timeout_s=300)

    assert "training exited with code 4" in log_of(tmp_path, "div", ids["div"])
    assert exit_code(ids["div"], slurm_env) == "4:0"
    assert json.loads((tmp_path / "div" / "summary.json").read_text())["status"] == "diverged"
    hang = log_of(tmp_path, "hang", ids["hang"])
    assert "training exited with code 5" in hang and "a peer rank stopped answering" in hang, hang
    assert exit_code(ids["hang"], slurm_env) == "5:0"
    out = (tmp_path / f"ntasks2-{ids['ntasks2']}.out").read_text()
    assert "rc=2" in out and "SLURM_NTASKS=2" in out and "batch script" in out, out
    assert not (tmp_path / "ntasks2").exists()


def test_unknown_partition_reported_by_sbatch_is_exit_2(slurm_env, tmp_path):
    proc = cli("slurm", "submit", str(MLP), "--partition", "nosuchpartition", env=slurm_env, cwd=tmp_path)
    err = proc.stderr.strip()
    assert proc.returncode == 2 and "\n" not in err and "Traceback" not in err, err
    assert "--partition:" in err and "invalid partition" in err.lower(), err
