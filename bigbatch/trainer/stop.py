"""Stopping on a signal, agreed across ranks within a bounded time.

SIGTERM and SIGUSR2 (SLURM preemption, time limits, torchrun shutdown) only record that a stop
was asked for (`install`, as early as `bigbatch train` starts, so a signal during start-up is
not lost). The ranks then agree to stop at the same step, by an all-reduce of the flag, and the
loop checkpoints there, so no rank leaves a collective the others are in. DataLoader workers
ignore these signals (`bigbatch.trainer.data`): the main process owns them, and SLURM signals
every process of a step.

When to agree. The check costs one all-reduce; its cadence must be the same on every rank (a
rank that checks alone waits for ever), so it cannot come from each rank's own clock. Each check
also all-reduces (max over ranks) the seconds per step since the previous check, and every rank
derives the next check from that one agreed number: the steps that fit in `within_s` seconds
(`checkpoint.stop_within_s`), growing at most 2x per check so a slow-down is caught within a
check. A stop is therefore agreed within about `within_s` of the signal as long as a step does
not suddenly take several times longer; keep `within_s` plus a checkpoint write below torchrun's
30 s grace after SIGTERM and SLURM's KillWait / GraceTime. Evaluation is checked the same way per
evaluation batch (`during_evaluation`), so a long evaluation does not hold the stop back.
"""

from __future__ import annotations

import math
import signal
import time
from typing import Any

import torch
import torch.distributed as dist

from bigbatch.distributed.env import DistEnv
from bigbatch.trainer.data import STOP_SIGNALS

_received: list[int] = []  # the stop signals this process received (newest last)
_before: dict[int, Any] = {}  # signal -> the handler that install() replaced


def _handle(signum, frame) -> None:
    _received.append(signum)


def install() -> bool:
    """Record SIGTERM / SIGUSR2 from now on (main thread only); False where signals cannot be
    set (another thread, e.g. inside some Ray workers). Idempotent. What counts is the handler
    in place now, not an earlier call: a library (Ray, a test harness) may have set its own
    handler since, and a SIGTERM to it would kill the process instead of stopping the loop."""
    for s in STOP_SIGNALS:
        if signal.getsignal(s) is _handle:
            continue
        try:
            _before[s] = signal.signal(s, _handle)
        except ValueError:  # not the main thread
            return False
    return True


def uninstall() -> None:
    """Restore the handlers that `install` replaced and forget received signals."""
    for s, h in _before.items():
        if signal.getsignal(s) is _handle:
            signal.signal(s, h)
    _before.clear()
    _received.clear()


def forget() -> None:
    """Forget received signals (the handlers stay)."""
    _received.clear()


def received() -> int | None:
    """The last stop signal this process got, or None."""
    return _received[-1] if _received else None


class Cadence:
    """Every rank's next check, from the agreed (max over ranks) seconds per unit of work."""

    def __init__(self, within_s: float):
        self.within_s = within_s
        self.next = 0  # the first call checks
        self.every = 1
        self._last_t: float | None = None
        self._last_n = 0

    def restart(self) -> None:
        """A new count from 0 (the next evaluation): first check after the interval learnt so far."""
        self.next, self._last_t, self._last_n = self.every, time.monotonic(), 0

    def due(self, n: int) -> bool:
        return n >= self.next

    def local_rate(self, n: int) -> float:
        """This rank's seconds per unit since the previous check (-1 before the first)."""
        now = time.monotonic()
        rate = -1.0 if self._last_t is None or n <= self._last_n else (now - self._last_t) / (n - self._last_n)
        self._last_t, self._last_n = now, n
        return rate

    def schedule(self, n: int, agreed_rate: float) -> None:
        """The next check from the agreed seconds per unit: as many units as fit in within_s,
        at most twice the previous interval, at least one."""
        fit = math.floor(self.within_s / agreed_rate) if agreed_rate > 0 else 1
        self.every = max(1, min(fit, 2 * self.every))
        self.next = n + self.every


class StopCheck:
    """Whether the ranks agreed to stop. Use as a context manager around training (it installs
    the handlers if `bigbatch train` has not); every rank calls `requested(step)` once per step at
    the step boundary and `during_evaluation(i)` after each evaluation batch i that every rank has."""

    def __init__(self, env: DistEnv, within_s: float = 10.0):
        self.env = env
        self.agreed = False
        self.ruled = False  # a stop rule's verdict, agreed by the ranks
        self.signum: int | None = None
        self._train = Cadence(within_s)
        self._eval = Cadence(within_s)
        self._installed_here = False
        self._found: dict[int, Any] = {}

    def __enter__(self) -> "StopCheck":
        self._found = {s: signal.getsignal(s) for s in STOP_SIGNALS}
        self._installed_here = install()
        return self

    def __exit__(self, *exc) -> None:
        # the run is over: the signals it got are spent (a later run in this process, e.g. its
        # resume, must not see them); the handlers go back to what they were on entry (those
        # of `bigbatch train` itself stay)
        if self._installed_here:
            for s, h in self._found.items():
                if h is not None and h is not _handle:
                    signal.signal(s, h)
        forget()

    def _agree(self, cadence: Cadence, n: int, ruled: bool = False) -> bool:
        """One all-reduce (max) of [stop asked here, a stop rule's verdict here, seconds per unit
        here]; schedules the next check. A rule's verdict agreed sets `ruled`."""
        t = torch.tensor([1.0 if received() is not None else 0.0, 1.0 if ruled else 0.0, cadence.local_rate(n)],
                         dtype=torch.float64)
        if self.env.device.type == "cuda":
            t = t.to(self.env.device)
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
        asked, any_ruled, rate = t.tolist()
        cadence.schedule(n, rate)
        self.ruled = self.ruled or any_ruled > 0
        if asked > 0:
            self.agreed, self.signum = True, received() or signal.SIGTERM
        return self.agreed

    def requested(self, step: int, ruled: bool = False) -> bool:
        """True when the ranks agreed to stop after `step` on a signal (at the same step on every
        rank). `ruled`: this rank's stop rule wants the run to end; once the ranks agree on that
        (at a check, like a signal), `self.ruled` is set on every rank."""
        if self.agreed:
            return True
        if not self.env.initialized:
            self.signum = received()
            self.agreed = self.signum is not None
            self.ruled = self.ruled or ruled
            return self.agreed
        return self._train.due(step) and self._agree(self._train, step, ruled)

    def during_evaluation(self, batches: int) -> bool:
        """After `batches` evaluation batches (counted over the evaluation, every rank alike):
        True when the ranks agreed to stop; the evaluation is then abandoned on every rank."""
        if not self.env.initialized:
            return self.requested(0)
        if batches == 1:
            self._eval.restart()
        return self._eval.due(batches) and self._agree(self._eval, batches)
