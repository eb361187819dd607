"""Stopping on a signal: SIGTERM / SIGUSR2 (SLURM preemption, time limits, torchrun shutdown)
set a flag; the loop checkpoints at the next step boundary where all ranks agree, so no rank
leaves a collective the others are in."""

from __future__ import annotations

import signal
from typing import Any

import torch
import torch.distributed as dist

from bigbatch.distributed.env import DistEnv

SIGNAL_CHECK_EVERY = 10  # steps between cross-rank agreement on a pending stop signal (world > 1)


class StopFlag:
    """Set by SIGTERM / SIGUSR2 (SLURM preemption, time limits, torchrun shutdown).

    The handler only sets a flag; the loop checkpoints at the next step boundary where all ranks
    agree, so no rank leaves a collective the others are in.
    """

    def __init__(self) -> None:
        self.signum: int | None = None
        self._old: dict[int, Any] = {}

    def __enter__(self) -> "StopFlag":
        for s in (signal.SIGTERM, signal.SIGUSR2):
            try:
                self._old[s] = signal.signal(s, self._handle)
            except ValueError:  # not the main thread (e.g. inside some Ray workers)
                pass
        return self

    def _handle(self, signum, frame) -> None:
        self.signum = signum

    def __exit__(self, *exc) -> None:
        for s, h in self._old.items():
            signal.signal(s, h)


def stop_requested(stop: StopFlag, step: int, env: DistEnv, ruled: bool = False) -> tuple[bool, bool]:
    """(a stop signal, a stop rule's verdict) on any rank; ranks agree every SIGNAL_CHECK_EVERY steps
    (one all-reduce of both), so every rank stops at the same step."""
    if not env.initialized:
        return stop.signum is not None, ruled
    if step % SIGNAL_CHECK_EVERY:
        return False, False
    flags = torch.tensor([1.0 if stop.signum is not None else 0.0, 1.0 if ruled else 0.0], dtype=torch.float64,
                         device=env.device)
    dist.all_reduce(flags)
    signalled, ruled = flags.tolist()
    return signalled > 0, ruled > 0
