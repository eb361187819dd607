"""Which world a process is in: torchrun's variables, SLURM's only in an srun step launched as the
ranks of one run. The misfires that hung Ray sweeps and batch scripts: a Ray worker that inherited
SLURM_NTASKS / SLURM_PROCID from its srun step, and `bigbatch train` in a batch script with
--ntasks > 1 (refused with exit 2, saying why)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from bigbatch.distributed import env as dist_env

MLP = str(Path(__file__).resolve().parents[2] / "configs" / "mnist1d-mlp.toml")
WORLD_VARS = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "BIGBATCH_SRUN_RANKS")

# What SLURM (22.05, checked on tests/slurm/cluster.sh) puts into each kind of process.
BATCH_SCRIPT = {"SLURM_JOB_ID": "7", "SLURM_NTASKS": "2", "SLURM_PROCID": "0", "SLURM_LOCALID": "0",
                "SLURM_JOB_NODELIST": "n1", "SLURM_TASKS_PER_NODE": "2"}
RAY_WORKER_STEP = {"SLURM_JOB_ID": "7", "SLURM_NTASKS": "2", "SLURM_PROCID": "1", "SLURM_LOCALID": "0",
                   "SLURM_STEP_ID": "1", "SLURM_STEP_NUM_TASKS": "2", "SLURM_STEP_TASKS_PER_NODE": "1(x2)",
                   "SLURM_JOB_NODELIST": "n[1-3]"}


@pytest.fixture
def environ(monkeypatch):
    for k in list(os.environ):
        if k.startswith("SLURM_") or k in WORLD_VARS:
            monkeypatch.delenv(k)

    def set_(values: dict[str, str]) -> None:
        for k, v in values.items():
            monkeypatch.setenv(k, v)
    return set_


def test_a_ray_worker_started_by_srun_is_one_process(environ):
    environ(RAY_WORKER_STEP)  # SLURM_NTASKS=2, SLURM_PROCID=1: read as a world, it waited for rank 0 for ever
    assert dist_env.launcher_world() == (0, 1, 0, 1)
    assert dist_env.world_size_hint() == 1


def test_a_batch_script_with_two_tasks_is_one_process_and_train_refuses_it(environ):
    environ(BATCH_SCRIPT)
    assert dist_env.launcher_world() == (0, 1, 0, 1)
    why = dist_env.slurm_misfire()
    assert why and "SLURM_NTASKS=2" in why and "batch script" in why and "srun" in why


def test_an_srun_step_of_ranks_is_a_world(environ):
    environ({**RAY_WORKER_STEP, "BIGBATCH_SRUN_RANKS": "1"})
    assert dist_env.launcher_world() == (1, 2, 0, 1)
    assert dist_env.slurm_misfire() is None


def test_an_srun_step_without_the_marker_would_train_the_run_twice(environ):
    environ(RAY_WORKER_STEP)
    why = dist_env.slurm_misfire()
    assert why and "2 tasks" in why and "BIGBATCH_SRUN_RANKS=1" in why


def test_the_marker_outside_an_srun_step_is_not_a_world(environ):
    environ({**BATCH_SCRIPT, "BIGBATCH_SRUN_RANKS": "1"})  # inherited by the batch script: no step id
    assert dist_env.launcher_world() == (0, 1, 0, 1)


def test_torchrun_variables_win_over_slurm(environ):
    environ({**RAY_WORKER_STEP, "BIGBATCH_SRUN_RANKS": "1", "RANK": "3", "WORLD_SIZE": "4", "LOCAL_RANK": "1",
             "LOCAL_WORLD_SIZE": "2"})
    assert dist_env.launcher_world() == (3, 4, 1, 2)
    assert dist_env.slurm_misfire() is None


def test_one_task_jobs_are_fine(environ):
    environ({**BATCH_SCRIPT, "SLURM_NTASKS": "1"})
    assert dist_env.launcher_world() == (0, 1, 0, 1) and dist_env.slurm_misfire() is None


def test_bigbatch_train_in_a_two_task_batch_script_exits_2_saying_why(tmp_path):
    """As `sbatch --ntasks=2` running `bigbatch train` without srun (tests/slurm runs the real job)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("SLURM_") and k not in WORLD_VARS}
    p = subprocess.run([sys.executable, "-m", "bigbatch", "train", MLP, "--out", str(tmp_path / "run")],
                       env={**env, **BATCH_SCRIPT}, capture_output=True, text=True, timeout=120, cwd=tmp_path)
    err = p.stderr.strip()
    assert p.returncode == 2 and "\n" not in err and "SLURM_NTASKS=2" in err, err
    assert not (tmp_path / "run").exists()
