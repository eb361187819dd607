"""When a run stops before its last step, and with which status: the one place the loop asks.

    diverged         a log row's training loss is not finite (the all-reduced mean: every rank sees it)
    target_reached   the evaluator met the target and [train] stop_at_target is set
    preempted        SIGTERM / SIGUSR2 (`bigbatch.trainer.stop`): checkpointed, to be resumed; agreed
                     within [checkpoint] stop_within_s, also in the middle of an evaluation
    <a rule's>       a caller's stop rule said so (a sweep's racing: "slower"), with its details

A stop signal may reach one rank only and a rule is read on rank 0 (it may look at files other
processes write), so both are agreed across ranks at the same steps (`StopCheck`, its cadence set
from the agreed step time) before the run stops, and the rule's details are rank 0's; the others
are the same on every rank already. Every outcome ends the run through its
summary (status, `stopped_by`): nothing is raised through the caller.
"""

from __future__ import annotations

import logging
import math
from typing import Any, Callable

from bigbatch.distributed import env as dist_env
from bigbatch.distributed.env import DistEnv
from bigbatch.trainer.stop import StopCheck

log = logging.getLogger("bigbatch")

Rule = Callable[[dict[str, Any]], "dict[str, Any] | None"]


class Stopper:
    def __init__(self, env: DistEnv, rule: Rule | None = None, *, stop_at_target: bool = False,
                 within_s: float = 10.0):
        self.env, self.rule, self.stop_at_target = env, rule, stop_at_target
        self.check = StopCheck(env, within_s)
        self.verdict: dict[str, Any] | None = None  # a rule's, on this rank, until the ranks agree
        self.detail: dict[str, Any] | None = None  # the rule's details once it stopped the run

    def __enter__(self) -> "Stopper":
        self.check.__enter__()
        return self

    def __exit__(self, *exc) -> None:
        self.check.__exit__(*exc)

    def after_row(self, row: dict[str, Any], p) -> str | None:
        """Every metrics row (log rows and evaluations) passes here."""
        loss = row.get("loss")
        if loss is not None and not math.isfinite(loss):
            log.error("training loss is %s at step %d: stopped (lr %.4g); the last checkpoint is kept",
                      loss, p.step, row.get("lr", float("nan")))
            return "diverged"
        if self.rule is not None and self.verdict is None and self.env.is_main:
            self.verdict = self.rule(row)
            if self.verdict is not None and not self.env.initialized:
                return self._ruled()
        return None

    def target_reached(self) -> str | None:
        return "target_reached" if self.stop_at_target else None

    def after_step(self, p) -> str | None:
        """A stop signal or a rule's verdict, once every rank agrees on it (at the same step)."""
        if self.check.requested(p.step, self.verdict is not None):
            return "preempted"
        return self._ruled() if self.check.ruled else None

    def interrupted(self) -> str:
        """The status of a run whose evaluation the ranks agreed to abandon (a stop signal)."""
        return "preempted"

    def _ruled(self) -> str:
        verdict = self.verdict if not self.env.initialized else dist_env.broadcast_object(self.verdict)
        self.detail = dict(verdict)
        return str(self.detail["status"])
