"""Helpers for the SLURM integration tests: poll the queue, run the CLI."""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path


def cli(*args: str, env: dict[str, str], cwd: Path) -> subprocess.CompletedProcess:
    """`python -m bigbatch ARGS` with the cluster's environment."""
    return subprocess.run([sys.executable, "-m", "bigbatch", *args], env=env, cwd=cwd, capture_output=True,
                          text=True, timeout=120)


def squeue_state(job_id: str, env: dict[str, str]) -> str | None:
    """The job's state, or None once it has left the queue."""
    proc = subprocess.run(["squeue", "-h", "-j", job_id, "-o", "%T"], env=env, capture_output=True, text=True, timeout=30)
    states = proc.stdout.split()
    return states[0] if proc.returncode == 0 and states else None


def wait_gone(job_ids: list[str], env: dict[str, str], timeout_s: float = 240) -> None:
    """Poll squeue until every job (and its array tasks) has left the queue (sbatch --wait polls slowly)."""
    deadline = time.monotonic() + timeout_s
    while any(squeue_state(j, env) for j in job_ids):
        if time.monotonic() > deadline:
            raise AssertionError(f"jobs {job_ids} still queued after {timeout_s} s: "
                                 + subprocess.run(["squeue"], env=env, capture_output=True, text=True).stdout)
        time.sleep(1)
