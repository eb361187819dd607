"""The evaluator: when a run evaluates ([train] eval_every, eval_fine near the target, the last
step), what (`bigbatch.trainer.evaluate`: test and training-subset loss and accuracy, every rank on
its shard), and the target ([target]): the step and examples at which it was first met.

With data.eval_subset the evaluations while training use the first N examples and the run's last
evaluation the full sets, so the summary holds full-set numbers. A stop signal the ranks agree on
during an evaluation abandons it (`bigbatch.trainer.stop.StopCheck.during_evaluation`): the run
checkpoints with the evaluation pending, and the resumed run does it first, before any step.
"""

from __future__ import annotations

import math
from typing import Any

from bigbatch.config import DataConfig, TargetConfig, TrainConfig
from bigbatch.distributed.env import DistEnv
from bigbatch.trainer.data import DataBundle
from bigbatch.trainer.evaluate import evaluate, reached_target
from bigbatch.trainer.probes import Probes
from bigbatch.trainer.stopper import Stopper


class Evaluator:
    def __init__(self, target: TargetConfig, train: TrainConfig, data: DataConfig, env: DistEnv, model, bundle: DataBundle,
                 tracker, probes: Probes, stopper: Stopper):
        self.target, self.every = target, train.eval_every
        self.fine, self.fine_within = train.eval_fine, train.eval_fine_within
        self.subset, self.data, self.ignore_index = data.eval_subset, data, train.ignore_index
        self.env, self.model, self.bundle = env, model, bundle
        self.tracker, self.probes, self.stopper = tracker, probes, stopper
        self.last: dict[str, float] = {}  # the last evaluation's metrics
        self.last_step = 0
        self.steps_to_target: int | None = None
        self.examples_to_target: int | None = None
        self.pending = False  # a stop abandoned this step's evaluation: the resumed run does it first

    def due(self, p) -> bool:
        return bool((self.every and p.step % self.every == 0) or p.last or (self.fine and self._fine_due(p)))

    def _fine_due(self, p) -> bool:
        """train.eval_fine: near the target, evaluate once the steps grew by that fraction since the last evaluation."""
        if not self.last or self.steps_to_target is not None or not reached_target(self.target, self.last, self.fine_within):
            return False
        return p.step - self.last_step >= max(1, math.floor(self.fine * p.step))

    def after_step(self, p, batch: tuple[int, int, int, float]) -> str | None:
        """An evaluation when one is due; "target_reached" when it meets the target and the run
        stops there (train.stop_at_target); "preempted" when a stop signal interrupted it."""
        return self._evaluate(p, batch) if self.due(p) else None

    def resume(self, p, batches) -> str | None:
        """A run resumed from a stop during an evaluation: that evaluation, before any step."""
        return self._evaluate(p, batches.at(p.step - 1)) if self.pending else None

    def _evaluate(self, p, batch: tuple[int, int, int, float]) -> str | None:
        # the plain module: no DDP collectives; data.eval_subset: the first N examples only
        evaluated = evaluate(self.model, self.bundle, self.env, self.data, limit=self.subset,
                             ignore_index=self.ignore_index, stop=self.stopper.check)
        self.pending = evaluated is None
        if evaluated is None:
            return self.stopper.interrupted()
        self.last, self.last_step = evaluated, p.step
        if self.steps_to_target is None and reached_target(self.target, self.last):
            self.steps_to_target, self.examples_to_target = p.step, p.examples
        global_batch, _, _, lr = batch
        row = {"step": p.step, "examples": p.examples, "epoch": p.examples / len(self.bundle.train), "lr": lr,
               "global_batch": global_batch, **self.last, **self.probes.at_eval(),
               **({"eval_set": "subset"} if self.subset else {})}
        self.tracker.log(row)
        status = self.stopper.after_row(row, p)
        if status is None and self.steps_to_target is not None:
            status = self.stopper.target_reached()
        return status

    def at_end(self, p, status: str) -> None:
        """The run's numbers on the full test and training-evaluation sets, when evaluations used a subset."""
        if self.subset and status in ("completed", "target_reached"):
            self.last = evaluate(self.model, self.bundle, self.env, self.data, ignore_index=self.ignore_index)
            self.tracker.log({"step": p.step, "examples": p.examples, "epoch": p.examples / len(self.bundle.train),
                              **self.last, "eval_set": "full"})

    def state_dict(self) -> dict[str, Any]:
        return {"last": dict(self.last), "last_step": self.last_step, "steps_to_target": self.steps_to_target,
                "examples_to_target": self.examples_to_target, "pending": self.pending}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.last, self.last_step = dict(state["last"]), int(state["last_step"])
        self.steps_to_target, self.examples_to_target = state["steps_to_target"], state["examples_to_target"]
        self.pending = bool(state.get("pending", False))
