"""Helpers for tests: run the CLI, read metrics, spawn real gloo ranks."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any, Callable

from bigbatch.distributed.env import free_port  # noqa: F401  (tests import it from here)

ROOT = Path(__file__).resolve().parents[1]


def bigbatch(*args: str, cwd: str | Path | None = None, env: dict | None = None, timeout: float = 240) -> subprocess.CompletedProcess:
    """Run `python -m bigbatch ARGS` and capture its output."""
    e = dict(os.environ)
    e.update(env or {})
    return subprocess.run([sys.executable, "-m", "bigbatch", *args], cwd=cwd, env=e, capture_output=True, text=True, timeout=timeout)


def one_line_error(capsys, argv: list[str], expect: str) -> str:
    """Run `bigbatch ARGV` in-process; assert exit 2 with one line on stderr that contains `expect`."""
    from bigbatch.cli import main

    rc = main(argv)
    err = capsys.readouterr().err.strip()
    assert rc == 2, err
    assert "\n" not in err and "Traceback" not in err, err
    assert expect in err, err
    return err


def read_jsonl(path: str | Path) -> list[dict[str, Any]]:
    return [json.loads(l) for l in Path(path).read_text().splitlines() if l.strip()]


def step_losses(run_dir: str | Path) -> dict[int, float]:
    """step -> training loss from a run's metrics.jsonl (rows that carry a loss)."""
    return {r["step"]: r["loss"] for r in read_jsonl(Path(run_dir) / "metrics.jsonl") if "loss" in r}


def _worker(rank: int, world: int, port: int, fn: Callable, args: tuple, out: Any) -> None:
    import torch
    import torch.distributed as dist

    torch.set_num_threads(1)
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank), LOCAL_WORLD_SIZE=str(world),
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    try:
        result = fn(rank, world, *args)
        out.put((rank, result))
    finally:
        dist.destroy_process_group()


def spawn(fn: Callable, world: int, *args: Any) -> list[Any]:
    """Run fn(rank, world, *args) on `world` real gloo ranks; returns the results by rank.

    fn must be importable (module level). A failure on any rank raises in the caller.
    """
    import torch.multiprocessing as mp

    ctx = mp.get_context("spawn")
    out = ctx.SimpleQueue()
    mp.start_processes(_worker, args=(world, free_port(), fn, args, out), nprocs=world, join=True, start_method="spawn")
    results: dict[int, Any] = {}
    while not out.empty():
        rank, res = out.get()
        results[rank] = res
    return [results[r] for r in range(world)]


def preempt_at(step: int) -> Callable[[dict[str, Any]], None]:
    """A `run(..., reporter=)` callback that sends this process SIGTERM at `step` (what SLURM and
    torchrun send): the loop checkpoints and returns status "preempted"."""
    import signal

    def reporter(row: dict[str, Any]) -> None:
        if row.get("step") == step and "loss" in row:
            os.kill(os.getpid(), signal.SIGTERM)

    return reporter


def assert_same_run(cut: str | Path, whole: str | Path) -> None:
    """A resumed run folder equals an uninterrupted one: every step's loss and the final weights."""
    import torch

    assert step_losses(cut) == step_losses(whole)
    a = torch.load(Path(cut) / "checkpoint.pt", weights_only=True)["model"]
    b = torch.load(Path(whole) / "checkpoint.pt", weights_only=True)["model"]
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
